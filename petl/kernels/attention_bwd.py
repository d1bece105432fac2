"""Backward Triton kernels of petl's S2/SF pattern attention.

Four launches, all in fp32 accumulation (``P = exp2(S * scale * log2 e - lse)`` is recomputed
from the saved base-2 log-sum-exp, so nothing of size ``L x L`` is stored):

1. :func:`attn_bwd_delta_kernel`: ``delta = rowsum(dO * O)`` ``[B, Hq, L]``.
2. :func:`sink_dkdv_kernel` (SF only): the sink keys are seen by *every* later row, far beyond
   their own segment. Giving those rows to the key-block program that owns the sinks would make
   one program per head do ``L / G`` times the work of the others, so a separate pass handles
   them: programs over (row chunk, batch x KV head) compute the sink keys' dK/dV contributions of
   the rows *not* visited by the owning key-block program, into per-chunk fp32 partials that the
   host sums (deterministic, no atomics). The owning program of step 3 adds the sum.
3. :func:`attn_bwd_dkdv_kernel`: one program per (key block, batch x KV head) accumulates dK and
   dV over the query blocks of :func:`petl.kernels.attention_ranges.query_blocks`, for every
   query head of its GQA group in turn, so no two programs write the same rows.
4. :func:`attn_bwd_dq_kernel`: one program per (query block, batch x query head) over the same
   key blocks as the forward pass.

Shapes: q/dq ``[B, Hq, L, D]``, k/v/dk/dv ``[B, Hkv, L, D]``, o/dO ``[B, L, Hq, D]``, lse/delta
``[B, Hq, L]`` fp32, sink partials ``[B * Hkv, chunks, SINK_N, D]`` fp32.
"""
from __future__ import annotations

import triton
import triton.language as tl

from petl.kernels.attention_ranges import (col_mask, head_shift, key_blocks, query_blocks, row_mask, sample_span,
                                         seg_end, seg_start)


@triton.jit
def attn_bwd_delta_kernel(O, DO, DELTA, sob, som, soh, sdob, sdom, sdoh, L, H,
                          HEAD_DIM: tl.constexpr, BM: tl.constexpr):
    mb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = mb * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, HEAD_DIM)
    row_in = offs_m < L
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], mask=row_in[:, None], other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :], mask=row_in[:, None],
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * L + offs_m, delta, mask=row_in)


# --- dQ -------------------------------------------------------------------------------------------

