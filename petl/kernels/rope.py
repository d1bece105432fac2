"""Rotary position embedding of q and k, one Triton pass each way, saving only cos/sin.

transformers' ``apply_rotary_pos_emb`` is ``x * cos + rotate_half(x) * sin`` with
``rotate_half(x) = cat(-x2, x1)``. Written per half (x = [x1, x2], cos = [c1, c2], sin = [s1, s2]):
``o1 = x1 c1 - x2 s1``, ``o2 = x2 c2 + x1 s2``. The map is linear in x; its transpose gives the
backward: ``d1 = g1 c1 + g2 s2``, ``d2 = g2 c2 - g1 s1``. No assumption that the halves of cos/sin
are equal is needed. Layout here is the projections' natural one, ``[B, L, H, D]``.
"""
from __future__ import annotations

import torch

from petl.kernels._triton import tl, triton


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """transformers' rotation on ``[B, L, H, D]`` tensors; cos/sin ``[B or 1, L, D]``."""
    def rot(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    return q * c + rot(q) * s, k * c + rot(k) * s


if triton is not None:

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, seq_len, n_heads, sxb, sxl, sxh, sob, sol, soh, scb, scl,
                     HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):
        t = tl.program_id(0)
        b = (t // seq_len).to(tl.int64)
        pos = (t % seq_len).to(tl.int64)
        d = tl.arange(0, BLOCK_D)[None, :]
        h = tl.arange(0, BLOCK_H)[:, None]
        dmask = d < HALF
        mask = (h < n_heads) & dmask
        cbase = b * scb + pos * scl
        c1 = tl.load(cos_ptr + cbase + d, mask=dmask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + cbase + HALF + d, mask=dmask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + cbase + d, mask=dmask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + cbase + HALF + d, mask=dmask, other=0.0).to(tl.float32)
        xbase = x_ptr + b * sxb + pos * sxl + h * sxh
        x1 = tl.load(xbase + d, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xbase + HALF + d, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            o1 = x1 * c1 + x2 * s2
            o2 = x2 * c2 - x1 * s1
        else:
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
        obase = out_ptr + b * sob + pos * sol + h * soh
        tl.store(obase + d, o1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(obase + HALF + d, o2.to(out_ptr.dtype.element_ty), mask=mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    bsz, seq, heads, dim = x.shape
    out = torch.empty((bsz, seq, heads, dim), dtype=x.dtype, device=x.device)
    half = dim // 2
    cos_batch_stride = cos.stride(0) if cos.shape[0] > 1 else 0  # [1, L, D] serves every batch row
    _rope_kernel[(bsz * seq,)](x, cos, sin, out, seq, heads, x.stride(0), x.stride(1), x.stride(2), out.stride(0),
                               out.stride(1), out.stride(2), cos_batch_stride, cos.stride(1), HALF=half,
                               BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(half),
                               BACKWARD=backward, num_warps=4)
    return out


def rope_backward_reference(dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Transpose of the rotation in plain PyTorch: ``d1 = g1 c1 + g2 s2``, ``d2 = g2 c2 - g1 s1`` per half."""
    half = cos.shape[-1] // 2
    c1, c2 = cos[..., :half].unsqueeze(2), cos[..., half:].unsqueeze(2)
    s1, s2 = sin[..., :half].unsqueeze(2), sin[..., half:].unsqueeze(2)

    def back(g):
        g1, g2 = g[..., :half], g[..., half:]
        return torch.cat((g1 * c1 + g2 * s2, g2 * c2 - g1 * s1), dim=-1)

    return back(dq), back(dk)


def rope_tables(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype):
    """cos/sin ``[B or 1, L, D]`` in ``dtype`` with a contiguous last dim, as the kernel reads them (no copy if so)."""
    if cos.dtype != dtype:
        cos, sin = cos.to(dtype), sin.to(dtype)
    if cos.stride(-1) != 1 or cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin


def rope_forward(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, use_triton: bool = True):
    """Rotated (q, k), ``[B, L, H, D]``; host function (no autograd). Triton needs :func:`rope_tables` cos/sin."""
    if not use_triton:
        return rope_reference(q, k, cos, sin)
    return _rotate(q, cos, sin, False), _rotate(k, cos, sin, False)


def rope_backward(dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, use_triton: bool = True):
    """(dq, dk) before the rotation for upstream ``dq``/``dk`` ``[B, L, H, D]``; host function."""
    if not use_triton:
        return rope_backward_reference(dq, dk, cos, sin)
    return _rotate(dq, cos, sin, True), _rotate(dk, cos, sin, True)


class RoPEFunction(torch.autograd.Function):
    """Rotate q and k (``[B, L, H, D]``) by cos/sin (``[B or 1, L, D]``, last dim contiguous); keeps cos/sin."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        ctx.cos, ctx.sin = cos, sin  # shared by every layer and alive anyway: no checkpointing hooks
        return rope_forward(q, k, cos, sin)

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):
        return (*rope_backward(dq, dk, ctx.cos, ctx.sin), None, None)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, use_triton: bool = True):
    """Rotate ``q`` ``[B, L, Hq, D]`` and ``k`` ``[B, L, Hk, D]`` by ``cos``/``sin`` ``[B or 1, L, D]``.

    Returns new ``[B, L, H, D]`` tensors. cos/sin must not need gradients (they come from a
    rotary-embedding buffer).
    """
    if cos.shape[-1] != q.shape[-1] or q.shape[-1] % 2 or cos.shape[-2] != q.shape[1]:
        raise ValueError(f"apply_rope: cos {tuple(cos.shape)} does not match q {tuple(q.shape)} ([B, L, H, D], even D)")
    if not use_triton:
        return rope_reference(q, k, cos, sin)
    if cos.ndim != 3 or cos.shape[0] not in (1, q.shape[0]) or sin.shape != cos.shape:
        raise ValueError(f"apply_rope: cos/sin {tuple(cos.shape)}/{tuple(sin.shape)} must be [B or 1, L, D] "
                         f"for q {tuple(q.shape)}")
    # one cos/sin pair serves every layer of a forward: no copy unless the dtype or layout needs one
    cos, sin = rope_tables(cos, sin, q.dtype)
    return RoPEFunction.apply(q, k, cos, sin)
