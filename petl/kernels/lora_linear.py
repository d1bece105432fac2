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
All arithmetic runs in x's dtype (the compute dtype). The adapter factors arrive in their own
dtype (float32 by peft's default) and are cast inside the Function, concatenated first, so a
q/k/v block costs two cast launches instead of six and no ``ToCopy`` autograd nodes; their
gradients leave in the factors' dtype (the same values autograd's cast-back would give).

Host cost matters here: at 4 x 2048 tokens a training step of a 0.9B model is close to
launch-bound, and under non-reentrant gradient checkpointing every tensor in
``save_for_backward`` passes through two Python hooks. Only activations (x, xa) are saved that
way; the frozen weights and the cast factors, which checkpointing would not free anyway, are
kept on ``ctx``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch.nn.functional import linear


@dataclass(frozen=True)
class Projection:
    """One frozen linear map with an optional LoRA term.

    weight ``[N, K]`` and bias ``[N]`` are frozen and in the compute dtype; lora_a ``[r, K]`` and
    lora_b ``[N, r]`` are the adapter factors in any floating dtype (None for a plain
    projection); scaling is ``alpha / r``.
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


@dataclass
class Factors:
    """The LoRA factors of a group of projections, cast to the compute dtype once per forward.

    a: ``[R, K]``, the A factors stacked (R = sum of ranks), or None when no projection has LoRA;
    bs: per projection its B ``[N_i, r_i]`` or None.
    """

    a: Optional[torch.Tensor]
    bs: list[Optional[torch.Tensor]]


def cast_factors(projs: Sequence[Projection], dtype: torch.dtype) -> Factors:
    """Stack the A factors and cast A and B to ``dtype`` (concatenate first: one cast per kind)."""
    lora = [p for p in projs if p.lora_a is not None]
    if not lora:
        return Factors(None, [None] * len(projs))
    a = lora[0].lora_a if len(lora) == 1 else torch.cat([p.lora_a for p in lora])
    a = a.to(dtype)
    raw_b = [p.lora_b for p in lora]
    if len(lora) > 1 and raw_b[0].dtype != dtype and len({(b.shape[1], b.dtype) for b in raw_b}) == 1:
        cast_b = list(torch.cat(raw_b).to(dtype).split([b.shape[0] for b in raw_b]))  # row slices: contiguous
    else:
        cast_b = [b.to(dtype) for b in raw_b]
    it = iter(cast_b)
    return Factors(a, [next(it) if p.lora_a is not None else None for p in projs])


def project_forward(x: torch.Tensor, projs: Sequence[Projection], factors: Optional[Factors] = None):
    """(outputs ``[T, N_i]``, ``xa`` ``[T, sum r_i]`` or None) for ``x`` ``[T, K]``."""
    f = factors if factors is not None else cast_factors(projs, x.dtype)
    # F.linear is addmm(b, x, W^T) / x @ W^T (the same kernels) in one call instead of two from Python
    xa = linear(x, f.a) if f.a is not None else None
    outs, offset = [], 0
    for p, b in zip(projs, f.bs):
        y = linear(x, p.weight, p.bias)
        if b is not None:
            r = b.shape[1]
            y.addmm_(xa[:, offset:offset + r], b.t(), alpha=p.scaling)
            offset += r
        outs.append(y)
    return outs, xa


def project_backward(x: torch.Tensor, xa: Optional[torch.Tensor], projs: Sequence[Projection],
                     dys: Sequence[torch.Tensor], need_dx: bool, factors: Optional[Factors] = None):
    """(dx or None, [dA_i, dB_i per projection]) for upstream ``dys`` ``[T, N_i]``.

    The factor gradients are returned in the dtype of the factors in ``projs``.
    """
    f = factors if factors is not None else cast_factors(projs, x.dtype)
    dx = None
    if need_dx:
        for p, dy in zip(projs, dys):
            dx = dy @ p.weight if dx is None else dx.addmm_(dy, p.weight)
    lora = [(p, b, dy) for p, b, dy in zip(projs, f.bs, dys) if b is not None]
    grads: list[Optional[torch.Tensor]] = []
    if lora:
        dyb = [(dy @ b).mul_(p.scaling) for p, b, dy in lora]  # [T, r_i]
        dyb = dyb[0] if len(dyb) == 1 else torch.cat(dyb, dim=1)  # [T, R]
        if need_dx:
            dx.addmm_(dyb, f.a)
        d_a = dyb.t() @ x  # [R, K]
        a_dtypes = {p.lora_a.dtype for p, _, _ in lora}
        if len(a_dtypes) == 1:
            d_a = d_a.to(a_dtypes.pop())
        d_a = d_a.split([b.shape[1] for _, b, _ in lora])
    offset, j = 0, 0
    for p, b, dy in zip(projs, f.bs, dys):
        if b is None:
            grads += [None, None]
            continue
        r = b.shape[1]
        d_b = (dy.t() @ xa[:, offset:offset + r]).mul_(p.scaling)
        grads += [d_a[j].to(p.lora_a.dtype), d_b.to(p.lora_b.dtype)]
        offset, j = offset + r, j + 1
    return dx, grads


class LoRAProjectionsFunction(torch.autograd.Function):
    """Several LoRA projections of one ``x`` ``[T, K]``; saves x and ``xa`` only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scalings: tuple[float, ...], *params: Optional[torch.Tensor]):
        projs = unflat(params, scalings)
        factors = cast_factors(projs, x.dtype)
        outs, xa = project_forward(x, projs, factors)
        ctx.projs, ctx.factors = projs, factors  # parameters and their casts: not activations
        ctx.save_for_backward(x, xa)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys: torch.Tensor):
        x, xa = ctx.saved_tensors
        projs = ctx.projs
        dx, grads = project_backward(x, xa, projs, dys, ctx.needs_input_grad[0], ctx.factors)
        flat_grads = []
        for i in range(len(projs)):
            flat_grads += [None, None, *grads[2 * i: 2 * i + 2]]
        return (dx, None, *flat_grads)


def lora_projections(x: torch.Tensor, projs: Sequence[Projection]) -> tuple[torch.Tensor, ...]:
    """Apply each projection to ``x`` ``[T, K]``; returns one ``[T, N_i]`` tensor per projection.

    Weights and biases must share x's dtype and device and must not require gradients; the LoRA
    factors may be in another floating dtype (cast to x's inside, gradients returned in theirs).
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
