"""Registration with transformers and :func:`use_attention`, the one public switch.

Each pattern is registered twice: in ``AttentionInterface`` (the attention function) and in
``AttentionMaskInterface``. Without the mask entry transformers skips mask creation and the
function receives ``attention_mask=None`` even for padded or packed batches, silently dropping
causality and padding. The mask entry is transformers' own ``sdpa_mask``, so eval mode receives
exactly what SDPA would and runs SDPA.
"""
from __future__ import annotations

from typing import Any

from transformers import AttentionInterface, PreTrainedConfig, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from petl.attention.patterns import PATTERNS, PatternConfig
from petl.attention.shifted import NAME as S2_NAME, petl_s2_attention
from petl.attention.sink import NAME as SF_NAME, petl_sf_attention

IMPLEMENTATIONS = {"s2": S2_NAME, "sf": SF_NAME}
_FUNCTIONS = {S2_NAME: petl_s2_attention, SF_NAME: petl_sf_attention}
CONFIG_KEY = "petl_attention"


def register() -> None:
    """Register ``petl_s2``/``petl_sf`` with transformers (idempotent; runs on import)."""
    for name, fn in _FUNCTIONS.items():
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, sdpa_mask)


def _base_model(model: Any) -> PreTrainedModel:
    """The transformers model inside ``model`` (a PeftModel or a PreTrainedModel)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, PreTrainedModel):
        raise TypeError(f"use_attention needs a transformers PreTrainedModel or a PeftModel, got {type(model).__name__}")
    return base


def _configs(base: PreTrainedModel) -> list[PreTrainedConfig]:
    """Every distinct config reachable from the model's modules (text sub-configs included)."""
    seen: dict[int, PreTrainedConfig] = {id(base.config): base.config}
    for module in base.modules():
        cfg = getattr(module, "config", None)
        if isinstance(cfg, PreTrainedConfig):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


def use_attention(model: Any, pattern: str, **params: Any) -> Any:
    """Switch a loaded model's attention to a training-time pattern, or back to SDPA.

    Args:
        model: a transformers ``PreTrainedModel`` or a peft ``PeftModel`` wrapping one.
        pattern (str): ``"s2"`` (LongLoRA), ``"sf"`` (SinkLoRA) or ``"full"`` (plain SDPA).
        **params: :class:`~petl.attention.patterns.PatternConfig` fields (``group_ratio``,
            ``group_size``, ``cyclic``, ``shift_head_fraction``, ``n_sink``,
            ``sink_bidirectional``, ``backend``), validated here with one-line errors.

    The parameters are stored as a dict on ``config.petl_attention`` (where the attention
    function reads them; it also lands in a saved ``config.json``, harmlessly). The pattern is
    used only while the model is in ``train()`` mode; ``eval()`` runs SDPA.

    Returns:
        ``model`` (modified in place), for chaining.

    Example:
        >>> model = use_attention(model, "sf", n_sink=4, group_ratio=0.25)
    """
    base = _base_model(model)
    if pattern == "full":
        if params:
            raise ValueError(f"pattern 'full' takes no parameters, got {sorted(params)}")
        base.set_attn_implementation("sdpa")
        for cfg in _configs(base):
            if hasattr(cfg, CONFIG_KEY):
                delattr(cfg, CONFIG_KEY)
        return model
    if pattern not in PATTERNS:
        raise ValueError(f"unknown attention pattern {pattern!r}; choose one of {PATTERNS + ('full',)}")
    stored = PatternConfig.from_params(pattern, **params).to_dict()
    register()
    name = IMPLEMENTATIONS[pattern]
    base.set_attn_implementation(name)
    if base.config._attn_implementation != name:
        raise ValueError(f"{type(base).__name__} does not route attention through transformers' AttentionInterface, "
                         f"so {name} cannot be used with it")
    for cfg in _configs(base):
        setattr(cfg, CONFIG_KEY, dict(stored))
    return model


def active_pattern(model: Any) -> PatternConfig | None:
    """The pattern a model trains with, or None when it runs another attention."""
    base = _base_model(model)
    for pattern, name in IMPLEMENTATIONS.items():
        if base.config._attn_implementation == name:
            params = dict(getattr(base.config, CONFIG_KEY, None) or {"pattern": pattern})
            params.pop("pattern", None)
            return PatternConfig.from_params(pattern, **params)
    return None
