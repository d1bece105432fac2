"""Context extension by RoPE scaling (linear position interpolation, dynamic NTK, YaRN).

LongLoRA extends Llama-2 with linear position interpolation at factor ceil(target / native)
(attention.md §1.5); NTK and YaRN go through transformers' own ``rope_parameters``, so the scaled
model saves and reloads with stock transformers. Nothing here patches transformers: a loaded model
gets new rotary-embedding modules built by transformers' own classes from the updated config.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import torch

RopeMethod = Literal["linear", "ntk", "yarn"]
_TRANSFORMERS_TYPE = {"linear": "linear", "ntk": "dynamic", "yarn": "yarn"}


def native_context_length(config: Any) -> int:
    """Context the model was pretrained at (before any RoPE scaling recorded in its config)."""
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default" and params.get("original_max_position_embeddings"):
        return int(params["original_max_position_embeddings"])
    return int(config.max_position_embeddings)


def scaled_rope_parameters(config: Any, target_length: int, method: RopeMethod = "linear") -> tuple[dict, int]:
    """The ``rope_parameters`` and ``max_position_embeddings`` that extend ``config`` to ``target_length``.

    Linear uses LongLoRA's integer factor ceil(target / native); NTK and YaRN use target / native.
    """
    if method not in _TRANSFORMERS_TYPE:
        raise ValueError(f"RoPE scaling method {method!r} is unknown; choose linear, ntk or yarn")
    native = native_context_length(config)
    if target_length <= native:
        raise ValueError(f"target context {target_length} is not longer than the native context {native}; "
                         "nothing to extend (leave model.context_length unset)")
    old = dict(getattr(config, "rope_parameters", None) or {})
    theta = old.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    factor = float(math.ceil(target_length / native)) if method == "linear" else target_length / native
    params: dict[str, Any] = {"rope_type": _TRANSFORMERS_TYPE[method], "rope_theta": theta, "factor": factor,
                              "original_max_position_embeddings": native}
    if "partial_rotary_factor" in old:
        params["partial_rotary_factor"] = old["partial_rotary_factor"]
    max_positions = int(native * factor) if method == "linear" else int(target_length)
    return params, max_positions


def extend_context(model_or_config: Any, target_length: int, method: RopeMethod = "linear") -> Any:
    """Scale RoPE so the model (or config) handles ``target_length`` tokens; returns it.

    Example::

        model = AutoModelForCausalLM.from_pretrained(...)
        petl.extend_context(model, 8192)            # Llama-2 4k -> 8k, linear factor 2
    """
    config = getattr(model_or_config, "config", model_or_config)
    params, max_positions = scaled_rope_parameters(config, target_length, method)
    config.rope_parameters = params
    config.max_position_embeddings = max_positions
    if isinstance(model_or_config, torch.nn.Module):
        _rebuild_rotary_embeddings(model_or_config, config)
    return model_or_config


def _rebuild_rotary_embeddings(model: torch.nn.Module, config: Any) -> None:
    """Replace each rotary-embedding module with a fresh one built from the updated config."""
    targets = [(name, module) for name, module in model.named_modules()
               if type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "inv_freq")]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no rotary embedding module; RoPE scaling "
                         "applies to RoPE models (Llama, Mistral, Qwen2/3, Gemma, GPT-NeoX)")
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        sub_config = getattr(module, "config", config)
        if sub_config is not config and hasattr(sub_config, "rope_parameters"):
            sub_config.rope_parameters = config.rope_parameters
            sub_config.max_position_embeddings = config.max_position_embeddings
        fresh = type(module)(sub_config).to(device=module.inv_freq.device)
        setattr(parent, attr, fresh)
