"""Fused linear cross-entropy: the causal-LM loss without the ``[tokens, vocab]`` logits.

Rows are processed in chunks: ``logits_c = h_c W^T`` (one cuBLAS matmul into a reused buffer),
then one Triton pass per row computes ``lse`` and the loss and a second writes the gradient
``softmax - onehot`` over the logits in place, and ``dh_c = grad_c W`` (plus ``dW += grad_c^T h_c``
when the head is trainable). Since this is the end of the graph, the gradient is computed in the
forward (already divided by the number of valid rows) and the backward only multiplies the stored
``dh`` by ``grad_output``: no logits are kept
and none are recomputed. Peak extra memory is one chunk of logits (~128 MiB) plus ``dh``.

Semantics follow transformers' ``ForCausalLMLoss`` in bfloat16 training: logits in the matmul's
dtype, the softmax in float32, ``ignore_index`` rows excluded, mean over valid rows (or sum divided
by ``num_items_in_batch`` under gradient accumulation).
"""
from __future__ import annotations

import torch

from petl.kernels._triton import tl, triton

IGNORE_INDEX = -100
#: bytes of one logits chunk (rows = this / (vocab * itemsize), rounded to a multiple of 256)
CHUNK_BYTES = 1 << 27


if triton is not None:

    @triton.jit
    def _ce_rows(logits_ptr, target_ptr, loss_ptr, scale_ptr, stride_row, n_cols, ignore_index, BLOCK: tl.constexpr,
                 WRITE_GRAD: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        target = tl.load(target_ptr + row).to(tl.int64)
        # per-lane online logsumexp; the finite start value keeps padded lanes at s = 0 without inf - inf
        m = tl.zeros([BLOCK], dtype=tl.float32) - 1.0e30
        s = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
            m = m_new
        mx = tl.max(m, axis=0)
        lse = mx + tl.log(tl.sum(s * tl.exp(m - mx), axis=0))
        valid = target != ignore_index
        x_t = tl.load(base + target, mask=valid, other=0.0).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - x_t, 0.0))
        if WRITE_GRAD:
            scale = tl.load(scale_ptr).to(tl.float32)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                cmask = cols < n_cols
                x = tl.load(base + cols, mask=cmask, other=0.0).to(tl.float32)
                p = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
                p = tl.where(valid, p * scale, 0.0)
                tl.store(base + cols, p.to(logits_ptr.dtype.element_ty), mask=cmask)


def _chunk_loss_reference(logits: torch.Tensor, target: torch.Tensor, scale: torch.Tensor, ignore_index: int,
                          want_grad: bool):
    """Per-row loss and (optionally) ``scale * d loss / d logits`` written over ``logits`` (PyTorch)."""
    x = logits.float() if logits.element_size() < 4 else logits  # half types upcast, as transformers does
    lse = torch.logsumexp(x, dim=-1)
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    loss = torch.where(valid, lse - x.gather(1, safe[:, None])[:, 0], torch.zeros_like(lse))
    if want_grad:
        p = torch.exp(x - lse[:, None])
        p[torch.arange(len(safe), device=p.device), safe] -= 1.0
        p *= valid[:, None] * scale
        logits.copy_(p)
    return loss


