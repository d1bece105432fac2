"""Kronecker-product SVD (Van Loan–Pitsianis) and factor shapes for SoKA.

A weight W of shape ``[d_out, d_in]`` with ``d_out = m1*m2`` and ``d_in = n1*n2`` is approximated by
a sum of Kronecker products ``sum_k A_k ⊗ B_k`` with ``A_k: [m1, n1]`` and ``B_k: [m2, n2]``.

Row-major convention (what torch uses): ``(A ⊗ B)[i1*m2 + i2, j1*n2 + j2] = A[i1, j1] * B[i2, j2]``.
The rearrangement ``R(W) = W.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1*n1, m2*n2)``
maps ``A ⊗ B`` to the rank-1 matrix ``vec(A) vec(B)^T`` and preserves the Frobenius norm, so the
best Kronecker-sum approximation of W with r terms is the rank-r truncated SVD of R(W)
(Eckart–Young): ``||W - W_r||_F^2 = sum_{k>r} sigma_k^2``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch


class KronShape(NamedTuple):
    """Factor shapes of one adapted ``[m1*m2, n1*n2]`` weight: A is ``[m1, n1]``, B is ``[m2, n2]``."""

    m1: int
    n1: int
    m2: int
    n2: int

    @property
    def d_out(self) -> int:
        return self.m1 * self.m2

    @property
    def d_in(self) -> int:
        return self.n1 * self.n2

    @property
    def term_params(self) -> int:
        """Trainable parameters of one Kronecker term (A_k and B_k)."""
        return self.m1 * self.n1 + self.m2 * self.n2

    @property
    def kron_rank(self) -> int:
        """The largest useful number of terms: the rank bound of R(W)."""
        return min(self.m1 * self.n1, self.m2 * self.n2)

    @property
    def is_lora(self) -> bool:
        """``[d_out, 1] ⊗ [1, d_in]``: each term is an outer product, so r terms are a rank-r LoRA."""
        return self.n1 == 1 and self.m2 == 1

    def contraction_costs(self) -> tuple[int, int]:
        """Multiply-adds per token and term of (A-first, B-first) Kronecker matvec."""
        a_first = self.m1 * self.n2 * (self.n1 + self.m2)
        b_first = self.n1 * self.m2 * (self.n2 + self.m1)
        return a_first, b_first


def factorize(dim: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dim`` into ``(a, b)`` with ``a * b == dim``.

    ``factor=-1`` picks the divisor pair closest to ``sqrt(dim)`` with the smaller factor first
    (4096 -> (64, 64), 11008 -> (86, 128), 768 -> (24, 32)); a prime ``dim`` gives ``(1, dim)``.
    ``factor=f > 0`` gives ``(f, dim // f)`` and requires ``f`` to divide ``dim``.
    """
    if dim < 1:
        raise ValueError(f"cannot factorize dimension {dim}; dimensions must be positive")
    if factor > 0:
        if dim % factor:
            raise ValueError(f"factor={factor} does not divide dimension {dim}; pick a divisor of every "
                             "targeted dimension, set shape_pattern for this module, or use factor=-1")
        return factor, dim // factor
    if factor != -1:
        raise ValueError(f"factor must be -1 (balanced) or a positive divisor, got {factor}")
    a = math.isqrt(dim)
    while dim % a:
        a -= 1
    return a, dim // a


def kron_shape(d_out: int, d_in: int, factor: int = -1) -> KronShape:
    """Factor shapes for a ``[d_out, d_in]`` weight: both sides split by :func:`factorize`."""
    m1, m2 = factorize(d_out, factor)
    n1, n2 = factorize(d_in, factor)
    return KronShape(m1, n1, m2, n2)


def lora_shape(d_out: int, d_in: int) -> KronShape:
    """The shape that turns SoKA into (PiSSA-initialised) LoRA; R(W) = W, so KPSVD = SVD."""
    return KronShape(d_out, 1, 1, d_in)


def rearrange(weight: torch.Tensor, shape: KronShape) -> torch.Tensor:
    """R(W): ``[m1*m2, n1*n2] -> [m1*n1, m2*n2]`` with R(A ⊗ B) = vec(A) vec(B)^T."""
    m1, n1, m2, n2 = shape
    return weight.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def unrearrange(matrix: torch.Tensor, shape: KronShape) -> torch.Tensor:
    """Inverse of :func:`rearrange`: ``[m1*n1, m2*n2] -> [m1*m2, n1*n2]``."""
    m1, n1, m2, n2 = shape
    return matrix.reshape(m1, n1, m2, n2).permute(0, 2, 1, 3).reshape(m1 * m2, n1 * n2)


