"""flash-linear-attention's ``chunk_gla`` as LAWCAT's GLA core: lazy import, conventions, tuning.

fla 0.6.0's ``chunk_gla(q, k, v, g, scale, initial_state, output_final_state, ...)`` takes
``[B, T, H, K]`` queries/keys/gates and ``[B, T, H, V]`` values (q, k and v in one dtype), a
*natural-log* forget gate (fla rescales it to log2 inside), multiplies q by ``scale`` (petl passes
1.0: the Hedgehog features are not scaled) and keeps the state ``[B, H, K, V]`` in float32 (an
initial state must be float32). Its output has q's dtype; the final state is float32.

Autotuning. On its first call in a process, fla autotunes about ten Triton kernels (forward and
backward), each over 8 to 48 configurations: minutes on an H200. ``PETL_FLA_TUNING`` chooses:

* ``full`` (default): fla's own lists, untouched;
* ``short``: petl restricts each kernel that LAWCAT's ``chunk_gla`` call reaches to one or two
  configurations chosen for Hopper-class GPUs with K = V = 128 and 64-token chunks, so the
  first call compiles in seconds. fla has no setting for this (its ``FLA_CONFIG_DIR`` files reach
  only part of these kernels), so petl shortens the ``configs`` list of fla's Triton autotuner
  objects once, before their first use; this changes those kernels for the whole process, also
  for other fla ops that share them (``chunk_fwd_h``, ``chunk_bwd_dh``, ``chunk_local_cumsum``).

Set the variable before the first LAWCAT forward on CUDA; the benchmark and the GPU tests use
``short``.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import torch

ENV_TUNING = "PETL_FLA_TUNING"
TUNING_MODES = ("full", "short")

# (module, kernel) -> [(kwargs, num_warps, num_stages), ...]; see the module docstring.
_SHORT_CONFIGS: dict[tuple[str, str], list[tuple[dict, int, int]]] = {
    ("fla.ops.utils.cumsum", "chunk_local_cumsum_vector_kernel"): [({"BS": 64}, 4, 1)],
    ("fla.ops.gla.chunk", "chunk_gla_fwd_A_kernel_intra_sub_inter"): [({"BK": 64}, 2, 3), ({"BK": 64}, 4, 2)],
    ("fla.ops.gla.chunk", "chunk_gla_fwd_A_kernel_intra_sub_intra"): [({}, 4, 2)],
    ("fla.ops.common.chunk_h", "chunk_fwd_kernel_h"): [({"BK": 64, "BV": 64}, 4, 2),
                                                       ({"BK": 64, "BV": 32}, 4, 3)],
    ("fla.ops.gla.chunk", "chunk_gla_fwd_kernel_o"): [({"BK": 64, "BV": 64}, 4, 2),
                                                      ({"BK": 32, "BV": 64}, 4, 3)],
    ("fla.ops.common.chunk_h", "chunk_bwd_kernel_dh"): [({"BK": 64, "BV": 64}, 4, 2)],
    ("fla.ops.gla.chunk", "chunk_gla_bwd_kernel_intra"): [({}, 4, 2)],
    ("fla.ops.gla.chunk", "chunk_gla_bwd_kernel_dA"): [({}, 4, 2)],
    ("fla.ops.gla.chunk", "chunk_gla_bwd_kernel_dv"): [({"BK": 64, "BV": 64}, 4, 2)],
    ("fla.ops.gla.chunk", "chunk_gla_bwd_kernel_inter"): [({"BK": 64, "BV": 64}, 4, 2)],
}


def tuning_mode() -> str:
    """``$PETL_FLA_TUNING`` (``full`` when unset); raises a one-line error for other values."""
    mode = os.environ.get(ENV_TUNING, "").strip().lower() or "full"
    if mode not in TUNING_MODES:
        raise ValueError(f"{ENV_TUNING}={mode!r} is not a tuning mode; use one of {TUNING_MODES}")
    return mode


def _autotuner(obj):
    """The triton Autotuner inside a ``@heuristics``/``@autotune`` stack, or None."""
    from triton.runtime.autotuner import Autotuner

    for _ in range(4):
        if isinstance(obj, Autotuner):
            return obj
        obj = getattr(obj, "fn", None)
    return None


def _shorten_fla_autotuning() -> list[str]:
    """Replace the config lists of the kernels ``chunk_gla`` reaches; returns the names changed."""
    import importlib

    import triton

    changed = []
    for (module, name), configs in _SHORT_CONFIGS.items():
        try:
            tuner = _autotuner(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
        if tuner is None or tuner.cache:  # already tuned in this process: leave it alone
            continue
        tuner.configs = [triton.Config(dict(kw), num_warps=w, num_stages=s) for kw, w, s in configs]
        changed.append(name)
    return changed


@functools.lru_cache(maxsize=1)
def load_chunk_gla() -> Callable | None:
    """fla's ``chunk_gla`` (after applying ``PETL_FLA_TUNING``), or None when fla is absent."""
    try:
        from fla.ops.gla import chunk_gla
    except Exception:  # ImportError, or a triton/torch mismatch inside fla
        return None
    if tuning_mode() == "short":
        _shorten_fla_autotuning()
    return chunk_gla


def fla_available() -> bool:
    """Whether flash-linear-attention's ``chunk_gla`` can be imported."""
    return load_chunk_gla() is not None


def fla_chunk_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                  initial_state: torch.Tensor | None = None, output_final_state: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention ``o_t = q_t^T S_t`` through fla, in petl's conventions.

    Args:
        q, k (torch.Tensor): ``[B, T, H, K]`` features (v is cast to their dtype).
        v (torch.Tensor): ``[B, T, H, V]``.
        g (torch.Tensor): natural-log forget gate ``[B, T, H, K]`` (<= 0), kept in float32.
        initial_state (torch.Tensor, Optional): ``[B, H, K, V]`` (cast to float32).
        output_final_state (bool): return the final state. Default: True.

    Returns:
        ``(o [B, T, H, V] in q's dtype, final_state [B, H, K, V] float32 or None)``.
    """
    chunk_gla = load_chunk_gla()
    if chunk_gla is None:
        raise ImportError("LAWCAT backend 'fla' needs flash-linear-attention: pip install fla-core")
    if initial_state is not None:
        initial_state = initial_state.float()
    return chunk_gla(q, k, v.to(q.dtype), g.float(), scale=1.0, initial_state=initial_state,
                     output_final_state=output_final_state)
