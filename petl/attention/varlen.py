"""Varlen backend: each segment as its own sequence in ``torch.nn.attention.varlen.varlen_attn``.

This is LongLoRA's flash-attn path rebuilt on PyTorch's native flash varlen (no flash-attn
package): every head class (unshifted / shifted) is flattened to ``[B*L, Hc, D]`` and cut into
segments by ``cu_seqlens``, with causal attention inside each. The cuts are built per sample
from its own span (the LongLoRA bug #148/#199 came from a batch-wide grid). A segment is the
intersection of a group, a document and the valid span, so this covers non-cyclic S2 and SF
without sinks; cyclic groups and sinks are not contiguous segments and need ``flex``.
CUDA, fp16/bf16 only. Costs a gather of the head classes and of GQA key/value heads.
"""
from __future__ import annotations

import inspect

import torch

from petl.attention.layout import SequenceLayout
from petl.attention.patterns import PatternConfig, head_classes


def _varlen_fn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as exc:  # torch < 2.10
        raise RuntimeError("backend='varlen' needs torch>=2.10 (torch.nn.attention.varlen); use backend='flex'") from exc
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return varlen_attn, causal


def _cuts(layout: SequenceLayout, shifted: bool, device: torch.device) -> tuple[torch.Tensor, int]:
    """``cu_seqlens`` (int32 on ``device``) over the flattened ``[B*L]`` tokens, and the longest segment.

    Memoised on the layout: built once per forward pass (host syncs), shared by all layers.
    """
    key = ("varlen_cuts", shifted, device)
    if key not in layout.memo:
        cuts, longest = _build_cuts(layout, shifted)
        layout.memo[key] = (torch.tensor(cuts, dtype=torch.int32, device=device), longest)
    return layout.memo[key]


def _build_cuts(layout: SequenceLayout, shifted: bool) -> tuple[list[int], int]:
    starts, lengths = layout.start.tolist(), layout.length.tolist()
    groups = layout.group.tolist()
    docs = None if layout.doc is None else layout.doc[:, :layout.seq_len].tolist()
    seq, cuts = layout.seq_len, [0]
    for b in range(layout.batch):
        s, n, g = starts[b], lengths[b], groups[b]
        local = {0, s, s + n, seq}
        local.update(range(s + (g // 2 if shifted else g), s + n, g))
        if docs is not None:
            row = docs[b]
            local.update(i for i in range(s + 1, s + n) if row[i] != row[i - 1])
        cuts.extend(b * seq + c for c in sorted(local) if c > 0)
    longest = max(b - a for a, b in zip(cuts, cuts[1:]))
    return cuts, longest


def _check_expressible(cfg: PatternConfig, layout: SequenceLayout) -> None:
    if cfg.cyclic or cfg.n_sink:
        raise ValueError("backend='varlen' supports non-cyclic segments without sinks; use backend='flex' "
                         "for cyclic=True or n_sink > 0")
    if layout.extra is not None:
        lp = layout.extra.shape[-1]
        idx = torch.arange(lp, device=layout.extra.device)
        inside = (idx >= layout.start[:, None]) & (idx < (layout.start + layout.length)[:, None])  # [B, Lp]
        expect = (idx[None, :, None] >= idx[None, None, :]) & inside[:, None, :] & inside[:, :, None]
        if layout.doc is not None:
            expect &= layout.doc[:, :, None] == layout.doc[:, None, :]
        if not torch.equal(layout.extra & inside[:, :, None], expect):
            raise ValueError("backend='varlen' only honours padding and packed documents, and this attention mask "
                             "holds more (e.g. a sliding window); use backend='flex'")


def varlen_pattern_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cfg: PatternConfig,
                             layout: SequenceLayout, scaling: float | None = None) -> torch.Tensor:
    """Segments through ``varlen_attn``. q ``[B, Hq, L, D]``, k/v ``[B, Hkv, L, D]`` -> ``[B, L, Hq, D]``."""
    _check_expressible(cfg, layout)
    varlen_attn, causal = _varlen_fn()
    batch, num_heads, seq, dim = query.shape
    rep = num_heads // key.shape[1]
    reps, cls = head_classes(cfg, num_heads)
    h0 = cfg.shifted_from(num_heads)
    outs = []
    for c, rep_head in enumerate(reps):
        heads = (cls == c).nonzero().flatten().to(query.device)
        cu, longest = _cuts(layout, rep_head >= h0, query.device)

        def flat(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # [B, h, L, D] -> [B*L, h, D]
            return x.index_select(1, idx).transpose(1, 2).reshape(batch * seq, idx.numel(), dim)

        out = varlen_attn(flat(query, heads), flat(key, heads // rep), flat(value, heads // rep), cu, cu,
                          longest, longest, scale=scaling, **causal)
        outs.append((heads, out.view(batch, seq, heads.numel(), dim)))
    if len(outs) == 1:
        out = outs[0][1]
    else:
        order = torch.cat([h for h, _ in outs]).argsort()
        out = torch.cat([o for _, o in outs], dim=2).index_select(2, order)
    idx = torch.arange(seq, device=query.device)
    valid = (idx >= layout.start[:, None]) & (idx < (layout.start + layout.length)[:, None])
    return out * valid[:, :, None, None].to(out.dtype)
