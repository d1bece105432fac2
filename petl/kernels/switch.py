"""One switch for all of petl's fused kernels: ``PETL_KERNELS=auto|on|off``.

Every fused kernel in petl has a plain PyTorch reference that defines its meaning. Dispatch
picks the kernel on CUDA when Triton is importable and the reference elsewhere (``auto``);
``off`` forces the references everywhere (debugging, bisecting a numerical difference) and
``on`` forces the kernels (on a CPU this needs ``TRITON_INTERPRET=1``, Triton's interpreter,
which is how CI checks kernel logic without a GPU). A per-call or per-recipe setting
(``attention.backend``, ``train.kernels``) overrides the environment variable.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

ENV_KERNELS = "PETL_KERNELS"
KERNEL_MODES = ("auto", "on", "off")


def kernel_mode(explicit: str | None = None) -> str:
    """The effective mode: ``explicit`` (unless None/"auto") > ``$PETL_KERNELS`` > ``"auto"``."""
    for choice, where in ((explicit, "kernels setting"), (os.environ.get(ENV_KERNELS), ENV_KERNELS)):
        if choice in (None, "", "auto"):
            continue
        if choice not in KERNEL_MODES:
            raise ValueError(f"{where}={choice!r} is not a kernel mode; use one of {KERNEL_MODES}")
        return choice
    return "auto"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is optional on CPU installs).

    Cached: dispatch asks on every attention, MLP and norm forward, and without Triton installed an
    uncached ``find_spec`` would search ``sys.path`` each time.
    """
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_kernels(device: torch.device, explicit: str | None = None) -> bool:
    """Whether fused kernels run for tensors on ``device``.

    ``auto``: on CUDA with Triton installed. ``on``: always; raises a one-line error when the
    kernels cannot run here (no Triton, or a CPU tensor without ``TRITON_INTERPRET=1``).
    ``off``: never.
    """
    mode = kernel_mode(explicit)
    if mode == "off":
        return False
    if mode == "auto":
        return device.type == "cuda" and triton_available()
    if not triton_available():
        raise RuntimeError(f"{ENV_KERNELS}=on but Triton is not installed; pip install 'petl-toolkit[triton]' "
                           f"or set {ENV_KERNELS}=auto")
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(f"{ENV_KERNELS}=on with {device.type} tensors needs TRITON_INTERPRET=1 (Triton's CPU "
                           f"interpreter); or set {ENV_KERNELS}=auto to use the PyTorch references here")
    return True
