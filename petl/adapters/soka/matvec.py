"""Kronecker-sum matvec ``y = c + sum_k (A_k ⊗ B_k) x - sum_k (A0_k ⊗ B0_k) x`` without building ΔW.

With x reshaped to ``X: [n1, n2]`` (row-major), ``(A ⊗ B) x = vec(A X B^T)``. Two contraction
orders exist; per token and term they cost (multiply-adds)

* B first (``Z = X B^T``, then ``A Z``): ``n1*m2*(n2 + m1)``
* A first (``Z = A X``, then ``Z B^T``): ``m1*n2*(n1 + m2)``

against ``d_out*d_in`` for the dense product. At adapter ranks the work is memory-bound (the
intermediate Z has ``R*n1*m2`` values per token), and the A-first order costs two extra
transposes of x and y, so :func:`kron_matvec` takes it only when it saves more than half the
multiply-adds (e.g. never for balanced square factors, always for LoRA-shaped ones transposed).

One autograd Function does the whole adapter of a layer:

* the trainable sum and the frozen initial sum (``init_weights="weight"``) share one GEMM over x
  (``[B | B0]``) and one batched GEMM that also adds the base layer's output ``c`` (cuBLAS epilogue);
* it saves only x and the factors, and recomputes the trainable part of Z in the backward (one
  GEMM) instead of keeping ``R*n1*m2`` values per token: SoKA's activation memory equals LoRA's;
* the frozen factors get no gradient computation.

Reference semantics (what the tests compare against): ``c + x @ (Σ torch.kron(A_k, B_k) - Σ torch.kron(A0_k, B0_k)).T``.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch

from .kpsvd import KronShape

Order = Literal["auto", "a_first", "b_first"]


def kron_matvec(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                subtract: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                accumulate: Optional[torch.Tensor] = None, order: Order = "auto") -> torch.Tensor:
    """``accumulate + sum_k (A_k ⊗ B_k) x - sum_k (A0_k ⊗ B0_k) x`` for every row of ``x``.

    Args:
        x (Tensor): ``[..., n1*n2]``.
        A (Tensor): ``[R, m1, n1]``; B (Tensor): ``[R, m2, n2]``.
        subtract (tuple[Tensor, Tensor], Optional): frozen ``(A0 [R0, m1, n1], B0 [R0, m2, n2])``
            whose sum is subtracted; they receive no gradient. Default: None.
        accumulate (Tensor, Optional): ``[..., m1*m2]`` added to the result (the base layer's
            output). Default: None.
        order (str): ``"a_first"``, ``"b_first"`` or ``"auto"``. Default: ``"auto"``.

    Returns:
        ``[..., m1*m2]`` in the compute dtype: the autocast dtype when autocast is on, else x's
        dtype when it is float16/bfloat16 (the float32 factors are cast down; their gradients
        flow back in float32), else the factors' dtype.
    """
    R, m1, n1 = A.shape
    _, m2, n2 = B.shape
    if x.shape[-1] != n1 * n2:
        raise ValueError(f"input feature size {x.shape[-1]} does not match the Kronecker input size "
                         f"{n1}*{n2}; the adapter was built for another layer")
    if order == "auto":
        a_cost, b_cost = KronShape(m1, n1, m2, n2).contraction_costs()
        order = "a_first" if 2 * a_cost < b_cost else "b_first"
    if order not in ("a_first", "b_first"):
        raise ValueError(f"order must be 'auto', 'a_first' or 'b_first', got {order!r}")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    elif x.dtype in (torch.float16, torch.bfloat16):
        dtype = x.dtype
    else:
        dtype = A.dtype
    lead = x.shape[:-1]
    with torch.autocast(device_type, enabled=False):
        X = x.to(dtype).reshape(-1, n1, n2)  # [N, n1, n2]
        C = None if accumulate is None else accumulate.to(dtype).reshape(-1, m1, m2)  # [N, m1, m2]
        A0, B0 = (None, None) if subtract is None else (subtract[0].to(dtype), subtract[1].to(dtype))
        if order == "b_first":
            Y = _KronMatvec.apply(X, A.to(dtype), B.to(dtype), A0, B0, C)  # [N, m1, m2]
        else:  # A X B^T = (B X^T A^T)^T: the A-first order is the B-first kernel on transposes
            Ct = None if C is None else C.transpose(1, 2)
            Y = _KronMatvec.apply(X.transpose(1, 2).contiguous(), B.to(dtype), A.to(dtype), B0, A0, Ct)
            Y = Y.transpose(1, 2)
    return Y.reshape(*lead, m1 * m2)


def _left_matmul(M: torch.Tensor, Z: torch.Tensor, C: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``C[n] + M @ Z[n]`` for every n: M ``[p, K]``, Z ``[N, K, c]``, C ``[N, p, c]`` -> ``[N, p, c]``.

    Explicit (b)addbmm on a stride-0 expansion of M: ``torch.matmul`` would fold the batch into
    rows and copy Z first.
    """
    N, K, c = Z.shape
    if c == 1:  # LoRA-shaped factors: one GEMM instead of N matrix-vector products
        out = Z.reshape(N, K) @ M.T if C is None else torch.addmm(C.reshape(N, -1), Z.reshape(N, K), M.T)
        return out.unsqueeze(-1)
    Me = M.expand(N, *M.shape)
    return torch.bmm(Me, Z) if C is None else torch.baddbmm(C, Me, Z)


