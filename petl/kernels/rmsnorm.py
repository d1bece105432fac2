"""RMSNorm (Llama/Mistral/Qwen2 form) with a Triton forward and backward that save only x and rstd.

``y = w * cast(x * rstd)`` with ``rstd = 1 / sqrt(mean(x^2) + eps)`` computed in float32 and the
normalised value cast back to x's dtype before the weight multiply, exactly as transformers'
``LlamaRMSNorm``. The backward treats that cast as the identity:
``dx = rstd * (dn - n * mean(dn * n))`` with ``dn = dy * w`` and ``n = x * rstd``;
``dw = sum_rows(dy * cast(n))``. transformers' module keeps three float32 copies of x for its
backward; this one keeps x (its own dtype) and one float32 per row.
"""
from __future__ import annotations

import torch

from petl.kernels._triton import triton, tl, row_warps


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain PyTorch RMSNorm, the definition (same ops as transformers' ``LlamaRMSNorm``). x ``[..., H]``."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


if triton is not None:

    @triton.jit
    def _rmsnorm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, stride_x, stride_y, n_cols, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        n = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_y + cols, (w * n).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _rmsnorm_bwd(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, stride_dy, stride_x, stride_dx, n_rows, n_cols,
                     rows_per_prog, BLOCK: tl.constexpr, HAS_DW: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, rows_per_prog):
            row = (pid * rows_per_prog + i).to(tl.int64)
            live = mask & ((cols * 0 + row) < n_rows)
            dy = tl.load(dy_ptr + row * stride_dy + cols, mask=live, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + row * stride_x + cols, mask=live, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + tl.minimum(row, n_rows - 1))
            n = x * rstd
            dn = dy * w
            dx = (dn - n * (tl.sum(dn * n, axis=0) / n_cols)) * rstd
            tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=live)
            if HAS_DW:
                dw += dy * n.to(x_ptr.dtype.element_ty).to(tl.float32)
        if HAS_DW:
            tl.store(dw_ptr + pid * n_cols + cols, dw, mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm_forward(x2: torch.Tensor, weight: torch.Tensor, eps: float,
                     use_triton: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(y ``[rows, H]``, rstd ``[rows]`` float32) for rows ``x2`` ``[rows, H]`` (last dim contiguous).

    Host function shared by :class:`RMSNormFunction` and the fused decoder layer
    (:mod:`petl.kernels.lora_layer`). y has dtype ``promote(x.dtype, weight.dtype)``.
    """
    if not use_triton:
        rstd = torch.rsqrt(x2.float().pow(2).mean(-1) + eps)
        return weight * (x2.float() * rstd[:, None]).to(x2.dtype), rstd
    rows, cols = x2.shape
    block = triton.next_power_of_2(cols)
    y = torch.empty((rows, cols), dtype=torch.promote_types(x2.dtype, weight.dtype), device=x2.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x2.device)
    _rmsnorm_fwd[(rows,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), cols, eps, BLOCK=block,
                          num_warps=row_warps(block))
    return y, rstd


def rms_norm_backward(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, need_dw: bool,
                      use_triton: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dx ``[rows, H]`` in x's dtype, dw ``[H]`` in weight's dtype or None) for upstream ``dy2`` ``[rows, H]``.

    The PyTorch form computes in float32 (float64 for float64 inputs) with the formula of the
    module docstring; the cast of the normalised value is treated as the identity, as in the kernel.
    """
    if not use_triton:
        ct = torch.promote_types(x2.dtype, torch.float32)
        n = x2.to(ct) * rstd.to(ct)[:, None]
        dn = dy2.to(ct) * weight.to(ct)
        dx = ((dn - n * (dn * n).mean(-1, keepdim=True)) * rstd.to(ct)[:, None]).to(x2.dtype)
        dw = (dy2.to(ct) * n.to(x2.dtype).to(ct)).sum(0).to(weight.dtype) if need_dw else None
        return dx, dw
    rows, cols = x2.shape
    block = triton.next_power_of_2(cols)
    progs = max(1, min(rows, 512))
    per = triton.cdiv(rows, progs)
    progs = triton.cdiv(rows, per)
    dx = torch.empty_like(x2)
    dw_part = torch.empty((progs, cols), dtype=torch.float32, device=x2.device) if need_dw else rstd
    _rmsnorm_bwd[(progs,)](dy2, x2, weight, rstd, dx, dw_part, dy2.stride(0), x2.stride(0), dx.stride(0), rows,
                           cols, per, BLOCK=block, HAS_DW=bool(need_dw), num_warps=row_warps(block))
    return dx, (dw_part.sum(0).to(weight.dtype) if need_dw else None)


class RMSNormFunction(torch.autograd.Function):
    """Triton RMSNorm; saves x and rstd ``[rows]`` (float32), keeps the weight on ``ctx``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x2 = _rows(x)
        y, rstd = rms_norm_forward(x2, weight, eps)
        ctx.save_for_backward(x2, rstd)  # activations only: these pass through checkpointing's hooks
        ctx.weight, ctx.shape = weight, x.shape  # a parameter, alive anyway
        return y.view(*x.shape[:-1], x2.shape[1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(_rows(dy), x2, ctx.weight, rstd, bool(ctx.needs_input_grad[1]))
        return dx.view(ctx.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, use_triton: bool = True) -> torch.Tensor:
    """RMSNorm of ``x`` ``[..., H]`` with ``weight`` ``[H]``; Triton when ``use_triton``, else the reference.

    Output dtype is ``promote(x.dtype, weight.dtype)``, as in transformers.
    """
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: x has {x.shape[-1]} features but weight has {weight.shape[0]}")
    if use_triton:
        return RMSNormFunction.apply(x, weight, float(eps))
    return rms_norm_reference(x, weight, eps)
