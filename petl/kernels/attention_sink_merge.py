"""SF sinks joined to a segment's causal attention by log-sum-exp merging (grouped ``"merge"`` mode).

A SF segment starting at position ``a`` attends causally inside itself and to the
``s = min(a, n_sink)`` sink keys ``[0, s)``, all of which precede every query of the segment. The
softmax over the union of the two key sets splits exactly (``lse``: log-sum-exp of the scaled
scores of a row):

    lse = logaddexp(lse_seg, lse_sink)
    out = exp(lse_seg - lse) * out_seg + sum_j exp(S_j - lse) * v_j        (S_j = scale * q . k_j)

so the segment part is *the same fused causal kernel call as S2* (no sinks concatenated, no
filler rows), and the sinks cost ``s`` dot products per row. The backward of softmax attention
only needs the final output and the final ``lse``: with ``P = exp(S - lse)`` and
``Drow = rowsum(dO * out)``, ``dS = P * (dO v^T - Drow)``. So the fused kernel's own backward,
handed the *merged* ``out`` and ``lse``, returns exactly the segment keys' share of dq, dk, dv;
the sink keys' share (``dq += scale * dS_sink k_sink``, ``dk_sink = scale * dS_sink^T q``,
``dv_sink = P_sink^T dO``) is again ``s`` columns per row.

The segment kernel is one of PyTorch's fused SDPA ops that return the log-sum-exp
(:data:`SEGMENT_OPS`); ``"math"`` is a plain PyTorch stand-in (any dtype, float64 in tests) that
implements the same forward/backward contract. The merge itself runs as two small Triton kernels
(:mod:`petl.kernels.attention_sink_merge_triton`) where kernels run, else as PyTorch ops.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

#: segment kernels: PyTorch's fused ops (CUDA: cudnn, flash, efficient; CPU: cpu_flash) and the
#: plain PyTorch stand-in ``math``
SEGMENT_OPS = ("cudnn", "flash", "efficient", "cpu_flash", "math")
#: ops that take un-repeated GQA K/V (the others get K/V repeated, and dK/dV summed back). cuDNN's
#: private op with un-repeated K/V gave NaN gradients (and later illegal memory accesses) on the
#: H200 with torch 2.11 (32q/8kv), so it gets repeated K/V.
GQA_NATIVE = {"cudnn": False, "flash": True, "efficient": False, "cpu_flash": False, "math": True}
#: fused ops tried in order when PyTorch's own checks reject a segment operand for the chosen one
#: (calling a private op on inputs its dispatch would not send it crashes instead of failing)
FALLBACKS = {"cudnn": ("cudnn", "flash", "efficient"), "flash": ("flash", "efficient")}


@dataclass(frozen=True)
class SinkMeta:
    """Where a bucket's segments and heads sit, for the sink columns.

    Segment ``g`` of a bucket (operand batch index ``b * count + g``) starts at position
    ``start + g * stride`` and sees ``min(start + g * stride, n_sink)`` sinks (segment 0 of a row
    contains the sinks itself and sees none extra). Query head ``j`` of the bucket is model head
    ``lo + j`` and reads sink head ``(lo + j) // rep - kv_lo`` of the ``[B, hk, width, D]`` sinks.
    """

    count: int
    start: int
    stride: int
    n_sink: int
    width: int
    lo: int
    rep: int
    kv_lo: int

    def sinks_per_segment(self) -> list[int]:
        return [min(self.start + g * self.stride, self.n_sink) for g in range(self.count)]

    def kv_index(self, heads: int) -> list[int]:
        return [(self.lo + j) // self.rep - self.kv_lo for j in range(heads)]


# --- segment ops: (q, k, v) -> (out, lse) and their backward given (out, lse) ---------------------

def _expand_kv(x: torch.Tensor, rep: int) -> torch.Tensor:
    return x if rep == 1 else x.repeat_interleave(rep, 1)


def _fold_kv(dx: torch.Tensor, rep: int) -> torch.Tensor:
    """Gradient of :func:`_expand_kv`: sum each group of ``rep`` consecutive heads."""
    return dx if rep == 1 else dx.unflatten(1, (-1, rep)).sum(2)


def _math_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal scores ``[N, h, n, n]`` in float32 (float64 for float64 inputs); GQA by head groups."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    n_kv, n = k.shape[1], q.shape[2]
    qg = q.to(acc).unflatten(1, (n_kv, -1))  # [N, hk, rep, n, D]
    s = (qg @ k.to(acc).unsqueeze(2).transpose(-1, -2)).flatten(1, 2) * scale
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    return s.masked_fill(~causal, float("-inf"))


def _math_forward(q, k, v, scale):
    s = _math_scores(q, k, scale)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.unsqueeze(-1))
    out = (p.unflatten(1, (k.shape[1], -1)) @ v.to(p.dtype).unsqueeze(2)).flatten(1, 2)
    return out.to(q.dtype), lse, ()


def _math_backward(dout, q, k, v, out, lse, aux, scale):
    s = _math_scores(q, k, scale)
    acc = s.dtype
    p = torch.exp(s - lse.to(acc).unsqueeze(-1))  # [N, h, n, n]
    do, o = dout.to(acc), out.to(acc)
    n_kv = k.shape[1]
    dp = (do.unflatten(1, (n_kv, -1)) @ v.to(acc).unsqueeze(2).transpose(-1, -2)).flatten(1, 2)
    ds = p * (dp - (do * o).sum(-1, keepdim=True))
    dq = (ds.unflatten(1, (n_kv, -1)) @ k.to(acc).unsqueeze(2)).flatten(1, 2) * scale
    dk = (ds.transpose(-1, -2) @ q.to(acc)).unflatten(1, (n_kv, -1)).sum(2) * scale
    dv = (p.transpose(-1, -2) @ do).unflatten(1, (n_kv, -1)).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _accepts(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """PyTorch's SDPA dispatch check for a fused CUDA op on these operands (causal, no mask).

    cuDNN also needs contiguous K/V here: with strided K/V views (B=1 segments of transformers'
    ``[B, L, H, D]`` layout) its private backward returned wrong dq/dk/dv on the H200 (torch 2.11,
    benchmarks/results/attention_kernels.json run 1), with contiguous K/V it matched the reference.
    """
    if op not in ("cudnn", "flash", "efficient"):
        return True
    if op == "cudnn" and not (k.is_contiguous() and v.is_contiguous()):
        return False
    from torch.backends import cuda as backends

    check = {"cudnn": backends.can_use_cudnn_attention, "flash": backends.can_use_flash_attention,
             "efficient": backends.can_use_efficient_attention}[op]
    return bool(check(backends.SDPAParams(q, k, v, None, 0.0, True, q.shape[1] != k.shape[1]), False))


def pick_op(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor]:
    """``(op, k, v)``: the first of ``op``'s fallbacks whose check accepts the operands, with K/V
    repeated for ops without GQA. One-line error when none does."""
    rep = q.shape[1] // k.shape[1]
    for cand in FALLBACKS.get(op, (op,)):
        ke, ve = (k, v) if GQA_NATIVE[cand] else (_expand_kv(k, rep), _expand_kv(v, rep))
        if _accepts(cand, q, ke, ve):
            return cand, ke, ve
    raise RuntimeError(f"no fused SDPA op takes this SF segment (q {tuple(q.shape)} {q.dtype}, tried "
                       f"{FALLBACKS.get(op, (op,))}); set petl.kernels.attention_grouped.SINK_MODE = 'square'")


def _op_forward(op: str, q, k, v, scale):
    """``(out [N, h, n, D], lse_raw, aux)``; ``lse_raw`` in the op's own layout (see :func:`lse_rows`)."""
    aten = torch.ops.aten
    if op == "math":
        return _math_forward(q, k, v, scale)
    if op == "cudnn":
        r = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)
        return r[0], r[1], (r[2], r[3], r[4], r[5], r[6], r[7])
    if op == "flash":
        r = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)
        return r[0], r[1], (r[2], r[3], r[4], r[5], r[6], r[7])
    if op == "efficient":
        r = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, True, scale=scale)
        return r[0], r[1], (r[2], r[3])
    if op == "cpu_flash":
        r = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
        return r[0], r[1], ()
    raise ValueError(f"unknown segment op {op!r}; use one of {SEGMENT_OPS}")