def kron_sum(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Dense ``sum_k A_k ⊗ B_k`` for A ``[r, m1, n1]`` and B ``[r, m2, n2]`` (merge and tests only)."""
    r, m1, n1 = A.shape
    _, m2, n2 = B.shape
    if r == 0:
        return A.new_zeros(m1 * m2, n1 * n2)
    low_rank = A.reshape(r, -1).transpose(0, 1) @ B.reshape(r, -1)  # [m1*n1, m2*n2]
    return unrearrange(low_rank, KronShape(m1, n1, m2, n2))


class Kpsvd(NamedTuple):
    """Leading Kronecker components of a matrix.

    Attributes:
        u: ``[q, m1*n1]`` left singular vectors of R(W) (rows), reshaped to A_k by the caller.
        v: ``[q, m2*n2]`` right singular vectors of R(W) (rows).
        sigma: ``[q]`` Kronecker singular values, descending.
        total_energy: ``||W||_F^2`` (float), so energy fractions are exact even when only q values
            were computed.
    """

    u: torch.Tensor
    v: torch.Tensor
    sigma: torch.Tensor
    total_energy: float


def kpsvd(weight: torch.Tensor, shape: KronShape, q: int, method: str = "auto", niter: int = 4,
          oversample: int = 8, seed: int = 0) -> Kpsvd:
    """Leading ``q`` Kronecker components of ``weight`` ``[d_out, d_in]``, computed in float32.

    Args:
        weight (Tensor): ``[shape.d_out, shape.d_in]``, any float dtype and device.
        shape (KronShape): factor shapes.
        q (int): number of components wanted (clipped to ``shape.kron_rank``).
        method (str): ``"full"`` (exact ``torch.linalg.svd``), ``"randomized"`` (range finder with
            ``niter`` power iterations, ``q + oversample`` probes, seeded: reproducible) or
            ``"auto"`` (full when R(W) is small or ``q`` is a sizeable fraction of its rank).
            Default: ``"auto"``.
    """
    if tuple(weight.shape) != (shape.d_out, shape.d_in):
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not match Kronecker shape {shape}")
    matrix = rearrange(weight.detach().to(torch.float32), shape)  # [m1*n1, m2*n2]
    q = max(1, min(q, shape.kron_rank))
    small = min(matrix.shape)
    if method == "auto":
        method = "full" if small <= 512 or 2 * (q + oversample) >= small else "randomized"
    if method == "full":
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    elif method == "randomized":
        u, s, vh = _randomized_svd(matrix, min(q + oversample, small), niter, seed)
    else:
        raise ValueError(f"svd_method must be 'auto', 'full' or 'randomized', got {method!r}")
    total = float(matrix.double().square().sum())
    return Kpsvd(u[:, :q].T.contiguous(), vh[:q].contiguous(), s[:q].contiguous(), total)


def kpsvd_factors(result: Kpsvd, shape: KronShape, rank: int,
                  scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``[rank, m1, n1]`` and B ``[rank, m2, n2]`` with ``scale * sum_k A_k ⊗ B_k`` equal to the
    rank-term truncation; ``sqrt(sigma / scale)`` goes to each side so both factors have equal norms."""
    if rank > result.sigma.numel():
        raise ValueError(f"asked for {rank} Kronecker terms but only {result.sigma.numel()} were computed")
    root = (result.sigma[:rank] / scale).clamp_min(0).sqrt()[:, None]  # [rank, 1]
    A = (root * result.u[:rank]).reshape(rank, shape.m1, shape.n1)
    B = (root * result.v[:rank]).reshape(rank, shape.m2, shape.n2)
    return A, B


def _randomized_svd(matrix: torch.Tensor, q: int, niter: int,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Halko–Martinsson–Tropp range finder with QR-stabilised power iterations (float32)."""
    gen = torch.Generator(device=matrix.device).manual_seed(seed)
    probes = torch.randn(matrix.shape[1], q, generator=gen, device=matrix.device, dtype=matrix.dtype)
    basis = torch.linalg.qr(matrix @ probes).Q  # [rows, q]
    for _ in range(niter):
        basis = torch.linalg.qr(matrix.T @ basis).Q
        basis = torch.linalg.qr(matrix @ basis).Q
    u_small, s, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return basis @ u_small, s, vh
