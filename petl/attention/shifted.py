"""S2-Attn (LongLoRA shifted sparse attention) as the transformers attention ``petl_s2``.

Half of the heads attend causally inside groups of G tokens, the other half inside groups shifted
by G/2, so information flows between neighbouring groups across layers. Rules and options
(non-cyclic default, ``cyclic=True`` for LongLoRA's roll): :mod:`petl.attention.patterns`.
"""
from __future__ import annotations

from typing import Any

import torch

from petl.attention.dispatch import pattern_attention_forward

NAME = "petl_s2"


def petl_s2_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """S2 while ``module.training`` (and q_len == kv_len), SDPA otherwise.

    q ``[B, Hq, L, D]``, k/v ``[B, Hkv, S, D]`` -> (``[B, L, Hq, D]``, None).
    """
    return pattern_attention_forward("s2", module, query, key, value, attention_mask, scaling=scaling,
                                     dropout=dropout, **kwargs)
