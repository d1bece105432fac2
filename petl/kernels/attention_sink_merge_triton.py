"""Triton kernels for the sink columns of :mod:`petl.kernels.attention_sink_merge`.

Forward: one pass over a segment's rows that reads q, the segment output and its log-sum-exp,
adds the ``W`` sink columns (``W`` dot products per row, fp32) and rewrites output and lse in
place. Backward: one pass that reads q, dO, the merged output and lse, adds the sinks' share to
dq in place, and writes per-program partial sums of dk/dv of the sink keys (``[W, D]`` each),
which PyTorch then sums (deterministic: no atomics). Segments that see no sinks (the one
containing them) are skipped. The maths and its PyTorch reference live in the parent module.
"""
from __future__ import annotations

import torch

from petl.kernels._triton import tl, triton
from petl.kernels.attention_sink_merge import SinkMeta, _heads_to_kv

BLOCK_M_FWD = 64
BLOCK_M_BWD = 32

if triton is not None:

    @triton.jit
    def _segment_program(heads, count, start, stride, n_sink):
        """``(pid_m, pid_nh, nb, j, b, sinks)`` of a program on grid ``(row blocks, segments * heads)``:
        segment nb (of batch row b), head j, and how many sink columns this segment sees."""
        pid_m = tl.program_id(0)
        pid_nh = tl.program_id(1)
        nb = pid_nh // heads
        j = pid_nh % heads
        b = nb // count
        sinks = tl.minimum(start + (nb % count) * stride, n_sink)
        return pid_m, pid_nh, nb, j, b, sinks

    @triton.jit
    def _sink_rows(pid_m, nb, j, b, rows, lo, rep, kv_lo, KS, VS, sk_b, sk_h, sv_b, sv_h, DIM: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """The program's row block and the sink keys/values it reads: ``(offs_m, offs_d, mask_m,
        mask_d, mask, nb64, kbase, vbase)``; query head ``lo + j`` reads kv head ``(lo + j) // rep``."""
        kvh = (lo + j) // rep - kv_lo
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < rows
        mask_d = offs_d < DIM
        kbase = KS + b.to(tl.int64) * sk_b + kvh * sk_h
        vbase = VS + b.to(tl.int64) * sv_b + kvh * sv_h
        return offs_m, offs_d, mask_m, mask_d, mask_m[:, None] & mask_d[None, :], nb.to(tl.int64), kbase, vbase

    @triton.jit
    def _merge_fwd_kernel(Q, O, LSE, KS, VS, sq_n, sq_h, sq_m, so_n, so_h, so_m, sl_n, sl_h, sl_m,
                          sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, rows, heads, count, start, stride, n_sink,
                          lo, rep, kv_lo, scale, DIM: tl.constexpr, WIDTH: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_m, pid_nh, nb, j, b, sinks = _segment_program(heads, count, start, stride, n_sink)
        if sinks > 0:
            offs_m, offs_d, mask_m, mask_d, mask, nb64, kbase, vbase = _sink_rows(
                pid_m, nb, j, b, rows, lo, rep, kv_lo, KS, VS, sk_b, sk_h, sv_b, sv_h, DIM, BLOCK_M, BLOCK_D)
            q = tl.load(Q + nb64 * sq_n + j * sq_h + offs_m[:, None] * sq_m + offs_d[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            lptr = LSE + nb64 * sl_n + j * sl_h + offs_m * sl_m
            lse_seg = tl.load(lptr, mask=mask_m, other=0.0).to(tl.float32)
            m = lse_seg
            for w in tl.static_range(WIDTH):
                kw = tl.load(kbase + w * sk_s + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                sw = tl.sum(q * kw[None, :], axis=1) * scale
                m = tl.where(w < sinks, tl.maximum(m, sw), m)
            den = tl.exp(lse_seg - m)
            optr = O + nb64 * so_n + j * so_h + offs_m[:, None] * so_m + offs_d[None, :]
            o = tl.load(optr, mask=mask, other=0.0).to(tl.float32) * den[:, None]
            for w in tl.static_range(WIDTH):
                kw = tl.load(kbase + w * sk_s + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                vw = tl.load(vbase + w * sv_s + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                sw = tl.sum(q * kw[None, :], axis=1) * scale
                pw = tl.where(w < sinks, tl.exp(sw - m), 0.0)
                den += pw
                o += pw[:, None] * vw[None, :]
            o = o / den[:, None]
            tl.store(optr, o.to(O.dtype.element_ty), mask=mask)
            tl.store(lptr, (m + tl.log(den)).to(LSE.dtype.element_ty), mask=mask_m)

    @triton.jit
    def _merge_bwd_kernel(Q, DO, O, LSE, KS, VS, DQ, PK, PV, sq_n, sq_h, sq_m, sdo_n, sdo_h, sdo_m,
                          so_n, so_h, so_m, sl_n, sl_h, sl_m, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
                          sdq_n, sdq_h, sdq_m, rows, heads, count, start, stride, n_sink, lo, rep, kv_lo,
                          scale, n_blocks, DIM: tl.constexpr, WIDTH: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_D: tl.constexpr):
        pid_m, pid_nh, nb, j, b, sinks = _segment_program(heads, count, start, stride, n_sink)
        if sinks > 0:
            offs_m, offs_d, mask_m, mask_d, mask, nb64, kbase, vbase = _sink_rows(
                pid_m, nb, j, b, rows, lo, rep, kv_lo, KS, VS, sk_b, sk_h, sv_b, sv_h, DIM, BLOCK_M, BLOCK_D)
            rows_d = offs_m[:, None]
            q = tl.load(Q + nb64 * sq_n + j * sq_h + rows_d * sq_m + offs_d[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            do = tl.load(DO + nb64 * sdo_n + j * sdo_h + rows_d * sdo_m + offs_d[None, :], mask=mask,
                         other=0.0).to(tl.float32)
            o = tl.load(O + nb64 * so_n + j * so_h + rows_d * so_m + offs_d[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            lse = tl.load(LSE + nb64 * sl_n + j * sl_h + offs_m * sl_m, mask=mask_m, other=0.0).to(tl.float32)
            dqptr = DQ + nb64 * sdq_n + j * sdq_h + rows_d * sdq_m + offs_d[None, :]
            dq = tl.load(dqptr, mask=mask, other=0.0).to(tl.float32)
            drow = tl.sum(do * o, axis=1)
            slot = (pid_nh.to(tl.int64) * n_blocks + pid_m) * (WIDTH * DIM)
            for w in tl.static_range(WIDTH):
                kw = tl.load(kbase + w * sk_s + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                vw = tl.load(vbase + w * sv_s + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                sw = tl.sum(q * kw[None, :], axis=1) * scale
                pw = tl.where(mask_m & (w < sinks), tl.exp(sw - lse), 0.0)
                dsw = pw * (tl.sum(do * vw[None, :], axis=1) - drow)
                dq += dsw[:, None] * kw[None, :] * scale
                tl.store(PK + slot + w * DIM + offs_d, tl.sum(dsw[:, None] * q, axis=0) * scale, mask=mask_d)
                tl.store(PV + slot + w * DIM + offs_d, tl.sum(pw[:, None] * do, axis=0), mask=mask_d)
            tl.store(dqptr, dq.to(DQ.dtype.element_ty), mask=mask)


def _last_dim_dense(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _common(q: torch.Tensor, meta: SinkMeta) -> tuple:
    _, heads, rows, _ = q.shape
    return (rows, heads, meta.count, meta.start, meta.stride, meta.n_sink, meta.lo, meta.rep, meta.kv_lo)


def merge_sinks_triton(q, out, lse, ks, vs, meta: SinkMeta, scale: float) -> None:
    """Triton version of :func:`~petl.kernels.attention_sink_merge.merge_sinks_torch` (in place)."""
    if out.stride(-1) != 1:
        raise ValueError("the segment output must have a dense last dimension")
    q, ks, vs = _last_dim_dense(q), _last_dim_dense(ks), _last_dim_dense(vs)
    n_ops, heads, rows, dim = q.shape
    grid = (triton.cdiv(rows, BLOCK_M_FWD), n_ops * heads)
    _merge_fwd_kernel[grid](q, out, lse, ks, vs, *q.stride()[:3], *out.stride()[:3], *lse.stride(),
                            *ks.stride()[:3], *vs.stride()[:3], *_common(q, meta), scale, DIM=dim,
                            WIDTH=meta.width, BLOCK_M=BLOCK_M_FWD, BLOCK_D=triton.next_power_of_2(dim),
                            num_warps=4)


def sink_grads_triton(q, dout, out, lse, ks, vs, dq, meta: SinkMeta, scale: float):
    """Triton version of :func:`~petl.kernels.attention_sink_merge.sink_grads_torch`."""
    if dq.stride(-1) != 1:
        raise ValueError("dq must have a dense last dimension")
    q, dout, out = _last_dim_dense(q), _last_dim_dense(dout), _last_dim_dense(out)
    ks, vs = _last_dim_dense(ks), _last_dim_dense(vs)
    n_ops, heads, rows, dim = q.shape
    n_blocks = triton.cdiv(rows, BLOCK_M_BWD)
    part = torch.zeros(2, n_ops, heads, n_blocks, meta.width, dim, dtype=torch.float32, device=q.device)
    grid = (n_blocks, n_ops * heads)
    _merge_bwd_kernel[grid](q, dout, out, lse, ks, vs, dq, part[0], part[1], *q.stride()[:3], *dout.stride()[:3],
                            *out.stride()[:3], *lse.stride(), *ks.stride()[:3], *vs.stride()[:3],
                            *dq.stride()[:3], *_common(q, meta), scale, n_blocks, DIM=dim, WIDTH=meta.width,
                            BLOCK_M=BLOCK_M_BWD, BLOCK_D=triton.next_power_of_2(dim), num_warps=4)
    sums = part.unflatten(1, (-1, meta.count)).sum((2, 4))  # [2, B, h, W, D]
    return _heads_to_kv(sums[0], ks, meta), _heads_to_kv(sums[1], vs, meta)
