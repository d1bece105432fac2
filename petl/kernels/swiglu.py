"""SwiGLU element-wise part: ``h = silu(g) * u`` and its backward, one pass each.

Used inside the fused LoRA MLP (:mod:`petl.kernels.lora_mlp`), which owns the buffers; these are
host functions, not autograd Functions. The backward recomputes ``h`` (needed for the down
projection's LoRA gradient) in the same pass that produces ``dg`` and ``du``:
``s = sigmoid(g)``, ``du = dh * g * s``, ``dg = dh * u * s * (1 + g * (1 - s))``.
All arithmetic is float32 with one rounding per output (transformers rounds silu(g) first).
"""
from __future__ import annotations

import torch

from petl.kernels._triton import elementwise_grid, tl, triton

BLOCK = 1024


def swiglu_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` in plain PyTorch (the definition used by transformers' Llama MLP)."""
    return torch.nn.functional.silu(g) * u


def swiglu_backward_reference(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor):
    """(h, dg, du) for upstream ``dh``, computed in float32 (float64 inputs stay float64), cast to g's dtype."""
    g32, u32, dh32 = (t.float() if t.element_size() < 4 else t for t in (g, u, dh))
    s = torch.sigmoid(g32)
    silu = g32 * s
    dg = dh32 * u32 * s * (1 + g32 * (1 - s))
    return (silu * u32).to(g.dtype), dg.to(g.dtype), (dh32 * silu).to(g.dtype)


if triton is not None:

    @triton.jit
    def _swiglu_fwd(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(h_ptr + offs, (g * tl.sigmoid(g) * u).to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd(dh_ptr, g_ptr, u_ptr, h_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
        # h_ptr may alias dh_ptr and dg_ptr/du_ptr may alias g_ptr/u_ptr: every element is read
        # before it is written, by the same program.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        silu = g * s
        tl.store(h_ptr + offs, (silu * u).to(h_ptr.dtype.element_ty), mask=mask)
        tl.store(dg_ptr + offs, (dh * u * s * (1.0 + g * (1.0 - s))).to(dg_ptr.dtype.element_ty), mask=mask)
        tl.store(du_ptr + offs, (dh * silu).to(du_ptr.dtype.element_ty), mask=mask)


def _check(*ts: torch.Tensor) -> None:
    shape = ts[0].shape
    for t in ts:
        if t.shape != shape or not t.is_contiguous():
            raise ValueError(f"swiglu kernels need contiguous tensors of one shape; got {[tuple(x.shape) for x in ts]}")


def swiglu(g: torch.Tensor, u: torch.Tensor, use_triton: bool = True) -> torch.Tensor:
    """``silu(g) * u``; g, u ``[..., I]`` contiguous, same shape and dtype."""
    if not use_triton:
        return swiglu_reference(g, u)
    _check(g, u)
    h = torch.empty_like(g)
    _swiglu_fwd[elementwise_grid(g.numel(), BLOCK)](g, u, h, g.numel(), BLOCK=BLOCK)
    return h


def swiglu_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, use_triton: bool = True,
                    inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, dg, du) for upstream ``dh``.

    ``h`` is written over ``dh`` (the caller's own buffer, consumed here); with ``inplace`` the
    gradients overwrite ``g`` and ``u`` (when the caller recomputed them and needs them no more).
    """
    if not use_triton:
        return swiglu_backward_reference(dh, g, u)
    _check(dh, g, u)
    dg, du = (g, u) if inplace else (torch.empty_like(g), torch.empty_like(u))
    _swiglu_bwd[elementwise_grid(g.numel(), BLOCK)](dh, g, u, dh, dg, du, g.numel(), BLOCK=BLOCK)
    return dh, dg, du
