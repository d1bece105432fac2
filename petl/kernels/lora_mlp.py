"""Fused LoRA SwiGLU MLP: ``y = down(silu(gate(x)) * up(x))`` with LoRA on all three projections.

Forward: ``xa = x [A_g; A_u]^T``; g, u (LoRA projections of x); ``h = silu(g) u`` (one Triton
pass); ``ha = h A_d^T``; ``y = h W_d^T + s_d ha B_d^T``.
Backward (W frozen; see :mod:`petl.kernels.lora_linear` for the projection rules):

    dyB_d = s_d dy B_d;  dh = dy W_d + dyB_d A_d
    (h, dg, du) = swiglu_backward(dh, g, u)        (one pass; h overwrites dh)
    dA_d = dyB_d^T h;  dB_d = s_d dy^T ha;  then gate/up backward from (dg, du) and x, xa

Saved: x, xa, ha, and (g, u) unless ``recompute``; with ``recompute`` g and u are rebuilt from x
in the backward (two matmuls, 2/3 of the MLP forward) and the saved activations per token drop
from ``2 I + K`` to ``K`` elements. h is never saved: the backward pass recomputes it for free.
Only these activations go through ``save_for_backward`` (and so through gradient checkpointing's
hooks); the frozen weights and the factors cast to the compute dtype stay on ``ctx``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.nn.functional import linear

from petl.kernels.lora_linear import Factors, Projection, cast_factors, project_backward, project_forward, unflat
from petl.kernels.swiglu import swiglu, swiglu_backward


def swiglu_mlp_forward(x: torch.Tensor, projs: Sequence[Projection], gate_up: Factors, down: Factors,
                       use_triton: bool, need_y: bool = True):
    """(y ``[T, K_out]`` or None, xa ``[T, r_g + r_u]``, g, u ``[T, I]``, ha ``[T, r_d]``) for x ``[T, K]``.

    Host function (no autograd) shared by :class:`LoRASwiGLUFunction` and the fused decoder layer.
    ``need_y=False`` skips the down projection's frozen matmul (a recomputation needs only ``ha``).
    """
    gate, up, down_p = projs
    (g, u), xa = project_forward(x, (gate, up), gate_up)
    h = swiglu(g, u, use_triton)
    if need_y:
        (y,), ha = project_forward(h, (down_p,), down)
    else:
        y, ha = None, (linear(h, down.a) if down.a is not None else None)
    return y, xa, g, u, ha


def swiglu_mlp_backward(dy: torch.Tensor, x: torch.Tensor, xa, ha, g: torch.Tensor, u: torch.Tensor,
                        projs: Sequence[Projection], gate_up: Factors, down: Factors, need_dx: bool, use_triton: bool,
                        inplace: bool):
    """(dx ``[T, K]`` or None, [dA_g, dB_g, dA_u, dB_u, dA_d, dB_d]) for upstream ``dy`` ``[T, K_out]``.

    ``inplace``: g and u are the caller's own recomputed buffers and may be overwritten.
    """
    gate, up, down_p = projs
    dh = dy @ down_p.weight
    d_down: list[Optional[torch.Tensor]] = [None, None]
    a_d, b_d = down.a, down.bs[0]
    if b_d is not None:
        dyb = (dy @ b_d).mul_(down_p.scaling)
        dh.addmm_(dyb, a_d)
    h, dg, du = swiglu_backward(dh, g, u, use_triton, inplace=inplace)
    if b_d is not None:
        d_down = [(dyb.t() @ h).to(down_p.lora_a.dtype), (dy.t() @ ha).mul_(down_p.scaling).to(down_p.lora_b.dtype)]
    dx, d_gu = project_backward(x, xa, (gate, up), (dg, du), need_dx, gate_up)
    return dx, [*d_gu, *d_down]


class LoRASwiGLUFunction(torch.autograd.Function):
    """gate/up/down LoRA projections with the SwiGLU product, for ``x`` ``[T, K]``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scalings: tuple[float, float, float], recompute: bool, use_triton: bool,
                *params: Optional[torch.Tensor]):
        projs = unflat(params, scalings)
        gate_up = cast_factors(projs[:2], x.dtype)
        down_f = cast_factors(projs[2:], x.dtype)
        y, xa, g, u, ha = swiglu_mlp_forward(x, projs, gate_up, down_f, use_triton)
        ctx.recompute, ctx.use_triton = recompute, use_triton
        ctx.projs, ctx.gate_up, ctx.down = projs, gate_up, down_f
        kept = (None, None) if recompute else (g, u)
        ctx.save_for_backward(x, xa, ha, *kept)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, xa, ha, g, u = ctx.saved_tensors
        if ctx.recompute:
            (g, u), _ = project_forward(x, ctx.projs[:2], ctx.gate_up)
        dx, d = swiglu_mlp_backward(dy, x, xa, ha, g, u, ctx.projs, ctx.gate_up, ctx.down, ctx.needs_input_grad[0],
                                    ctx.use_triton, inplace=ctx.recompute)
        grads = [None, None, *d[0:2], None, None, *d[2:4], None, None, *d[4:6]]
        return (dx, None, None, None, *grads)


def lora_swiglu_mlp(x: torch.Tensor, gate: Projection, up: Projection, down: Projection, *,
                    recompute: bool = False, use_triton: bool = True) -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))`` for ``x`` ``[T, K]`` -> ``[T, K_out]``, LoRA on any projection.

    Weights and biases in x's dtype and frozen; LoRA factors in any floating dtype (cast inside,
    gradients returned in theirs).

    Args:
        recompute (bool): rebuild gate/up outputs in the backward instead of saving them
            (``2 * intermediate`` fewer saved elements per token, one more gate/up matmul pair).
        use_triton (bool): Triton SwiGLU kernels (CUDA or ``TRITON_INTERPRET=1``), else PyTorch.
    """
    projs = (gate, up, down)
    for p in projs:
        if p.weight.requires_grad or (p.bias is not None and p.bias.requires_grad):
            raise ValueError("lora_swiglu_mlp: base weights and biases must be frozen (requires_grad=False)")
    flat = [t for p in projs for t in p.flat()]
    return LoRASwiGLUFunction.apply(x, tuple(float(p.scaling) for p in projs), bool(recompute), bool(use_triton),
                                    *flat)
