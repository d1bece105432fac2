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

from typing import Optional

import torch

from petl.kernels.lora_linear import Projection, cast_factors, project_backward, project_forward, unflat
from petl.kernels.swiglu import swiglu, swiglu_backward


class LoRASwiGLUFunction(torch.autograd.Function):
    """gate/up/down LoRA projections with the SwiGLU product, for ``x`` ``[T, K]``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scalings: tuple[float, float, float], recompute: bool, use_triton: bool,
                *params: Optional[torch.Tensor]):
        gate, up, down = unflat(params, scalings)
        gate_up = cast_factors((gate, up), x.dtype)
        down_f = cast_factors((down,), x.dtype)
        (g, u), xa = project_forward(x, (gate, up), gate_up)
        h = swiglu(g, u, use_triton)
        (y,), ha = project_forward(h, (down,), down_f)
        ctx.recompute, ctx.use_triton = recompute, use_triton
        ctx.projs, ctx.gate_up, ctx.down = (gate, up, down), gate_up, down_f
        kept = (None, None) if recompute else (g, u)
        ctx.save_for_backward(x, xa, ha, *kept)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, xa, ha, g, u = ctx.saved_tensors
        gate, up, down = ctx.projs
        if ctx.recompute:
            (g, u), _ = project_forward(x, (gate, up), ctx.gate_up)
        dh = dy @ down.weight
        d_down: list[Optional[torch.Tensor]] = [None, None]
        a_d, b_d = ctx.down.a, ctx.down.bs[0]
        if b_d is not None:
            dyb = (dy @ b_d).mul_(down.scaling)
            dh.addmm_(dyb, a_d)
        h, dg, du = swiglu_backward(dh, g, u, ctx.use_triton, inplace=ctx.recompute)
        if b_d is not None:
            d_down = [(dyb.t() @ h).to(down.lora_a.dtype), (dy.t() @ ha).mul_(down.scaling).to(down.lora_b.dtype)]
        dx, d_gu = project_backward(x, xa, (gate, up), (dg, du), ctx.needs_input_grad[0], ctx.gate_up)
        grads = [None, None, *d_gu[0:2], None, None, *d_gu[2:4], None, None, *d_down]
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
