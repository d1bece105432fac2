"""Index arithmetic of the S2/SF patterns for the Triton attention kernels.

The kernels never read a mask: :func:`petl.attention.patterns.make_mask_mod` is folded into a few
integer formulas on positions ``p = index - start[b]`` inside a sample's valid span ``[0, n)``:

* the segment of ``p`` (shift ``sh`` = G/2 on shifted heads, 0 otherwise) is
  ``[seg_start(p), seg_end(p)]`` with ``seg_start(p) = max(((p + sh) // G) * G - sh, 0)`` and
  ``seg_end(p) = min(seg_start(p) + ..., n - 1)``; a key ``k <= p`` is allowed iff
  ``k >= seg_start(p)``, equivalently ``p <= seg_end(k)``;
* sinks (SF): keys ``k < n_sink`` with ``k <= p``;
* the cyclic roll (S2, ``cyclic=True``) gives the same segments plus one extra set: rows
  ``p < sh`` of a shifted head also see the keys ``[npad - G + sh, n)`` (the wrapped group's head,
  ``npad = ceil(n / G) * G``). Derivation: the rolled coordinate ``r = (p - sh) mod npad`` keeps
  the order of all positions ``>= sh``, so every group but the last is a plain span; the last
  group holds ``[npad - G + sh, n)`` followed by ``[0, sh)``.

From these, each program derives the *block ranges* it must visit: the key blocks of a query
block (forward, dQ) or the query blocks of a key block (dK/dV). A visited range is cut into a
masked head, a fully allowed middle (no mask evaluated: every row is valid and sees every key)
and a masked tail; the sink / wrap-around set is one more range, visited only where it does not
overlap the segment range, so no block is counted twice. All blocks are aligned to absolute
indices (``block * BLOCK``), which keeps loads coalesced for any ``start``.

Integer division in Triton truncates toward zero, so every quotient below has a non-negative
numerator for the rows and keys that matter (invalid positions are masked separately).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def sample_span(START, LENGTH, GROUP, PADDED, b):
    """Batch row ``b``'s layout: ``(start, valid length n, group size G, npad = ceil(n / G) * G)``."""
    return tl.load(START + b), tl.load(LENGTH + b), tl.load(GROUP + b), tl.load(PADDED + b)


