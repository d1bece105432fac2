"""Forward Triton kernel of petl's S2/SF pattern attention (online softmax, log-sum-exp saved).

One program per (query block, batch x query head). The program visits only the key blocks that
:func:`petl.kernels.attention_ranges.key_blocks` names for its rows: the sink / wrap-around
blocks and the segment range, the latter cut into masked edges and an unmasked middle. Scores
are scaled by ``scale * log2(e)`` so the softmax runs on ``exp2``; the saved log-sum-exp is in
the same base-2 units (``m + log2(l)``) and is ``+inf`` for rows that see no key, which makes
every probability of such a row exactly 0 in the backward pass. Accumulation is fp32; P is cast
to the value dtype before the second matmul, as in FlashAttention.

Shapes (strides are passed, the last dimension must be contiguous):
q ``[B, Hq, L, D]``, k/v ``[B, Hkv, L, D]``, o ``[B, L, Hq, D]``, lse ``[B, Hq, L]`` fp32.
"""
from __future__ import annotations

import triton
import triton.language as tl

from petl.kernels.attention_ranges import head_shift, key_blocks, row_mask, sample_span, seg_start


@triton.jit
def _fwd_blocks(acc, m_i, l_i, q, k_ptr, v_ptr, skn, svn, lo, hi, offs_d, p, seg_lo, s, n, n_sink, tail_lo, sh,
                L, qk_scale, BM: tl.constexpr, BN: tl.constexpr, MASKED: tl.constexpr, CYCLIC: tl.constexpr,
                HAS_SINK: tl.constexpr, PREC: tl.constexpr):
    """Online-softmax update over key blocks ``[lo, hi)``; ``MASKED`` evaluates the pattern."""
    for kb in range(lo, hi):
        offs_n = kb * BN + tl.arange(0, BN)
        if MASKED:
            k_in = offs_n < L
            k = tl.load(k_ptr + offs_n[:, None] * skn + offs_d[None, :], mask=k_in[:, None], other=0.0)
            v = tl.load(v_ptr + offs_n[:, None] * svn + offs_d[None, :], mask=k_in[:, None], other=0.0)
        else:
            k = tl.load(k_ptr + offs_n[:, None] * skn + offs_d[None, :])
            v = tl.load(v_ptr + offs_n[:, None] * svn + offs_d[None, :])
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if MASKED:
            allowed = row_mask(p, offs_n - s, n, seg_lo, n_sink, tail_lo, sh, CYCLIC, HAS_SINK)
            qk = tl.where(allowed, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: keep zeros
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = m_new
        prob = tl.exp2(qk - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(prob, 1)
        acc = tl.dot(prob.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def attn_fwd_kernel(Q, K, V, O, LSE, START, LENGTH, GROUP, PADDED,
                    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, som, soh,
                    L, H, REP, H0, n_sink, qk_scale,
                    HEAD_DIM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CYCLIC: tl.constexpr,
                    HAS_SINK: tl.constexpr, PREC: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // REP
    s, n, G, npad = sample_span(START, LENGTH, GROUP, PADDED, b)
    sh, tail_lo = head_shift(h, H0, G, npad)

    m0 = qb * BM
    offs_m = m0 + tl.arange(0, BM)
    offs_d = tl.arange(0, HEAD_DIM)
    p = offs_m - s
    seg_lo = seg_start(p, G, sh)
    row_in = offs_m < L
    b64 = b.to(tl.int64)
    q_ptr = Q + b64 * sqb + h.to(tl.int64) * sqh
    k_ptr = K + b64 * skb + hk.to(tl.int64) * skh
    v_ptr = V + b64 * svb + hk.to(tl.int64) * svh
    q = tl.load(q_ptr + offs_m[:, None] * sqm + offs_d[None, :], mask=row_in[:, None], other=0.0)

    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, HEAD_DIM], dtype=tl.float32)
    kb_lo, head_hi, mid_lo, mid_hi, tail_kb, kb_hi, xa_lo, xa_hi, xb_lo, xb_hi = key_blocks(
        m0, s, n, G, sh, npad, n_sink, BM, BN, CYCLIC, HAS_SINK)
    acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, k_ptr, v_ptr, skn, svn, xa_lo, xa_hi, offs_d, p, seg_lo, s, n,
                                n_sink, tail_lo, sh, L, qk_scale, BM, BN, True, CYCLIC, HAS_SINK, PREC)
    acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, k_ptr, v_ptr, skn, svn, kb_lo, head_hi, offs_d, p, seg_lo, s, n,
                                n_sink, tail_lo, sh, L, qk_scale, BM, BN, True, CYCLIC, HAS_SINK, PREC)
    acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, k_ptr, v_ptr, skn, svn, mid_lo, mid_hi, offs_d, p, seg_lo, s, n,
                                n_sink, tail_lo, sh, L, qk_scale, BM, BN, False, CYCLIC, HAS_SINK, PREC)
    acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, k_ptr, v_ptr, skn, svn, tail_kb, kb_hi, offs_d, p, seg_lo, s, n,
                                n_sink, tail_lo, sh, L, qk_scale, BM, BN, True, CYCLIC, HAS_SINK, PREC)
    acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, k_ptr, v_ptr, skn, svn, xb_lo, xb_hi, offs_d, p, seg_lo, s, n,
                                n_sink, tail_lo, sh, L, qk_scale, BM, BN, True, CYCLIC, HAS_SINK, PREC)

    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    o_ptr = O + b64 * sob + h.to(tl.int64) * soh
    tl.store(o_ptr + offs_m[:, None] * som + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_in[:, None])
    lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
    tl.store(LSE + bh.to(tl.int64) * L + offs_m, lse, mask=row_in)