def _flat(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A2 [m1, n1*R]`` with ``A2[l, i*R + r] = A[r, l, i]`` and ``Bm [n2, R*m2]`` with ``Bm[j, r*m2 + k] = B[r, k, j]``."""
    R, m1, n1 = A.shape
    _, m2, n2 = B.shape
    return A.permute(1, 2, 0).reshape(m1, n1 * R), B.permute(2, 0, 1).reshape(n2, R * m2)


class _KronMatvec(torch.autograd.Function):
    """``Y[n] = C[n] + sum_k A_k X[n] B_k^T - sum_k A0_k X[n] B0_k^T``, contracting B first.

    Shapes: X ``[N, n1, n2]``, A ``[R, m1, n1]``, B ``[R, m2, n2]``, A0/B0 like A/B with R0 terms
    (or None), C ``[N, m1, m2]`` (or None) -> Y ``[N, m1, m2]``. With ``Rt = R + R0`` terms
    stacked as ``[A; -A0]`` and ``[B; B0]``: ``Z = X.view(N*n1, n2) @ Bm`` is ``[N, n1, Rt, m2]``,
    read as ``[N, n1*Rt, m2]``, and ``Y[n] = C[n] + A2 @ Z[n]``: no copy of Z is ever made.
    """

    @staticmethod
    def forward(ctx, X, A, B, A0, B0, C):
        ctx.save_for_backward(X, A, B, A0, B0)
        ctx.has_c = C is not None
        A_all, B_all = _stack(A, B, A0, B0)
        A2, Bm = _flat(A_all, B_all)
        N, n1, n2 = X.shape
        Z = (X.reshape(N * n1, n2) @ Bm).view(N, n1 * A_all.shape[0], B.shape[1])
        return _left_matmul(A2, Z, C)

    @staticmethod
    def backward(ctx, gY):
        X, A, B, A0, B0 = ctx.saved_tensors
        N, n1, n2 = X.shape
        R, m1, _ = A.shape
        m2 = B.shape[1]
        gY = gY.contiguous()
        A_all, B_all = _stack(A, B, A0, B0)
        Rt = A_all.shape[0]
        A2_all, Bm_all = _flat(A_all, B_all)
        gZ = _left_matmul(A2_all.T, gY).view(N * n1, Rt * m2)  # rows (n, i), columns (r, k)
        X2 = X.reshape(N * n1, n2)
        gX = gA = gB = None
        if ctx.needs_input_grad[0]:
            gX = (gZ @ Bm_all.T).view(N, n1, n2)
        if ctx.needs_input_grad[2]:
            gBm = X2.T @ gZ[:, : R * m2]  # trainable terms are the first R of every row
            gB = gBm.view(n2, R, m2).permute(1, 2, 0)
        if ctx.needs_input_grad[1]:
            _, Bm = _flat(A, B)
            Z = (X2 @ Bm).view(N, n1 * R, m2)  # recomputed trainable intermediate
            # sum_n gY[n] @ Z[n]^T as one GEMM contracting over (n, k)
            gA2 = gY.transpose(0, 1).reshape(m1, N * m2) @ Z.transpose(1, 2).reshape(N * m2, n1 * R)
            gA = gA2.view(m1, n1, R).permute(2, 0, 1)
        return gX, gA, gB, None, None, (gY if ctx.has_c and ctx.needs_input_grad[5] else None)


def _stack(A, B, A0, B0) -> tuple[torch.Tensor, torch.Tensor]:
    if A0 is None:
        return A, B
    return torch.cat([A, -A0]), torch.cat([B, B0])
