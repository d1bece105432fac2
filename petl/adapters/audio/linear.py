"""Weight-space AST adapters, which merge: LoRA on q / v (the paper's scaling) and BitFit.

LoRA here is PETL-AST's variant: rank ``r = round(D / RR)`` and scaling ``alpha / RR`` (not the usual
``alpha / r``); with RR=64, alpha=8 on AST-B that is r=12 and scaling 0.125. BitFit trains a bias
*delta* per adapter, initialised to zero, rather than the base biases themselves: the gradient is
the same, the base model stays untouched (so several adapters and ``disable_adapter`` work), and
merging adds the delta to the bias. [I] With decoupled weight decay the delta decays towards the
pretrained bias instead of towards zero.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
from torch import nn

from peft.tuners.tuners_utils import check_adapters_to_merge

from .layer import AudioAdapterLayer


class _MergeableLayer(AudioAdapterLayer):
    """merge / unmerge by adding ``get_delta(name)`` to one base tensor (``_merge_target``)."""

    def _merge_target(self) -> torch.Tensor:
        raise NotImplementedError

    def get_delta(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        target = self._merge_target()
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in getattr(self, self.adapter_layer_names[0]):
                continue
            merged = target.data + self.get_delta(name).to(target.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"merging audio adapter {name!r} gives non-finite weights; the adapter is broken")
            target.data = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        target = self._merge_target()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in getattr(self, self.adapter_layer_names[0]):
                target.data = target.data - self.get_delta(name).to(target.dtype)

    def _pre_forward(self) -> bool:
        """Handle the merged / disabled states; True when the base layer alone gives the output."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return True
        return self.merged


class LoraLinear(nn.Module, _MergeableLayer):
    """``y = W x + b + (alpha / RR) * B A x`` on an ``nn.Linear`` (x: ``[..., d_in]``).

    A: ``[r, d_in]``, B: ``[d_out, r]``. Default init: A Kaiming-uniform, B = 0 (identity change at
    start); ``faithful``: both trunc-normal(0, 0.02), the reference's effective init.
    """

    adapter_layer_names = ("audio_adapter_lora_A", "audio_adapter_lora_B")
    other_param_names = ("audio_adapter_scaling",)

    def __init__(self, base_layer: nn.Linear, adapter_name: str, rank: int, scaling: float,
                 faithful: bool = False, inference_mode: bool = False, **kwargs: Any) -> None:
        super().__init__()
        self._init_base(base_layer, **kwargs)
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"audio LoRA adapts nn.Linear layers, not {type(base_layer).__name__}")
        self.audio_adapter_lora_A = nn.ParameterDict({})
        self.audio_adapter_lora_B = nn.ParameterDict({})
        self.audio_adapter_scaling: dict[str, float] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, rank, scaling, faithful, inference_mode)

    def update_layer(self, adapter_name: str, rank: int, scaling: float, faithful: bool = False,
                     inference_mode: bool = False) -> None:
        base = self.get_base_layer()
        a = torch.empty(rank, base.in_features)
        b = torch.empty(base.out_features, rank)
        if faithful:
            nn.init.trunc_normal_(a, std=0.02)
            nn.init.trunc_normal_(b, std=0.02)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)
        self.audio_adapter_lora_A[adapter_name] = nn.Parameter(a)
        self.audio_adapter_lora_B[adapter_name] = nn.Parameter(b)
        self.audio_adapter_scaling[adapter_name] = float(scaling)
        self._place_adapter(adapter_name, inference_mode)

    def _merge_target(self) -> torch.Tensor:
        return self.get_base_layer().weight

    def get_delta(self, name: str) -> torch.Tensor:
        """``scaling * B A``: ``[d_out, d_in]`` in float32."""
        a, b = self.audio_adapter_lora_A[name].float(), self.audio_adapter_lora_B[name].float()
        return self.audio_adapter_scaling[name] * (b @ a)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self._pre_forward():
            return result
        for name in self._active(self.audio_adapter_lora_A):
            a, b = self.audio_adapter_lora_A[name], self.audio_adapter_lora_B[name]
            update = (x.to(a.dtype) @ a.T) @ b.T  # [..., d_out]
            result = result + (self.audio_adapter_scaling[name] * update).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "audio_adapter." + super().__repr__()


class BiasDelta(nn.Module, _MergeableLayer):
    """BitFit on an ``nn.Linear`` or ``nn.LayerNorm``: ``y = base(x) + delta`` (delta: ``[d_out]``)."""

    adapter_layer_names = ("audio_adapter_bias",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, inference_mode: bool = False,
                 **kwargs: Any) -> None:
        super().__init__()
        self._init_base(base_layer, **kwargs)
        if getattr(base_layer, "bias", None) is None:
            raise TypeError(f"BitFit needs a layer with a bias; {type(base_layer).__name__} has none")
        self.audio_adapter_bias = nn.ParameterDict({})
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, inference_mode)

    def update_layer(self, adapter_name: str, inference_mode: bool = False) -> None:
        self.audio_adapter_bias[adapter_name] = nn.Parameter(torch.zeros_like(self.get_base_layer().bias,
                                                                              dtype=torch.float32))
        self._place_adapter(adapter_name, inference_mode)

    def _merge_target(self) -> torch.Tensor:
        return self.get_base_layer().bias

    def get_delta(self, name: str) -> torch.Tensor:
        return self.audio_adapter_bias[name].float()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self._pre_forward():
            return result
        for name in self._active(self.audio_adapter_bias):
            result = result + self.audio_adapter_bias[name].to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "audio_adapter." + super().__repr__()
