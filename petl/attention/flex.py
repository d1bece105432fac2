"""FlexAttention backend with a per-head block mask built from the pattern rules.

transformers' own ``flex_attention_mask`` shares one BlockMask across heads, but S2/SF need a
different mask for the shifted heads. Instead of ``create_block_mask`` (which materialises
``B*H*L*L`` booleans unless compiled), the block tables are computed here directly: the mask is
evaluated in row chunks for each head *class* (at most two: unshifted and shifted), reduced to
128x128 blocks (any allowed -> partial, all allowed -> full) and gathered per head. At 32k tokens
the tables are a few MB and the evaluation streams about 2 GB of booleans through the GPU.

Block masks are cached: for data-independent layouts (no padding, no packing) across steps per
shape; otherwise on the layout object, i.e. once per forward pass and shared by all layers.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from petl.attention.layout import BLOCK, SequenceLayout
from petl.attention.patterns import PatternConfig, head_classes, make_mask_mod

#: booleans evaluated per chunk when building block tables (bounds temporary memory)
_CHUNK_ELEMENTS = 1 << 26
_STATIC_CACHE: OrderedDict = OrderedDict()
_STATIC_CACHE_SIZE = 16
_COMPILED = None


def _block_tables(cfg: PatternConfig, num_heads: int, layout: SequenceLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``partial`` and ``full`` block tables ``[Bm, C, nq, nk]`` for the head classes.

    ``Bm`` is 1 for static layouts (every sample has the same mask), else B.
    """
    device = layout.start.device
    reps, _ = head_classes(cfg, num_heads)
    mask_mod = make_mask_mod(cfg, num_heads, layout)
    nblocks = -(-layout.seq_len // BLOCK)
    lp = nblocks * BLOCK
    bm = 1 if layout.static else layout.batch
    b = torch.arange(bm, device=device).view(-1, 1, 1, 1)
    h = torch.tensor(reps, device=device).view(1, -1, 1, 1)
    kv = torch.arange(lp, device=device).view(1, 1, 1, -1)
    step = max(1, _CHUNK_ELEMENTS // (bm * len(reps) * lp * BLOCK))
    partial, full = [], []
    for qb in range(0, nblocks, step):
        q = torch.arange(qb * BLOCK, min(qb + step, nblocks) * BLOCK, device=device).view(1, 1, -1, 1)
        m = mask_mod(b, h, q, kv).expand(bm, len(reps), q.shape[2], lp)
        m = m.view(bm, len(reps), -1, BLOCK, nblocks, BLOCK)
        any_ = m.any(5).any(3)
        all_ = m.all(5).all(3)
        partial.append(any_ & ~all_)
        full.append(all_)
    return torch.cat(partial, 2), torch.cat(full, 2)


def _to_sparse(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``[B, H, nq, nk]`` -> (``kv_num_blocks`` ``[B,H,nq]``, ``kv_indices`` ``[B,H,nq,nk]``)."""
    num = table.sum(-1, dtype=torch.int32)
    idx = torch.argsort(table.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num, idx.contiguous()


def build_block_mask(cfg: PatternConfig, num_heads: int, layout: SequenceLayout) -> BlockMask:
    """Per-head BlockMask for ``cfg`` on ``layout`` (batch dim 1 when the layout is static)."""
    partial, full = _block_tables(cfg, num_heads, layout)
    _, cls = head_classes(cfg, num_heads)
    cls = cls.to(partial.device)
    partial, full = partial.index_select(1, cls), full.index_select(1, cls)  # [Bm, H, nq, nk]
    kv_num, kv_idx = _to_sparse(partial)
    full_num, full_idx = _to_sparse(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK,
                                    mask_mod=make_mask_mod(cfg, num_heads, layout),
                                    seq_lengths=(layout.seq_len, layout.seq_len))


def cached_block_mask(cfg: PatternConfig, num_heads: int, layout: SequenceLayout) -> BlockMask:
    """:func:`build_block_mask` with the caching described in the module docstring."""
    key = (cfg.pattern, cfg.group_ratio, cfg.group_size, cfg.cyclic, cfg.shift_head_fraction, cfg.n_sink,
           cfg.sink_bidirectional, num_heads)
    if layout.static:
        skey = key + (layout.batch, layout.seq_len, layout.start.device)
        if skey in _STATIC_CACHE:
            _STATIC_CACHE.move_to_end(skey)
            return _STATIC_CACHE[skey]
        mask = _STATIC_CACHE[skey] = build_block_mask(cfg, num_heads, layout)
        while len(_STATIC_CACHE) > _STATIC_CACHE_SIZE:
            _STATIC_CACHE.popitem(last=False)
        return mask
    if key not in layout.memo:
        layout.memo[key] = build_block_mask(cfg, num_heads, layout)
    return layout.memo[key]


def _flex_fn(device: torch.device):
    """Compiled flex_attention on CUDA (the fused kernel); eager elsewhere (forward-only, slow)."""
    global _COMPILED
    if device.type != "cuda":
        return flex_attention
    if _COMPILED is None:
        _COMPILED = torch.compile(flex_attention)
    return _COMPILED


def flex_pattern_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cfg: PatternConfig,
                           layout: SequenceLayout, scaling: float | None = None) -> torch.Tensor:
    """Pattern attention through FlexAttention. Shapes as :func:`reference_attention`:
    q ``[B, Hq, L, D]``, k/v ``[B, Hkv, L, D]`` -> ``[B, L, Hq, D]``; rows with no key give 0."""
    block_mask = cached_block_mask(cfg, query.shape[1], layout)
    out = _flex_fn(query.device)(query, key, value, block_mask=block_mask, scale=scaling,
                                 enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous()