def _op_backward(op: str, dout, q, k, v, out, lse_raw, aux, scale):
    aten = torch.ops.aten
    if op == "math":
        return _math_backward(dout, q, k, v, out, lse_raw, aux, scale)
    if op == "cudnn":
        if dout.stride() != out.stride():  # cuDNN reads dO in the layout of O
            dout = torch.empty_like(out).copy_(dout)
        cq, ck, mq, mk, seed, offset = aux
        return aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse_raw, seed, offset, None, cq, ck, mq, mk, 0.0, True, scale=scale)
    if op == "flash":
        cq, ck, mq, mk, seed, offset = aux
        return aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse_raw, cq, ck, mq, mk, 0.0, True, seed, offset, scale=scale)
    if op == "efficient":
        seed, offset = aux
        r = aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, None, out, lse_raw, seed, offset, 0.0, [True, True, True, False], True, scale=scale)
        return r[0], r[1], r[2]
    if op == "cpu_flash":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse_raw, 0.0, True, scale=scale)
    raise ValueError(f"unknown segment op {op!r}; use one of {SEGMENT_OPS}")


def lse_rows(lse_raw: torch.Tensor, rows: int) -> torch.Tensor:
    """``[N, h, rows]`` view of an op's log-sum-exp (cuDNN: ``[N, h, n, 1]``; efficient: padded)."""
    if lse_raw.dim() == 4:
        lse_raw = lse_raw[..., 0]
    return lse_raw[..., :rows]


