"""Fused LoRA projections of one input: ``y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T``.

One ``autograd.Function`` computes every projection that reads the same ``x`` (q/k/v of an
attention block, or a single o_proj/down_proj). W and b are frozen, so the hand-derived backward
needs only ``x`` (for dA) and ``xa = x A^T`` (for dB), and saves nothing else:

    dyB_i = s_i dy_i B_i                      [T, r_i]
    dx    = sum_i dy_i W_i + cat(dyB_i) cat(A_i)   (one matmul for all LoRA terms)
    dA    = cat(dyB_i)^T x                    (one matmul, split by rank)
    dB_i  = s_i dy_i^T xa_i

The A factors of all projections are concatenated so x is read once for ``xa`` and once for dA.
peft computes the same sum as ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` per layer, saving
x per layer plus every intermediate of the LoRA branch (in float32 when the adapter is float32).
All arithmetic runs in x's dtype (the compute dtype); the caller casts the adapter factors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class Projection:
    """One frozen linear map with an optional LoRA term.

    weight ``[N, K]`` and bias ``[N]`` are frozen; lora_a ``[r, K]`` and lora_b ``[N, r]`` are the
    adapter factors (None for a plain projection); scaling is ``alpha / r``.
    """

    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    lora_a: Optional[torch.Tensor] = None
    lora_b: Optional[torch.Tensor] = None
    scaling: float = 1.0

    def flat(self) -> list[Optional[torch.Tensor]]:
        return [self.weight, self.bias, self.lora_a, self.lora_b]


def unflat(params: Sequence[Optional[torch.Tensor]], scalings: Sequence[float]) -> list[Projection]:
    """Inverse of ``Projection.flat`` over a list (autograd Functions take flat tensor arguments)."""
    return [Projection(*params[4 * i: 4 * i + 4], scaling=s) for i, s in enumerate(scalings)]


def project_forward(x: torch.Tensor, projs: Sequence[Projection]):
    """(outputs ``[T, N_i]``, ``xa`` ``[T, sum r_i]`` or None) for ``x`` ``[T, K]``."""
    lora = [p for p in projs if p.lora_a is not None]
    xa = x @ torch.cat([p.lora_a for p in lora]).t() if lora else None
    outs, offset = [], 0
    for p in projs:
        y = torch.addmm(p.bias, x, p.weight.t()) if p.bias is not None else x @ p.weight.t()
        if p.lora_a is not None:
            r = p.lora_a.shape[0]
            y.addmm_(xa[:, offset:offset + r], p.lora_b.t(), alpha=p.scaling)
            offset += r
        outs.append(y)
    return outs, xa


def project_backward(x: torch.Tensor, xa: Optional[torch.Tensor], projs: Sequence[Projection],
                     dys: Sequence[torch.Tensor], need_dx: bool):
    """(dx or None, [dA_i, dB_i per projection]) for upstream ``dys`` ``[T, N_i]``."""
    dx = None
    if need_dx:
        for p, dy in zip(projs, dys):
            dx = dy @ p.weight if dx is None else dx.addmm_(dy, p.weight)
    lora = [(p, dy) for p, dy in zip(projs, dys) if p.lora_a is not None]
    grads: list[Optional[torch.Tensor]] = []
    if lora:
        dyb = torch.cat([(dy @ p.lora_b).mul_(p.scaling) for p, dy in lora], dim=1)  # [T, R]
        a_cat = torch.cat([p.lora_a for p, _ in lora])  # [R, K]
        if need_dx:
            dx.addmm_(dyb, a_cat)
        d_a = (dyb.t() @ x).split([p.lora_a.shape[0] for p, _ in lora])
    offset, j = 0, 0
    for p, dy in zip(projs, dys):
        if p.lora_a is None:
            grads += [None, None]
            continue
        r = p.lora_a.shape[0]
        grads += [d_a[j], (dy.t() @ xa[:, offset:offset + r]).mul_(p.scaling)]
        offset, j = offset + r, j + 1
    return dx, grads


class LoRAProjectionsFunction(torch.autograd.Function):
    """Several LoRA projections of one ``x`` ``[T, K]``; saves x and ``xa`` only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scalings: tuple[float, ...], *params: Optional[torch.Tensor]):
        projs = unflat(params, scalings)
        outs, xa = project_forward(x, projs)
        ctx.scalings = scalings
        ctx.save_for_backward(x, xa, *params)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys: torch.Tensor):
        x, xa, *params = ctx.saved_tensors
        projs = unflat(params, ctx.scalings)
        dx, grads = project_backward(x, xa, projs, dys, ctx.needs_input_grad[0])
        flat_grads = []
        for i in range(len(projs)):
            flat_grads += [None, None, *grads[2 * i: 2 * i + 2]]
        return (dx, None, *flat_grads)


def lora_projections(x: torch.Tensor, projs: Sequence[Projection]) -> tuple[torch.Tensor, ...]:
    """Apply each projection to ``x`` ``[T, K]``; returns one ``[T, N_i]`` tensor per projection.

    Every tensor must share x's dtype and device; weights and biases must not require gradients.
    Example:
        >>> q, k, v = lora_projections(x, [Projection(wq, None, aq, bq, 2.0), ...])
    """
    for p in projs:
        if p.weight.requires_grad or (p.bias is not None and p.bias.requires_grad):
            raise ValueError("lora_projections: base weights and biases must be frozen (requires_grad=False)")
        if (p.lora_a is None) != (p.lora_b is None):
            raise ValueError("lora_projections: give both LoRA factors or neither")
    flat = [t for p in projs for t in p.flat()]
    return LoRAProjectionsFunction.apply(x, tuple(float(p.scaling) for p in projs), *flat)
