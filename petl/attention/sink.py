"""SF-Attn (SinkLoRA sink fixed attention) as the transformers attention ``petl_sf``.

S2 with the shifted heads' segments put back in place (non-cyclic "segmentation and reassembly",
so no future leak), a ``shift_head_fraction`` of shifted heads, and ``n_sink`` sink tokens: the
first tokens of each document, which every later query may attend to in every group. Rules:
:mod:`petl.attention.patterns`; petl's reading of the paper: docs/attention.md.
"""
from __future__ import annotations

from typing import Any

import torch

from petl.attention.dispatch import pattern_attention_forward

NAME = "petl_sf"


def petl_sf_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SF while ``module.training`` (and q_len == kv_len), SDPA otherwise.

    q ``[B, Hq, L, D]``, k/v ``[B, Hkv, S, D]`` -> (``[B, L, Hq, D]``, None).
    """
    return pattern_attention_forward("sf", module, query, key, value, attention_mask, scaling=scaling,
                                     dropout=dropout, **kwargs)