# --- the sink columns in PyTorch (reference for the Triton kernels; fallback without them) --------

def _sink_operands(q: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, meta: SinkMeta):
    """Per-query-head sinks ``[B, 1, h, W, D]`` and the column mask ``[1, count, 1, 1, W]``."""
    heads, dev = q.shape[1], q.device
    idx = torch.tensor(meta.kv_index(heads), device=dev)
    kh, vh = ks.index_select(1, idx).unsqueeze(1), vs.index_select(1, idx).unsqueeze(1)
    sinks = torch.tensor(meta.sinks_per_segment(), device=dev)
    valid = torch.arange(meta.width, device=dev) < sinks.view(-1, 1)  # [count, W]
    return kh, vh, valid.view(1, meta.count, 1, 1, meta.width)


def _sink_scores(q, kh, valid, scale, acc):
    qb = q.to(acc).unflatten(0, (-1, valid.shape[1]))  # [B, count, h, n, D]
    s = (qb @ kh.to(acc).transpose(-1, -2)) * scale  # [B, count, h, n, W]
    return qb, s.masked_fill(~valid, float("-inf"))


def merge_sinks_torch(q, out, lse, ks, vs, meta: SinkMeta, scale: float) -> None:
    """In place: ``out [N, h, n, D]`` and ``lse [N, h, n]`` of the segment become those of
    segment + sinks. Float32 math (float64 for float64 inputs)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    kh, vh, valid = _sink_operands(q, ks, vs, meta)
    _, s = _sink_scores(q, kh, valid, scale, acc)
    seg = lse.to(acc).unflatten(0, (-1, meta.count))  # [B, count, h, n]
    new = torch.logaddexp(seg, torch.logsumexp(s, -1))
    o = out.to(acc).unflatten(0, (-1, meta.count)) * torch.exp(seg - new).unsqueeze(-1)
    o = o + torch.exp(s - new.unsqueeze(-1)) @ vh.to(acc)
    out.copy_(o.flatten(0, 1))
    lse.copy_(new.flatten(0, 1))


def sink_grads_torch(q, dout, out, lse, ks, vs, dq, meta: SinkMeta, scale: float):
    """Sink share of the backward: adds into ``dq`` in place, returns ``(dks, dvs)`` like ``ks``."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    kh, vh, valid = _sink_operands(q, ks, vs, meta)
    qb, s = _sink_scores(q, kh, valid, scale, acc)
    do = dout.to(acc).unflatten(0, (-1, meta.count))
    o = out.to(acc).unflatten(0, (-1, meta.count))
    p = torch.exp(s - lse.to(acc).unflatten(0, (-1, meta.count)).unsqueeze(-1))  # [B, count, h, n, W]
    ds = p * (do @ vh.to(acc).transpose(-1, -2) - (do * o).sum(-1, keepdim=True))
    dq.add_((ds @ kh.to(acc) * scale).flatten(0, 1).to(dq.dtype))
    dk_h = (ds.transpose(-1, -2) @ qb).sum(1) * scale  # [B, h, W, D]
    dv_h = (p.transpose(-1, -2) @ do).sum(1)
    return _heads_to_kv(dk_h, ks, meta), _heads_to_kv(dv_h, vs, meta)


