"""Reference backend: SDPA with the pattern materialised as an explicit boolean mask.

Deliberately simple: it defines what every fast path must compute, runs anywhere (CPU tests) and
supports every option. Memory is O(B * H * L^2), so use it for checks and short sequences.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from petl.attention.layout import SequenceLayout
from petl.attention.patterns import PatternConfig, dense_mask


def reference_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cfg: PatternConfig,
                        layout: SequenceLayout, scaling: float | None = None) -> torch.Tensor:
    """Pattern attention through SDPA and a dense mask.

    Args:
        query (Tensor): ``[B, Hq, L, D]``.
        key, value (Tensor): ``[B, Hkv, L, D]``, Hkv dividing Hq (GQA, not repeated).
        cfg (PatternConfig): the pattern.
        layout (SequenceLayout): per-sample spans, documents and groups (``with_groups`` done).
        scaling (float, Optional): softmax scale; default ``D ** -0.5``.

    Returns:
        Tensor ``[B, L, Hq, D]``. Rows with no allowed key (padding) are 0, as in FlexAttention.
    """
    num_heads = query.shape[1]
    rep = num_heads // key.shape[1]
    mask = dense_mask(cfg, num_heads, layout)  # [B, H, L, L]
    has_key = mask.any(-1, keepdim=True)  # [B, H, L, 1]
    # a fully masked row would give NaN in softmax; let it see itself, then zero its output
    eye = torch.eye(layout.seq_len, dtype=torch.bool, device=mask.device)
    safe = mask | (~has_key & eye)
    key = key.repeat_interleave(rep, dim=1)
    value = value.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=safe, scale=scaling)
    out = out * has_key.to(out.dtype)
    return out.transpose(1, 2).contiguous()