@triton.jit
def _dq_blocks(dq, q, do, lse, delta, k_ptr, v_ptr, skn, svn, lo, hi, offs_d, p, seg_lo, s, n, n_sink, tail_lo,
               sh, L, qk_scale, BN: tl.constexpr, MASKED: tl.constexpr, CYCLIC: tl.constexpr,
               HAS_SINK: tl.constexpr, PREC: tl.constexpr):
    for kb in range(lo, hi):
        offs_n = kb * BN + tl.arange(0, BN)
        if MASKED:
            k_in = offs_n < L
            k = tl.load(k_ptr + offs_n[:, None] * skn + offs_d[None, :], mask=k_in[:, None], other=0.0)
            v = tl.load(v_ptr + offs_n[:, None] * svn + offs_d[None, :], mask=k_in[:, None], other=0.0)
        else:
            k = tl.load(k_ptr + offs_n[:, None] * skn + offs_d[None, :])
            v = tl.load(v_ptr + offs_n[:, None] * svn + offs_d[None, :])
        prob = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale - lse[:, None])
        if MASKED:
            allowed = row_mask(p, offs_n - s, n, seg_lo, n_sink, tail_lo, sh, CYCLIC, HAS_SINK)
            prob = tl.where(allowed, prob, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = prob * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    return dq


@triton.jit
def attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, START, LENGTH, GROUP, PADDED,
                       sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdom, sdoh, sdqb, sdqh, sdqm,
                       L, H, REP, H0, n_sink, qk_scale, sm_scale,
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
    h64 = h.to(tl.int64)
    q = tl.load(Q + b64 * sqb + h64 * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=row_in[:, None],
                other=0.0)
    do = tl.load(DO + b64 * sdob + h64 * sdoh + offs_m[:, None] * sdom + offs_d[None, :], mask=row_in[:, None],
                 other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * L + offs_m, mask=row_in, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * L + offs_m, mask=row_in, other=0.0)
    k_ptr = K + b64 * skb + hk.to(tl.int64) * skh
    v_ptr = V + b64 * svb + hk.to(tl.int64) * svh

    dq = tl.zeros([BM, HEAD_DIM], dtype=tl.float32)
    kb_lo, head_hi, mid_lo, mid_hi, tail_kb, kb_hi, xa_lo, xa_hi, xb_lo, xb_hi = key_blocks(
        m0, s, n, G, sh, npad, n_sink, BM, BN, CYCLIC, HAS_SINK)
    dq = _dq_blocks(dq, q, do, lse, delta, k_ptr, v_ptr, skn, svn, xa_lo, xa_hi, offs_d, p, seg_lo, s, n, n_sink,
                    tail_lo, sh, L, qk_scale, BN, True, CYCLIC, HAS_SINK, PREC)
    dq = _dq_blocks(dq, q, do, lse, delta, k_ptr, v_ptr, skn, svn, kb_lo, head_hi, offs_d, p, seg_lo, s, n, n_sink,
                    tail_lo, sh, L, qk_scale, BN, True, CYCLIC, HAS_SINK, PREC)
    dq = _dq_blocks(dq, q, do, lse, delta, k_ptr, v_ptr, skn, svn, mid_lo, mid_hi, offs_d, p, seg_lo, s, n, n_sink,
                    tail_lo, sh, L, qk_scale, BN, False, CYCLIC, HAS_SINK, PREC)
    dq = _dq_blocks(dq, q, do, lse, delta, k_ptr, v_ptr, skn, svn, tail_kb, kb_hi, offs_d, p, seg_lo, s, n, n_sink,
                    tail_lo, sh, L, qk_scale, BN, True, CYCLIC, HAS_SINK, PREC)
    dq = _dq_blocks(dq, q, do, lse, delta, k_ptr, v_ptr, skn, svn, xb_lo, xb_hi, offs_d, p, seg_lo, s, n, n_sink,
                    tail_lo, sh, L, qk_scale, BN, True, CYCLIC, HAS_SINK, PREC)
    dq = dq * sm_scale
    tl.store(DQ + b64 * sdqb + h64 * sdqh + offs_m[:, None] * sdqm + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_in[:, None])


# --- dK, dV ---------------------------------------------------------------------------------------

@triton.jit
def _dkdv_blocks(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, sqm, sdom, lo, hi, offs_d, pk, seg_hi, s, n,
                 n_sink, tail_lo, sh, L, qk_scale, BM: tl.constexpr, MASKED: tl.constexpr, CYCLIC: tl.constexpr,
                 HAS_SINK: tl.constexpr, PREC: tl.constexpr):
    for qb in range(lo, hi):
        offs_m = qb * BM + tl.arange(0, BM)
        if MASKED:
            row_in = offs_m < L
            q = tl.load(q_ptr + offs_m[:, None] * sqm + offs_d[None, :], mask=row_in[:, None], other=0.0)
            do = tl.load(do_ptr + offs_m[:, None] * sdom + offs_d[None, :], mask=row_in[:, None], other=0.0)
            lse = tl.load(lse_ptr + offs_m, mask=row_in, other=float("inf"))
            delta = tl.load(delta_ptr + offs_m, mask=row_in, other=0.0)
        else:
            q = tl.load(q_ptr + offs_m[:, None] * sqm + offs_d[None, :])
            do = tl.load(do_ptr + offs_m[:, None] * sdom + offs_d[None, :])
            lse = tl.load(lse_ptr + offs_m)
            delta = tl.load(delta_ptr + offs_m)
        prob_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale - lse[None, :])  # [BN, BM]
        if MASKED:
            allowed = col_mask(offs_m - s, pk, n, seg_hi, n_sink, tail_lo, sh, CYCLIC, HAS_SINK)
            prob_t = tl.where(allowed, prob_t, 0.0)
        dv = tl.dot(prob_t.to(do.dtype), do, dv, input_precision=PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
        ds_t = prob_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PREC)
    return dk, dv


