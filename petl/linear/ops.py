"""Dispatch of the gated-linear-attention core: reference loop, chunked PyTorch, or fla.

``gla(q, k, v, g, initial_state)`` is the one entry point the LAWCAT module calls. The
backend is chosen per call:

* ``PETL_LAWCAT_BACKEND`` (``reference`` | ``chunked`` | ``fla``) overrides everything;
* otherwise the module's configured backend, where ``auto`` means flash-linear-attention's
  ``chunk_gla`` on CUDA when ``fla`` is importable, the chunked PyTorch form on CUDA when it is
  not, and the recurrent reference on CPU (DESIGN.md principle 2);
* a single token (decoding) always takes one step of the recurrence: no chunking helps there.

flash-linear-attention is an optional dependency, imported lazily and only on CUDA.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import torch

from .chunked import chunked_gla
from .naive import naive_recurrent_gla

ENV_VAR = "PETL_LAWCAT_BACKEND"
_FORCEABLE = ("reference", "chunked", "fla")


@functools.lru_cache(maxsize=1)
def _fla_chunk_gla() -> Callable | None:
    try:
        from fla.ops.gla import chunk_gla
    except Exception:  # ImportError, or a triton/torch mismatch inside fla
        return None
    return chunk_gla


def fla_available() -> bool:
    """Whether flash-linear-attention's ``chunk_gla`` can be imported."""
    return _fla_chunk_gla() is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """Return the backend a call on ``device`` will use (env var > argument > auto rule)."""
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced:
        if forced not in _FORCEABLE:
            raise ValueError(f"{ENV_VAR}={forced!r} is not a backend; use one of {_FORCEABLE}")
        backend = forced
    if backend == "auto":
        if device.type != "cuda":
            return "reference"
        return "fla" if fla_available() else "chunked"
    if backend == "fla":
        if device.type != "cuda":
            raise RuntimeError("LAWCAT backend 'fla' needs CUDA tensors; use 'chunked' or 'reference' on CPU")
        if not fla_available():
            raise ImportError("LAWCAT backend 'fla' needs flash-linear-attention: pip install fla-core")
    return backend


def fla_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
            initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``chunk_gla`` with petl's conventions (scale 1, float32 gate and state).

    v is zero-padded to a multiple of 16 columns (the LAWCAT value carries a ones column, so
    V = head_dim + 1) and the padding is cut off again; the padded columns of the state are 0.
    """
    chunk_gla = _fla_chunk_gla()
    V = v.shape[-1]
    pad = (-V) % 16
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
        if initial_state is not None:
            initial_state = torch.nn.functional.pad(initial_state, (0, pad))
    if initial_state is not None:
        initial_state = initial_state.float()
    o, state = chunk_gla(q, k, v.to(q.dtype), g.float(), scale=1.0, initial_state=initial_state,
                         output_final_state=True)
    return o[..., :V], state[..., :V]


def gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
        initial_state: torch.Tensor | None = None, backend: str = "auto",
        chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated linear attention ``o_t = q_t^T S_t``, ``S_t = Diag(exp g_t) S_{t-1} + k_t v_t^T``.

    Args:
        q, k (torch.Tensor): feature-mapped queries/keys ``[B, T, H, F]``.
        v (torch.Tensor): values ``[B, T, H, V]``.
        g (torch.Tensor): log forget gate ``[B, T, H, F]`` (<= 0).
        initial_state (torch.Tensor, Optional): ``[B, H, F, V]``. Default: zeros.
        backend (str): ``auto`` | ``reference`` | ``chunked`` | ``fla`` (see module doc).
        chunk_size (int): chunk length of the chunked form. Default: 64.

    Returns:
        ``(o [B, T, H, V], final_state [B, H, F, V])``: o in float32/float64 from the reference
        and chunked forms, in q's dtype from fla; the state always float32 (float64 for float64).
    """
    if q.shape[1] == 1:
        return naive_recurrent_gla(q, k, v, g, initial_state)
    name = resolve_backend(backend, q.device)
    if name == "reference":
        return naive_recurrent_gla(q, k, v, g, initial_state)
    if name == "chunked":
        return chunked_gla(q, k, v, g, initial_state, chunk_size=chunk_size)
    return fla_gla(q, k, v, g, initial_state)