def _heads_to_kv(d_heads: torch.Tensor, like: torch.Tensor, meta: SinkMeta) -> torch.Tensor:
    """Sum per-query-head sink gradients ``[B, h, W, D]`` into their KV heads ``[B, hk, W, D]``."""
    idx = torch.tensor(meta.kv_index(d_heads.shape[1]), device=d_heads.device)
    out = torch.zeros(like.shape, dtype=d_heads.dtype, device=d_heads.device)
    return out.index_add_(1, idx, d_heads).to(like.dtype)


# --- autograd ------------------------------------------------------------------------------------

def _merge_impl(use_triton: bool):
    """``(merge, grads)``: the Triton kernels (imported on first use) or the PyTorch version."""
    if use_triton:
        from petl.kernels.attention_sink_merge_triton import merge_sinks_triton, sink_grads_triton

        return merge_sinks_triton, sink_grads_triton
    return merge_sinks_torch, sink_grads_torch


class SinkSegmentAttention(torch.autograd.Function):
    """Causal attention of ``count`` segments per batch row plus their sink keys.

    Forward args: q ``[B*count, h, n, D]``, k/v ``[B*count, hk, n, D]`` (the segments), ks/vs
    ``[B, hk, W, D]`` (the sinks, shared by the segments), :class:`SinkMeta`, scale, the segment
    op name, and whether the merge runs as Triton kernels. Returns ``[B*count, h, n, D]``.
    """

    @staticmethod
    def forward(ctx, q, k, v, ks, vs, meta: SinkMeta, scale: float, op: str, use_triton: bool):
        rep = q.shape[1] // k.shape[1]
        op, ke, ve = pick_op(op, q, k, v)
        native = ke is k
        out, lse_raw, aux = _op_forward(op, q, ke, ve, scale)
        merge, _ = _merge_impl(use_triton)
        merge(q, out, lse_rows(lse_raw, q.shape[2]), ks, vs, meta, scale)
        ctx.save_for_backward(q, ke, ve, ks, vs, out, lse_raw, *[a for a in aux if isinstance(a, torch.Tensor)])
        ctx.aux = tuple((True, None) if isinstance(a, torch.Tensor) else (False, a) for a in aux)
        ctx.cfg = (meta, scale, op, use_triton, rep, native)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, ke, ve, ks, vs, out, lse_raw, *tensors = ctx.saved_tensors
        it = iter(tensors)
        aux = tuple(next(it) if saved else a for saved, a in ctx.aux)
        meta, scale, op, use_triton, rep, native = ctx.cfg
        dq, dk, dv = _op_backward(op, dout, q, ke, ve, out, lse_raw, aux, scale)
        _, grads = _merge_impl(use_triton)
        dks, dvs = grads(q, dout, out, lse_rows(lse_raw, q.shape[2]), ks, vs, dq, meta, scale)
        if not native:
            dk, dv = _fold_kv(dk, rep), _fold_kv(dv, rep)
        return dq, dk, dv, dks, dvs, None, None, None, None