@triton.jit
def attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, SDK, SDV, START, LENGTH, GROUP, PADDED,
                         sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdom, sdoh,
                         sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
                         L, HQ, HKV, REP, H0, n_sink, qk_scale, sm_scale,
                         HEAD_DIM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CYCLIC: tl.constexpr,
                         HAS_SINK: tl.constexpr, SINK_N: tl.constexpr, PREC: tl.constexpr):
    kb = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // HKV
    hk = bhk % HKV
    s, n, G, npad = sample_span(START, LENGTH, GROUP, PADDED, b)

    n0 = kb * BN
    offs_n = n0 + tl.arange(0, BN)
    offs_d = tl.arange(0, HEAD_DIM)
    pk = offs_n - s
    k_in = offs_n < L
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    k = tl.load(K + b64 * skb + hk64 * skh + offs_n[:, None] * skn + offs_d[None, :], mask=k_in[:, None], other=0.0)
    v = tl.load(V + b64 * svb + hk64 * svh + offs_n[:, None] * svn + offs_d[None, :], mask=k_in[:, None], other=0.0)
    dk = tl.zeros([BN, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BN, HEAD_DIM], dtype=tl.float32)
    for j in range(0, REP):
        h = hk * REP + j
        sh, tail_lo = head_shift(h, H0, G, npad)
        seg_hi = seg_end(pk, G, sh, n)
        h64 = h.to(tl.int64)
        q_ptr = Q + b64 * sqb + h64 * sqh
        do_ptr = DO + b64 * sdob + h64 * sdoh
        lse_ptr = LSE + (b64 * HQ + h64) * L
        delta_ptr = DELTA + (b64 * HQ + h64) * L
        qb_lo, head_hi, mid_lo, mid_hi, tail_qb, qb_hi, xa_lo, xa_hi, xb_lo, xb_hi = query_blocks(
            n0, s, n, G, sh, npad, BM, BN, CYCLIC)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, sqm, sdom, xa_lo, xa_hi, offs_d, pk,
                              seg_hi, s, n, n_sink, tail_lo, sh, L, qk_scale, BM, True, CYCLIC, HAS_SINK, PREC)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, sqm, sdom, qb_lo, head_hi, offs_d, pk,
                              seg_hi, s, n, n_sink, tail_lo, sh, L, qk_scale, BM, True, CYCLIC, HAS_SINK, PREC)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, sqm, sdom, mid_lo, mid_hi, offs_d, pk,
                              seg_hi, s, n, n_sink, tail_lo, sh, L, qk_scale, BM, False, CYCLIC, HAS_SINK, PREC)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, sqm, sdom, tail_qb, qb_hi, offs_d, pk,
                              seg_hi, s, n, n_sink, tail_lo, sh, L, qk_scale, BM, True, CYCLIC, HAS_SINK, PREC)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, sqm, sdom, xb_lo, xb_hi, offs_d, pk,
                              seg_hi, s, n, n_sink, tail_lo, sh, L, qk_scale, BM, True, CYCLIC, HAS_SINK, PREC)
    if HAS_SINK:
        # rows beyond this block's segment range, summed by the sink pass (zero rows elsewhere)
        is_sink = (pk >= 0) & (pk < SINK_N)
        part = bhk.to(tl.int64) * SINK_N * HEAD_DIM + pk[:, None] * HEAD_DIM + offs_d[None, :]
        dk += tl.load(SDK + part, mask=is_sink[:, None], other=0.0)
        dv += tl.load(SDV + part, mask=is_sink[:, None], other=0.0)
    dk = dk * sm_scale
    tl.store(DK + b64 * sdkb + hk64 * sdkh + offs_n[:, None] * sdkn + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=k_in[:, None])
    tl.store(DV + b64 * sdvb + hk64 * sdvh + offs_n[:, None] * sdvn + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=k_in[:, None])


