"""AudioAdapterModel: the peft tuner that places PETL-AST adapters on an AST classifier."""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from peft.tuners.tuners_utils import BaseTuner

from .blocks import Bottleneck, ConformerConv, ConvPass2d, bottleneck_width, prompt_init_bound
from .config import AudioAdapterConfig
from .layer import AudioAdapterLayer, NotMergeableError, Placement, PoolingLayer, SublayerAdapter
from .linear import BiasDelta, LoraLinear
from .tokens import PrefixAttention, PromptLayer

AST_MODEL_TYPE = "audio-spectrogram-transformer"
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
_KEY_ADAPTER = r"(\.audio_adapter_[A-Za-z_]+)\.{name}(?=\.|$)"


def patch_grid(config: Any) -> tuple[int, int]:
    """(F, T): patches along frequency and time of an ``ASTConfig`` (as ``ASTEmbeddings.get_shape``)."""
    f = (config.num_mel_bins - config.patch_size) // config.frequency_stride + 1
    t = (config.max_length - config.patch_size) // config.time_stride + 1
    return f, t


class AudioAdapterModel(BaseTuner):
    """Creates PETL-AST adapters on ``ASTForAudioClassification`` (or ``ASTModel``).

    Which modules are wrapped follows from ``config.method`` (see
    :meth:`AudioAdapterConfig.target_pattern`); the encoder's final LayerNorm always carries the
    pooling switch. Several adapters may be added to one model if they share the method.
    """

    prefix: str = "audio_adapter_"
    tuner_layer_cls = AudioAdapterLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_model(self, peft_config: AudioAdapterConfig, model: nn.Module) -> None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type != AST_MODEL_TYPE:
            raise ValueError(f"AudioAdapterConfig adapts Audio Spectrogram Transformers (model_type "
                             f"{AST_MODEL_TYPE!r}), not {model_type!r}; load ASTForAudioClassification")

    def _check_new_adapter_config(self, config: AudioAdapterConfig) -> None:
        super()._check_new_adapter_config(config)
        methods = {c.method for c in self.peft_config.values()}
        if len(methods) > 1:
            raise ValueError(f"all audio adapters on one model must use the same method, got {sorted(methods)}; "
                             "put different methods on different model copies")

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # Blocks are ModuleDicts keyed by adapter name, so the name sits in the middle of the key
        # (``...mlp.audio_adapter_block.default.down.weight``); drop it wherever it follows a container.
        return re.sub(_KEY_ADAPTER.format(name=re.escape(adapter_name)), r"\1", key)

    def _create_and_replace(self, peft_config: AudioAdapterConfig, adapter_name: str, target: nn.Module,
                            target_name: str, parent: nn.Module, current_key: str, **optional_kwargs: Any) -> None:
        config = self.model.config
        base = target.get_base_layer() if isinstance(target, AudioAdapterLayer) else target
        match = _LAYER_INDEX.search(current_key)
        layer_index = int(match.group(1)) if match else None
        mode = peft_config.inference_mode
        if layer_index is None:  # the encoder's final LayerNorm
            spec: tuple = (PoolingLayer, (peft_config.pooling,))
        elif peft_config.sublayers:
            spec = (SublayerAdapter, (self._block(peft_config, config), _placement(peft_config)))
        elif peft_config.method == "prompt":
            if layer_index > 0 and not peft_config.deep:
                return
            spec = (PromptLayer, (self._tokens(peft_config, config, peft_config.num_tokens), layer_index == 0))
        elif peft_config.method == "prefix":
            half = peft_config.num_tokens // 2
            spec = (PrefixAttention, (self._tokens(peft_config, config, half),
                                      self._tokens(peft_config, config, half)))
        elif peft_config.method == "lora":
            rank = bottleneck_width(base.in_features, peft_config.reduction_rate)
            spec = (LoraLinear, (rank, peft_config.lora_alpha / peft_config.reduction_rate, peft_config.faithful))
        elif peft_config.method == "bitfit":
            spec = (BiasDelta, ())
        else:  # pragma: no cover - target_pattern selects only the modules above
            raise ValueError(f"{current_key} is not a module {peft_config.method} adapts")
        cls, args = spec
        if isinstance(target, cls):
            target.update_layer(adapter_name, *args, inference_mode=mode)
            return
        if isinstance(target, AudioAdapterLayer):
            raise ValueError(f"{current_key} already holds a {type(target).__name__}; one method per model")
        new_module = cls(target, adapter_name, *args, inference_mode=mode)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter trains only after set_adapter
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _block(peft_config: AudioAdapterConfig, config: Any) -> nn.Module:
        hidden = config.hidden_size
        width = bottleneck_width(hidden, peft_config.reduction_rate)
        if peft_config.method == "bottleneck":
            return Bottleneck(hidden, width, peft_config.dropout, peft_config.faithful)
        if peft_config.method == "conformer":
            return ConformerConv(hidden, width, peft_config.kernel_size, peft_config.dropout, peft_config.faithful)
        return ConvPass2d(hidden, width, patch_grid(config), peft_config.convpass_scale, peft_config.dropout,
                          peft_config.faithful)

    @staticmethod
    def _tokens(peft_config: AudioAdapterConfig, config: Any, count: int) -> torch.Tensor:
        """``[count, D]`` drawn from VPT's U(+-sqrt(6 / (3 p^2 + D))) (the reference keeps it in faithful mode)."""
        patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
        bound = prompt_init_bound(patch, config.hidden_size)
        return torch.empty(count, config.hidden_size).uniform_(-bound, bound)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        if not hasattr(new_module, "base_layer") and not hasattr(new_module, "weight"):
            # Unloading: peft's version re-ties ``weight``/``bias``, which AST sub-layers (ASTMLP,
            # ASTAttention, ASTLayer) and the head (ASTMLPHead) do not have; put the module back as is.
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: list[str] | None = None):
        if merge:
            names = adapter_names or self.active_adapters
            for name in names:
                config = self.peft_config[name]
                if not config.mergeable:
                    raise NotMergeableError(f"audio adapter {name!r} ({config.method}) is not a weight change and "
                                            "cannot be merged; keep the PeftModel or call unload()")
                if config.pooling != "native":
                    raise NotMergeableError(f"audio adapter {name!r} pools with {config.pooling!r}, which a plain "
                                            "ASTForAudioClassification cannot express; use pooling='native' to merge")
        return super()._unload_and_optionally_merge(merge=merge, progressbar=progressbar, safe_merge=safe_merge,
                                                    adapter_names=adapter_names)


def _placement(config: AudioAdapterConfig) -> Placement:
    return Placement(parallel=config.placement == "parallel" or config.method == "convpass",
                     before=config.position == "before" or config.method == "convpass",
                     residual=bool(config.residual) and config.method != "convpass")