@triton.jit
def head_shift(h, H0, G, npad):
    """Query head ``h``'s shift ``sh`` (G/2 on heads ``>= H0``) and its wrap-around start ``npad - G + sh``."""
    sh = tl.where(h >= H0, G // 2, 0)
    return sh, npad - G + sh


@triton.jit
def seg_start(p, G, sh):
    """First position of the segment holding ``p`` (``p >= 0``)."""
    return tl.maximum(((p + sh) // G) * G - sh, 0)


@triton.jit
def seg_end(p, G, sh, n):
    """Last position of the segment holding ``p`` (``p >= 0``), clipped to the span."""
    return tl.minimum(((p + sh) // G + 1) * G - sh - 1, n - 1)


@triton.jit
def split_range(lo, hi, f_lo, f_hi, has_full):
    """Cut the block range ``[lo, hi)`` around the fully allowed ``[f_lo, f_hi)`` (if any).

    Returns ``(head_hi, mid_lo, mid_hi, tail_lo)``: masked ``[lo, head_hi)``, full
    ``[mid_lo, mid_hi)``, masked ``[tail_lo, hi)``; without a full part the head takes all.
    """
    head_hi = tl.where(has_full, f_lo, hi)
    mid_lo = tl.where(has_full, f_lo, 0)
    mid_hi = tl.where(has_full, f_hi, 0)
    tail_lo = tl.where(has_full, f_hi, hi)
    return head_hi, mid_lo, mid_hi, tail_lo


@triton.jit
def outside_range(x_lo, x_hi, lo, hi):
    """Parts of the block range ``[x_lo, x_hi)`` below ``lo`` and from ``hi`` on (half-open each)."""
    below_hi = tl.minimum(x_hi, lo)
    above_lo = tl.maximum(x_lo, hi)
    return below_hi, above_lo


@triton.jit
def key_blocks(m0, s, n, G, sh, npad, n_sink, BM: tl.constexpr, BN: tl.constexpr,
               CYCLIC: tl.constexpr, HAS_SINK: tl.constexpr):
    """Key-block ranges for the query block of absolute rows ``[m0, m0 + BM)``.

    Returns half-open block ranges ``(kb_lo, head_hi, mid_lo, mid_hi, tail_lo, kb_hi,
    xa_lo, xa_hi, xb_lo, xb_hi)``: the segment range ``[kb_lo, kb_hi)`` cut by
    :func:`split_range`, and the extra set (sinks or the cyclic wrap) outside it as two ranges.
    """
    p_lo = tl.maximum(m0 - s, 0)
    p_hi = tl.minimum(m0 + BM - 1 - s, n - 1)
    nonempty = p_lo <= p_hi
    kb_lo = (s + seg_start(p_lo, G, sh)) // BN
    kb_hi = tl.where(nonempty, (s + p_hi) // BN + 1, kb_lo)
    # fully allowed: every row valid, keys in [seg_start(p_hi), p_lo]
    f_lo = (s + seg_start(p_hi, G, sh) + BN - 1) // BN
    f_hi = (s + p_lo + 1) // BN
    has_full = (m0 >= s) & (m0 + BM <= s + n) & (f_lo < f_hi)
    head_hi, mid_lo, mid_hi, tail_lo = split_range(kb_lo, kb_hi, f_lo, f_hi, has_full)
    # the extra set as positions [x_lo, x_hi)
    if HAS_SINK:
        x_lo = p_lo * 0
        x_hi = tl.minimum(n_sink, p_hi + 1)
    elif CYCLIC:
        x_lo = npad - G + sh
        x_hi = tl.where((sh > 0) & (p_lo < sh), n, 0)
    else:
        x_lo = p_lo * 0
        x_hi = p_lo * 0
    x_ok = nonempty & (x_lo < x_hi)
    xb_lo = tl.where(x_ok, (s + x_lo) // BN, 0)
    xb_hi = tl.where(x_ok, (s + x_hi - 1) // BN + 1, 0)
    xa_hi, xb_lo2 = outside_range(xb_lo, xb_hi, kb_lo, kb_hi)
    return kb_lo, head_hi, mid_lo, mid_hi, tail_lo, kb_hi, xb_lo, xa_hi, xb_lo2, xb_hi


@triton.jit
def query_blocks(n0, s, n, G, sh, npad, BM: tl.constexpr, BN: tl.constexpr, CYCLIC: tl.constexpr):
    """Query-block ranges that see the key block of absolute keys ``[n0, n0 + BN)``.

    Same return convention as :func:`key_blocks`. Sink keys are seen by every later row; the
    rows beyond the segment range are left to the sink pass (``sink_dkdv_kernel``), so only the
    cyclic wrap adds an extra range here (rows ``[0, sh)`` for keys in the wrapped group's head).
    """
    k_lo = tl.maximum(n0 - s, 0)
    k_hi = tl.minimum(n0 + BN - 1 - s, n - 1)
    nonempty = k_lo <= k_hi
    qb_lo = (s + k_lo) // BM
    qb_hi = tl.where(nonempty, (s + seg_end(k_hi, G, sh, n)) // BM + 1, qb_lo)
    # fully allowed: every key valid, rows in [k_hi, seg_end(k_lo)]
    f_lo = (s + k_hi + BM - 1) // BM
    f_hi = (s + seg_end(k_lo, G, sh, n) + 1) // BM
    has_full = (n0 >= s) & (n0 + BN <= s + n) & (f_lo < f_hi)
    head_hi, mid_lo, mid_hi, tail_lo = split_range(qb_lo, qb_hi, f_lo, f_hi, has_full)
    if CYCLIC:
        x_ok = nonempty & (sh > 0) & (k_hi >= npad - G + sh)
        xb_lo = tl.where(x_ok, s // BM, 0)
        xb_hi = tl.where(x_ok, (s + sh - 1) // BM + 1, 0)
    else:
        xb_lo = 0
        xb_hi = 0
    xa_hi, xb_lo2 = outside_range(xb_lo, xb_hi, qb_lo, qb_hi)
    return qb_lo, head_hi, mid_lo, mid_hi, tail_lo, qb_hi, xb_lo, xa_hi, xb_lo2, xb_hi


@triton.jit
def row_mask(p, pk, n, seg_lo, n_sink, tail_lo, sh, CYCLIC: tl.constexpr, HAS_SINK: tl.constexpr):
    """Allowed ``[BM, BN]`` for rows ``p`` (with ``seg_lo = seg_start(p)``) and keys ``pk``."""
    row_ok = (p >= 0) & (p < n)
    causal = pk[None, :] <= p[:, None]
    local = pk[None, :] >= seg_lo[:, None]
    if HAS_SINK:
        local = local | ((pk >= 0) & (pk < n_sink))[None, :]
    allowed = causal & local
    if CYCLIC:
        wrap = (p < sh)[:, None] & ((pk >= tail_lo) & (pk < n))[None, :]
        allowed = allowed | wrap
    return allowed & row_ok[:, None]


@triton.jit
def col_mask(p, pk, n, seg_hi, n_sink, tail_lo, sh, CYCLIC: tl.constexpr, HAS_SINK: tl.constexpr):
    """Allowed, transposed ``[BN, BM]``, for keys ``pk`` (with ``seg_hi = seg_end(pk)``) and rows ``p``."""
    key_ok = (pk >= 0) & (pk < n)
    row_ok = (p >= 0) & (p < n)
    causal = p[None, :] >= pk[:, None]
    local = p[None, :] <= seg_hi[:, None]
    if HAS_SINK:
        local = local | (pk < n_sink)[:, None]
    allowed = causal & local
    if CYCLIC:
        wrap = (pk >= tail_lo)[:, None] & (p < sh)[None, :]
        allowed = allowed | wrap
    return allowed & key_ok[:, None] & row_ok[None, :]