@triton.jit
def sink_dkdv_kernel(Q, K, V, DO, LSE, DELTA, PDK, PDV, START, LENGTH, GROUP,
                     sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdom, sdoh,
                     L, HQ, HKV, REP, H0, n_sink, qk_scale, chunk_blocks, n_chunks,
                     HEAD_DIM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SINK_N: tl.constexpr,
                     PREC: tl.constexpr):
    """Sink keys' dK/dV from rows in query blocks past the owning dK/dV program's range.

    ``BM``/``BN`` must be the block sizes of :func:`attn_bwd_dkdv_kernel`: a row block ``qb``
    is counted here iff it is after the last block that program visits for the sink's key block.
    """
    c = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // HKV
    hk = bhk % HKV
    s = tl.load(START + b)
    n = tl.load(LENGTH + b)
    G = tl.load(GROUP + b)
    j = tl.arange(0, SINK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = (j < n_sink) & (j < n)
    offs_k = s + j
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    k = tl.load(K + b64 * skb + hk64 * skh + offs_k[:, None] * skn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + b64 * svb + hk64 * svh + offs_k[:, None] * svn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([SINK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([SINK_N, HEAD_DIM], dtype=tl.float32)
    last_qb = tl.where(n > 0, (s + n - 1) // BM + 1, 0)
    for r in range(0, REP):
        h = hk * REP + r
        sh = tl.where(h >= H0, G // 2, 0)
        # last row block the owning dK/dV program visits, per sink column
        k_hi = tl.minimum(((s + j) // BN) * BN + BN - 1 - s, n - 1)
        seen_to = (s + seg_end(k_hi, G, sh, n)) // BM
        first = tl.min(tl.where(col_ok, seen_to, last_qb), 0) + 1
        lo = tl.maximum(c * chunk_blocks, first)
        hi = tl.minimum(c * chunk_blocks + chunk_blocks, last_qb)
        h64 = h.to(tl.int64)
        q_ptr = Q + b64 * sqb + h64 * sqh
        do_ptr = DO + b64 * sdob + h64 * sdoh
        lse_ptr = LSE + (b64 * HQ + h64) * L
        delta_ptr = DELTA + (b64 * HQ + h64) * L
        for qb in range(lo, hi):
            offs_m = qb * BM + tl.arange(0, BM)
            row_in = offs_m < L
            q = tl.load(q_ptr + offs_m[:, None] * sqm + offs_d[None, :], mask=row_in[:, None], other=0.0)
            do = tl.load(do_ptr + offs_m[:, None] * sdom + offs_d[None, :], mask=row_in[:, None], other=0.0)
            lse = tl.load(lse_ptr + offs_m, mask=row_in, other=float("inf"))
            delta = tl.load(delta_ptr + offs_m, mask=row_in, other=0.0)
            p = offs_m - s
            allowed = (col_ok & (qb > seen_to))[:, None] & ((p >= 0) & (p < n))[None, :] & (p[None, :] >= j[:, None])
            qk_t = tl.dot(k, tl.trans(q), input_precision=PREC)
            prob_t = tl.where(allowed, tl.exp2(qk_t * qk_scale - lse[None, :]), 0.0)
            dv = tl.dot(prob_t.to(do.dtype), do, dv, input_precision=PREC)
            ds_t = prob_t * (tl.dot(v, tl.trans(do), input_precision=PREC) - delta[None, :])
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PREC)
    part = (bhk.to(tl.int64) * n_chunks + c) * SINK_N * HEAD_DIM + j[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(PDK + part, dk)
    tl.store(PDV + part, dv)