def _chunk_loss_triton(logits: torch.Tensor, target: torch.Tensor, scale: torch.Tensor, ignore_index: int,
                       want_grad: bool):
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    block = min(4096, triton.next_power_of_2(logits.shape[1]))
    _ce_rows[(logits.shape[0],)](logits, target, loss, scale, logits.stride(0), logits.shape[1], ignore_index,
                                 BLOCK=block, WRITE_GRAD=want_grad, num_warps=8 if block >= 2048 else 4)
    return loss


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Sum of per-row CE losses of ``h W^T`` against ``target``, times ``scale`` (a 1-element tensor)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, scale: torch.Tensor,
                ignore_index: int, use_triton: bool, chunk_rows: int) -> torch.Tensor:
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want = want_dh or want_dw
        rows = h.shape[0]
        step = min(rows, chunk_rows)
        buf = torch.empty((step, weight.shape[0]), dtype=h.dtype, device=h.device)
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        losses = torch.empty(rows, dtype=acc, device=h.device)
        dh = torch.empty_like(h) if want_dh else None
        dw = torch.zeros(weight.shape, dtype=acc, device=h.device) if want_dw else None
        rows_loss = _chunk_loss_triton if use_triton else _chunk_loss_reference
        for start in range(0, rows, step):
            end = min(rows, start + step)
            logits = torch.mm(h[start:end], weight.t(), out=buf[: end - start])
            losses[start:end] = rows_loss(logits, target[start:end], scale, ignore_index, want)
            if want_dh:
                torch.mm(logits, weight, out=dh[start:end])
            if want_dw:
                dw.addmm_(logits.t().to(acc), h[start:end].to(acc))  # float32 sums: rare (trained head)
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return (losses.sum() * scale).reshape(())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # dh and dw already carry the 1/n scale; grad is 1 unless the caller scales the loss.
        dh, dw = ctx.saved_tensors
        grad = grad.to(torch.promote_types(grad.dtype, torch.float32))
        dh_out = (dh.to(grad.dtype) * grad).to(dh.dtype) if dh is not None else None
        dw_out = (dw * grad).to(ctx.weight_dtype) if dw is not None else None
        return dh_out, dw_out, None, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                         num_items_in_batch: torch.Tensor | int | None = None, ignore_index: int = IGNORE_INDEX,
                         use_triton: bool = True, chunk_rows: int | None = None) -> torch.Tensor:
    """Cross-entropy of ``h @ weight.T`` against ``target`` without materialising all logits.

    Args:
        h (Tensor): ``[N, H]`` hidden states (the lm_head input).
        weight (Tensor): ``[V, H]`` output embedding; its gradient is computed only if it requires one.
        target (Tensor): ``[N]`` int64 class ids, ``ignore_index`` for rows without a loss.
        num_items_in_batch (Tensor or int, Optional): divide the summed loss by this instead of the
            number of valid rows (transformers' gradient-accumulation normalisation). Default: None.
        use_triton (bool): the Triton row kernel (CUDA or ``TRITON_INTERPRET=1``) or PyTorch. Default: True.
        chunk_rows (int, Optional): rows per logits chunk. Default: ~128 MiB of logits.

    Returns:
        0-d float32 loss (float64 for float64 inputs).
    """
    if h.ndim != 2 or weight.ndim != 2 or h.shape[1] != weight.shape[1] or target.shape != h.shape[:1]:
        raise ValueError(f"linear_cross_entropy: expected h [N, H], weight [V, H], target [N]; got "
                         f"{tuple(h.shape)}, {tuple(weight.shape)}, {tuple(target.shape)}")
    if h.dtype != weight.dtype:
        weight = weight.to(h.dtype)
    if chunk_rows is None:
        chunk_rows = max(256, CHUNK_BYTES // (weight.shape[0] * h.element_size()) // 256 * 256)
    target = target.to(device=h.device, dtype=torch.long).contiguous()
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    if num_items_in_batch is None:
        scale = 1.0 / (target != ignore_index).sum().to(acc)
    else:
        scale = 1.0 / torch.as_tensor(num_items_in_batch, device=h.device).to(acc)
    scale = scale.reshape(1)
    return LinearCrossEntropyFunction.apply(h.contiguous(), weight, target, scale, ignore_index, use_triton, chunk_rows)


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                   shift_labels: torch.Tensor | None = None, num_items_in_batch=None,
                   ignore_index: int = IGNORE_INDEX, use_triton: bool = True) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` on hidden states: predict ``labels[t + 1]`` from ``hidden[t]``.

    hidden ``[B, L, H]``, labels ``[B, L]`` (or ``shift_labels`` already shifted).
    """
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, shift_labels.reshape(-1),
                                num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
                                use_triton=use_triton)
