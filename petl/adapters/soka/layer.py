"""SoKA tuner layer: ``y = W0 x + b + s * sum_k (A_k ⊗ B_k) x - s * sum_k (A0_k ⊗ B0_k) x``.

The second sum exists only for ``init_weights="weight"`` adapters: A0, B0 are frozen copies of
the initial factors (the top Kronecker components of W0), so ``W0 - s * sum A0 ⊗ B0`` is the frozen
residual of the PiSSA-style init and the output equals the base model at init (to float rounding:
both sums run through the same GEMMs). petl keeps the residual implicit instead of overwriting
W0 with it, because then

* the base weights never change: ``PeftModel.from_pretrained(untouched_base, path)`` rebuilds the
  trained model bit for bit from the saved A, B, A0, B0 (no conversion step, unlike peft's PiSSA);
* ``disable_adapter()`` gives the base model, and several named adapters never interfere.

The frozen sum shares the trainable sum's GEMMs (R more terms in the forward and in the input
gradient; A0, B0 get no gradient). Merging folds ``s * (sum A ⊗ B - sum A0 ⊗ B0)`` into W0.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn

from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from .kpsvd import KronShape, kron_sum
from .matvec import kron_matvec


class SokaLayer(BaseTunerLayer):
    """State of SoKA adapters on one layer, keyed by adapter name.

    ``soka_A[name]``: ``[r, m1, n1]`` and ``soka_B[name]``: ``[r, m2, n2]`` (trainable);
    ``soka_A0`` / ``soka_B0``: their initial values (frozen buffers, ``init_weights="weight"`` only).
    """

    adapter_layer_names = ("soka_A", "soka_B")
    other_param_names = ("soka_A0", "soka_B0", "soka_shape", "soka_rank", "soka_scale")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.soka_A = nn.ParameterDict({})
        self.soka_B = nn.ParameterDict({})
        self.soka_A0 = BufferDict({}, persistent=True)
        self.soka_B0 = BufferDict({}, persistent=True)
        self.soka_shape: dict[str, KronShape] = {}
        self.soka_rank: dict[str, int] = {}
        self.soka_scale: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"SoKA adapts torch.nn.Linear layers, not {type(base).__name__}; "
                            "remove this module from target_modules")
        self.in_features, self.out_features = base.in_features, base.out_features

    def update_layer(self, adapter_name: str, shape: KronShape, A: torch.Tensor, B: torch.Tensor,
                     scale: float, residual: bool, inference_mode: bool = False) -> None:
        """Add adapter ``adapter_name`` with initial factors A ``[r, m1, n1]``, B ``[r, m2, n2]``.

        ``residual=True`` also stores frozen copies so the adapter starts as the identity
        (``init_weights="weight"``).
        """
        if (shape.d_out, shape.d_in) != (self.out_features, self.in_features):
            raise ValueError(f"Kronecker shape {tuple(shape)} does not fit a {self.out_features}x"
                             f"{self.in_features} layer; fix shape_pattern for this module")
        self.soka_shape[adapter_name] = shape
        self.soka_rank[adapter_name] = A.shape[0]
        self.soka_scale[adapter_name] = float(scale)
        self.soka_A[adapter_name] = nn.Parameter(A.detach().clone())
        self.soka_B[adapter_name] = nn.Parameter(B.detach().clone())
        if residual:
            self.soka_A0[adapter_name] = A.detach().clone()
            self.soka_B0[adapter_name] = B.detach().clone()
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _add_adapter(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        """``result + s * sum A ⊗ B x - s * sum A0 ⊗ B0 x`` (x: ``[..., d_in]``, result: ``[..., d_out]``)."""
        scale = self.soka_scale[name]
        A = self.soka_A[name] if scale == 1.0 else self.soka_A[name] * scale
        subtract = None
        if name in self.soka_A0:
            A0 = self.soka_A0[name] if scale == 1.0 else self.soka_A0[name] * scale
            subtract = (A0, self.soka_B0[name])
        return kron_matvec(x, A, self.soka_B[name], subtract, accumulate=result).to(result.dtype)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """Dense ``[d_out, d_in]`` change of the effective weight (computed in float32)."""
        scale = self.soka_scale[adapter]
        delta = kron_sum(self.soka_A[adapter].float(), self.soka_B[adapter].float())
        if adapter in self.soka_A0:
            delta = delta - kron_sum(self.soka_A0[adapter].float(), self.soka_B0[adapter].float())
        return (scale * delta).to(self.get_base_layer().weight.dtype)


class SokaLinear(nn.Module, SokaLayer):
    """``nn.Linear`` wrapped with one or more SoKA adapters."""

    def __init__(self, base_layer: nn.Linear, adapter_name: str, shape: KronShape, A: torch.Tensor,
                 B: torch.Tensor, scale: float, residual: bool, inference_mode: bool = False,
                 **kwargs: Any) -> None:
        super().__init__()
        SokaLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, shape, A, B, scale, residual, inference_mode)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold the active (or given) adapters into the base weight."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight = self.get_base_layer().weight
        for name in adapter_names:
            if name not in self.soka_A:
                continue
            delta = self.get_delta_weight(name)
            if safe_merge:
                merged = weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"merging SoKA adapter {name!r} gives non-finite weights; the adapter is broken")
                weight.data = merged
            else:
                weight.data += delta
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter again (in reverse order of merging)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.soka_A:
                weight.data -= self.get_delta_weight(name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # x: [..., d_in] -> [..., d_out]
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name in self.soka_A:
                result = self._add_adapter(x, result, name)
        return result

    def __repr__(self) -> str:
        return "soka." + super().__repr__()
