"""Dispatch of the gated-linear-attention core: reference loop, chunked PyTorch, or fla.

``gla(q, k, v, g, initial_state)`` is the entry point of LAWCAT's PyTorch path (attention.py);
the fused path (fused.py) calls the core directly. The core is chosen per call:

* ``PETL_LAWCAT_BACKEND`` (``reference`` | ``chunked`` | ``fla``) overrides everything;
* otherwise the module's configured backend, where ``auto`` means flash-linear-attention's
  ``chunk_gla`` on CUDA when ``fla`` is importable and petl's kernels are not switched off
  (``LawcatConfig.kernels`` / ``PETL_KERNELS``), the chunked PyTorch form on CUDA otherwise, and
  the recurrent reference on CPU (DESIGN.md principle 2);
* a single token (decoding) always takes one step of the recurrence: no chunking helps there.

flash-linear-attention is an optional dependency, imported lazily and only on CUDA
(petl/linear/fla_backend.py).
"""
from __future__ import annotations

import os

import torch

from ..kernels.switch import use_kernels
from .chunked import chunked_gla
from .fla_backend import fla_available, fla_chunk_gla
from .naive import naive_recurrent_gla

ENV_VAR = "PETL_LAWCAT_BACKEND"
_FORCEABLE = ("reference", "chunked", "fla")

__all__ = ["ENV_VAR", "fla_available", "fla_gla", "gla", "resolve_backend"]


def resolve_backend(backend: str, device: torch.device, kernels: str | None = None) -> str:
    """Return the core a call on ``device`` will use (env var > argument > auto rule).

    Args:
        backend (str): ``auto`` | ``reference`` | ``chunked`` | ``fla``.
        device (torch.device): where the tensors live.
        kernels (str, Optional): ``LawcatConfig.kernels`` (``auto`` | ``on`` | ``off``); with
            ``off`` (or ``PETL_KERNELS=off``) ``auto`` stays in PyTorch.
    """
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced:
        if forced not in _FORCEABLE:
            raise ValueError(f"{ENV_VAR}={forced!r} is not a backend; use one of {_FORCEABLE}")
        backend = forced
    if backend == "auto":
        if device.type != "cuda":
            return "reference"
        return "fla" if use_kernels(device, kernels) and fla_available() else "chunked"
    if backend == "fla":
        if device.type != "cuda":
            raise RuntimeError("LAWCAT backend 'fla' needs CUDA tensors; use 'chunked' or 'reference' on CPU")
        if not fla_available():
            raise ImportError("LAWCAT backend 'fla' needs flash-linear-attention: pip install fla-core")
    return backend


def fla_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
            initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``chunk_gla`` on any value width (the PyTorch path's ``[v, 1]``): v is zero-padded to a
    multiple of 16 columns and the padding cut off again; the padded state columns stay 0."""
    V = v.shape[-1]
    pad = (-V) % 16
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
        if initial_state is not None:
            initial_state = torch.nn.functional.pad(initial_state, (0, pad))
    o, state = fla_chunk_gla(q, k, v, g, initial_state, output_final_state=True)
    return o[..., :V], state[..., :V]


def gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
        initial_state: torch.Tensor | None = None, backend: str = "auto",
        chunk_size: int = 64, kernels: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated linear attention ``o_t = q_t^T S_t``, ``S_t = Diag(exp g_t) S_{t-1} + k_t v_t^T``.

    Args:
        q, k (torch.Tensor): feature-mapped queries/keys ``[B, T, H, F]``.
        v (torch.Tensor): values ``[B, T, H, V]``.
        g (torch.Tensor): log forget gate ``[B, T, H, F]`` (<= 0).
        initial_state (torch.Tensor, Optional): ``[B, H, F, V]``. Default: zeros.
        backend (str): ``auto`` | ``reference`` | ``chunked`` | ``fla`` (see module doc).
        chunk_size (int): chunk length of the chunked form. Default: 64.
        kernels (str, Optional): ``LawcatConfig.kernels`` for the ``auto`` rule.

    Returns:
        ``(o [B, T, H, V], final_state [B, H, F, V])``: o in float32/float64 from the reference
        and chunked forms, in q's dtype from fla; the state always float32 (float64 for float64).
    """
    if q.shape[1] == 1:
        return naive_recurrent_gla(q, k, v, g, initial_state)
    name = resolve_backend(backend, q.device, kernels)
    if name == "reference":
        return naive_recurrent_gla(q, k, v, g, initial_state)
    if name == "chunked":
        return chunked_gla(q, k, v, g, initial_state, chunk_size=chunk_size)
    return fla_gla(q, k, v, g, initial_state)
