"""petl's fused kernels: one switch (:mod:`petl.kernels.switch`) and the fused LoRA training step.

``fuse_lora(model)`` puts fused LoRA projections, Triton RMSNorm/RoPE/SwiGLU and a fused linear
cross-entropy into a Llama/Mistral/Qwen2 model (docs/kernels.md). Names are imported lazily so
that importing the switch does not import Triton.
"""
from __future__ import annotations

from typing import Any

__all__ = ["fuse_lora", "is_fused", "unfuse_lora"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from petl.kernels import fuse

        return getattr(fuse, name)
    raise AttributeError(f"module 'petl.kernels' has no attribute {name!r}")
