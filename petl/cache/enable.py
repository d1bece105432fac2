"""Switch a loaded model to H2O-capable attention: `enable_h2o` / `disable_h2o`.

Two things are needed for ``model.generate(past_key_values=H2OCache(...))``:

1. the ``petl_h2o`` attention function (explicit probabilities) and a mask function, registered in
   transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` (without a mask function
   transformers skips mask creation and causality is silently lost);
2. a way for the attention function to reach the cache. transformers 5.17/5.24 do not pass the
   cache to attention functions, so ``enable_h2o`` adds a forward pre-hook to the model (a public
   torch mechanism, no patching) that records the cache of the running call on a small binding
   object shared by the model's attention modules; a post-hook clears it.
"""
from __future__ import annotations

from typing import Any

from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from petl.cache.attention import ATTENTION_NAME, h2o_attention_forward

_CACHE_KWARGS = ("past_key_values", "cache")


def register_h2o_attention() -> None:
    """Register ``petl_h2o`` in transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, h2o_attention_forward)
    # A boolean mask (or None for a plain causal batch), as for SDPA; the attention function
    # applies causality itself when it receives None.
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


class H2OBinding:
    """Carries the cache of the running forward call to the model's attention modules."""

    def __init__(self, previous_attention: Any) -> None:
        self.cache = None
        self.depth = 0
        self.previous_attention = previous_attention
        self.handles: list = []

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.depth += 1
        for name in _CACHE_KWARGS:
            if kwargs.get(name) is not None:
                self.cache = kwargs[name]
                break

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.depth -= 1
        if self.depth <= 0:
            self.depth, self.cache = 0, None


def _transformers_model(model: nn.Module) -> PreTrainedModel:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, PreTrainedModel):
        raise TypeError(f"enable_h2o needs a transformers model (or a peft model around one), "
                        f"got {type(model).__name__}")
    return base


def enable_h2o(model: nn.Module) -> nn.Module:
    """Switch ``model`` (a transformers model, or a peft model) to ``petl_h2o`` attention.

    Afterwards ``model.generate(..., past_key_values=H2OCache(...))`` evicts by attention score.
    The model also keeps working with ordinary caches and without a cache (the attention function
    is then plain eager attention with float32 softmax). Idempotent; undo with :func:`disable_h2o`.

    Returns:
        the same ``model``.
    """
    register_h2o_attention()
    base = _transformers_model(model)
    if getattr(base, "_petl_h2o_binding", None) is not None:
        return model
    previous = base.config._attn_implementation
    base.set_attn_implementation(ATTENTION_NAME)
    if base.config._attn_implementation != ATTENTION_NAME:
        raise ValueError(f"{type(base).__name__} cannot switch its attention implementation, so H2O "
                         "cannot get attention scores; use a model whose attention goes through "
                         "transformers' AttentionInterface (e.g. Llama, Mistral, Qwen2)")
    binding = H2OBinding(previous)
    for sub in base.modules():
        if isinstance(sub, PreTrainedModel):
            binding.handles.append(sub.register_forward_pre_hook(binding.before, with_kwargs=True))
            binding.handles.append(sub.register_forward_hook(binding.after, with_kwargs=True,
                                                             always_call=True))
        if isinstance(getattr(sub, "layer_idx", None), int) or sub is base:
            sub._petl_h2o_binding = binding
    return model


def disable_h2o(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_h2o`: remove the hooks and restore the previous attention."""
    base = _transformers_model(model)
    binding = getattr(base, "_petl_h2o_binding", None)
    if binding is None:
        return model
    for handle in binding.handles:
        handle.remove()
    for sub in base.modules():
        if getattr(sub, "_petl_h2o_binding", None) is binding:
            del sub._petl_h2o_binding
    base.set_attn_implementation(binding.previous_attention)
    return model


def h2o_enabled(model: nn.Module) -> bool:
    """Whether :func:`enable_h2o` is active on ``model``."""
    return getattr(_transformers_model(model), "_petl_h2o_binding", None) is not None
