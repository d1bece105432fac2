"""Tuner layers of the AST adapters: the shared base, sub-layer adapters and the pooling switch.

peft finds adapter state structurally (everything on a ``BaseTunerLayer`` except ``base_layer``),
so each layer lists its per-adapter containers in ``adapter_layer_names`` (trainable) and
``other_param_names`` (per-adapter settings). All container names start with ``audio_adapter_``,
the method's prefix, which also appears in the saved keys.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from peft.tuners.tuners_utils import BaseTunerLayer


class NotMergeableError(ValueError):
    """The adapter is not a change of the base weights (extra tokens or a non-linear block)."""


class AudioAdapterLayer(BaseTunerLayer):
    """Shared state of every AST tuner layer; concrete layers declare their own containers."""

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()

    def _init_base(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs

    def _active(self, container: Any) -> list[str]:
        """Active adapter names that have an entry in ``container`` (empty when disabled)."""
        if self.disable_adapters:
            return []
        return [name for name in self.active_adapters if name in container]

    def _place_adapter(self, adapter_name: str, inference_mode: bool) -> None:
        """Move the new adapter's state to the base layer's device, keeping it in float32.

        Adapters train in float32 on a low-precision base (float64 stays float64) (peft's usual autocast); float32 also
        keeps BatchNorm running statistics exact. Outputs are cast back to the base dtype. A new
        block takes the base layer's train/eval mode, so adding an adapter to a model in eval mode
        does not switch its BatchNorm to batch statistics.
        """
        base = self.get_base_layer()
        param = next(base.parameters(), None)
        dtype = param.dtype if param is not None and param.dtype in (torch.float32, torch.float64) else torch.float32
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter_name not in container:
                continue
            if param is not None:
                container[adapter_name] = container[adapter_name].to(device=param.device, dtype=dtype)
            if isinstance(container[adapter_name], nn.Module):  # BatchNorm follows the host model's mode
                container[adapter_name].train(base.training)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise NotMergeableError(f"{type(self).__name__} adapters add tokens or a non-linear block and cannot be "
                                "merged into the base weights; keep the PeftModel (or call unload())")

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")


@dataclass(frozen=True)
class Placement:
    """Where a sub-layer adapter sits. ``a`` is the adapter input, ``f`` the frozen sub-layer.

    parallel:   y = f(x) + Ad(a) [+ a]          a = x (before) or f(x) (after)
    sequential: y = f(Ad(x) [+ x]) (before)  or  y = Ad(f(x)) [+ f(x)] (after)

    The bracketed term is ``residual``. [I] The reference ablation code writes sequential-before as
    ``f(Ad(x)) + Ad(x)``; petl keeps the adapter's skip inside the data path (Houlsby's form), which
    makes the layer the identity change at init.
    """

    parallel: bool
    before: bool
    residual: bool


class SublayerAdapter(nn.Module, AudioAdapterLayer):
    """An adapter block around an AST sub-layer: ``attention`` (returns a tuple) or ``mlp``.

    The wrapped module receives the LayerNorm output x: ``[B, S, D]``.
    """

    adapter_layer_names = ("audio_adapter_block",)
    other_param_names = ("audio_adapter_placement",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, block: nn.Module, placement: Placement,
                 inference_mode: bool = False, **kwargs: Any) -> None:
        super().__init__()
        self._init_base(base_layer, **kwargs)
        self.audio_adapter_block = nn.ModuleDict({})
        self.audio_adapter_placement: dict[str, Placement] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, block, placement, inference_mode)

    def update_layer(self, adapter_name: str, block: nn.Module, placement: Placement,
                     inference_mode: bool = False) -> None:
        self.audio_adapter_block[adapter_name] = block
        self.audio_adapter_placement[adapter_name] = placement
        self._place_adapter(adapter_name, inference_mode)

    def _block(self, name: str, a: torch.Tensor) -> torch.Tensor:
        """``Ad(a) [+ a]`` computed in the block's dtype, returned in a's dtype."""
        block = self.audio_adapter_block[name]
        dtype = next(block.parameters()).dtype
        out = block(a.to(dtype)).to(a.dtype)
        return out + a if self.audio_adapter_placement[name].residual else out

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        names = self._active(self.audio_adapter_block)
        if not names:
            return self.base_layer(x, *args, **kwargs)
        places = {n: self.audio_adapter_placement[n] for n in names}
        inp = x
        for name in names:  # sequential-before adapters transform the sub-layer's input
            if not places[name].parallel and places[name].before:
                inp = self._block(name, inp)
        out = self.base_layer(inp, *args, **kwargs)
        is_tuple = isinstance(out, tuple)
        f_x = out[0] if is_tuple else out
        y = f_x
        for name in names:
            place = places[name]
            if place.parallel:
                y = y + self._block(name, x if place.before else f_x)
            elif not place.before:
                y = self._block(name, y)
        return (y, *out[1:]) if is_tuple else y

    def __repr__(self) -> str:
        return "audio_adapter." + super().__repr__()


class PoolingLayer(nn.Module, AudioAdapterLayer):
    """Wraps the encoder's final LayerNorm so transformers' pooler yields the configured pooling.

    ``ASTModel`` pools ``(h[:, 0] + h[:, 1]) / 2`` from this LayerNorm's output h: ``[B, S, D]``. To
    give the head the mean of all tokens (or the CLS token) without patching transformers, only
    position 1 (the distillation token, or the first prompt) is rewritten: ``h1 := 2 m - h0`` with
    ``m`` the pooled vector, so the pooler returns exactly ``m``. CLS and the patch tokens are
    unchanged. There are no parameters; the pooling follows the active adapter.
    """

    other_param_names = ("audio_adapter_pooling",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, pooling: str, **kwargs: Any) -> None:
        super().__init__()
        self._init_base(base_layer, **kwargs)
        self.audio_adapter_pooling: dict[str, str] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, pooling)

    def update_layer(self, adapter_name: str, pooling: str, inference_mode: bool = False) -> None:
        self.audio_adapter_pooling[adapter_name] = pooling

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        h = self.base_layer(x, *args, **kwargs)  # [B, S, D]
        modes = {self.audio_adapter_pooling[n] for n in self._active(self.audio_adapter_pooling)}
        if len(modes) > 1:
            raise ValueError(f"active audio adapters disagree on pooling {sorted(modes)}; activate one at a time")
        mode = modes.pop() if modes else "native"
        if mode == "native":
            return h
        pooled = h.mean(dim=1) if mode == "mean" else h[:, 0]  # [B, D]
        second = 2 * pooled - h[:, 0]
        return torch.cat([h[:, :1], second[:, None], h[:, 2:]], dim=1)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Pooling has no weights: nothing to fold; the wrapper keeps pooling while wrapped."""

    def unmerge(self) -> None:
        """Nothing was folded (see :meth:`merge`)."""

    def __repr__(self) -> str:
        return "audio_adapter." + super().__repr__()
