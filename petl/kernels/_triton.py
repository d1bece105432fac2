"""Optional Triton import shared by petl's kernels: ``triton``/``tl`` are None when it is absent.

Kernel modules define their ``@triton.jit`` functions only when Triton imports, so that petl (and
the PyTorch references next to each kernel) work on installs without it.
"""
from __future__ import annotations

try:  # optional dependency: pip install 'petl-toolkit[triton]'
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on installs without triton
    triton = None
    tl = None


def row_warps(block: int) -> int:
    """Warps for a kernel that reduces one row of ``block`` elements per program."""
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def elementwise_grid(n: int, block: int) -> tuple[int]:
    """1-D launch grid covering ``n`` elements in blocks of ``block``."""
    return ((n + block - 1) // block,)
