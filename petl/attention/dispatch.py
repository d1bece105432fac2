"""Backend choice and the transformers-facing attention forward ("train sparse, infer dense").

``PETL_ATTENTION_BACKEND=reference|flex|varlen`` forces a backend when the pattern's own
``backend`` parameter is ``"auto"``; an explicit ``backend=`` argument or parameter wins over it.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from petl.attention.flex import flex_pattern_attention
from petl.attention.layout import layout_for
from petl.attention.patterns import BACKENDS, PatternConfig
from petl.attention.reference import reference_attention
from petl.attention.varlen import varlen_pattern_attention

ENV_BACKEND = "PETL_ATTENTION_BACKEND"
_IMPLS = {"reference": reference_attention, "flex": flex_pattern_attention, "varlen": varlen_pattern_attention}
_CONFIGS: dict[tuple, PatternConfig] = {}


def resolve_backend(cfg: PatternConfig, device: torch.device, backend: str | None = None) -> str:
    """Backend name: explicit argument > ``cfg.backend`` > env var > flex on CUDA / reference."""
    for choice in (backend, cfg.backend, os.environ.get(ENV_BACKEND)):
        if choice in (None, "", "auto"):
            continue
        if choice not in BACKENDS:
            raise ValueError(f"{ENV_BACKEND}={choice!r} is not a backend; use one of {BACKENDS[1:]}")
        return choice
    return "flex" if device.type == "cuda" else "reference"


def sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cfg: PatternConfig, *,
                     attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                     scaling: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Apply the training-time pattern ``cfg`` to one attention call.

    Args:
        query (Tensor): ``[B, Hq, L, D]`` (RoPE already applied).
        key, value (Tensor): ``[B, Hkv, L, D]``, GQA heads not repeated.
        cfg (PatternConfig): pattern and its parameters.
        attention_mask (Tensor, Optional): ``None`` or the boolean ``[B, 1, L, L]`` causal mask
            transformers builds for SDPA (padding, packed documents). Default: None.
        position_ids (Tensor, Optional): ``[B or 1, L]``; restarts mark packed documents.
        scaling (float, Optional): softmax scale. Default: ``D ** -0.5``.
        backend (str, Optional): force ``"reference"``, ``"flex"`` or ``"varlen"``.

    Returns:
        Tensor ``[B, L, Hq, D]``; positions outside a sample's valid span are 0.
    """
    if query.ndim != 4 or key.shape != value.shape or key.shape[0] != query.shape[0] or key.shape[2:] != query.shape[2:]:
        raise ValueError(f"expected q [B,Hq,L,D] and k/v [B,Hkv,L,D]; got q {tuple(query.shape)}, "
                         f"k {tuple(key.shape)}, v {tuple(value.shape)}")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"query heads ({query.shape[1]}) must be a multiple of key/value heads ({key.shape[1]})")
    layout = layout_for(query, attention_mask, position_ids).with_groups(cfg)
    impl = _IMPLS[resolve_backend(cfg, query.device, backend)]
    return impl(query, key, value, cfg, layout, scaling)


def config_for_module(module: torch.nn.Module, pattern: str) -> PatternConfig:
    """The PatternConfig stored by ``use_attention`` on ``module.config.petl_attention``.

    Without stored parameters (e.g. ``attn_implementation="petl_s2"`` passed to from_pretrained)
    the pattern's defaults apply.
    """
    params = getattr(getattr(module, "config", None), "petl_attention", None) or {"pattern": pattern}
    key = tuple(sorted(params.items()))
    cfg = _CONFIGS.get(key)
    if cfg is None:
        params = dict(params)
        stored = params.pop("pattern", pattern)
        if stored != pattern:
            raise ValueError(f"config.petl_attention holds {stored!r} parameters but the model runs petl_{pattern}; "
                             f"call petl.attention.use_attention(model, {pattern!r}, ...)")
        cfg = _CONFIGS[key] = PatternConfig.from_params(pattern, **params)
    return cfg


def pattern_attention_forward(pattern: str, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                              value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None = None,
                              dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function body shared by ``petl_s2`` and ``petl_sf``.

    In eval mode, and whenever q_len != kv_len (decoding with a cache), this *is* transformers'
    SDPA attention: the patterns are training-time only. Returns ``([B, L, Hq, D], None)``.
    """
    if not module.training or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    cfg = config_for_module(module, pattern)
    if dropout:
        raise ValueError(f"petl_{pattern} does not implement attention dropout ({dropout}); "
                         "set config.attention_dropout=0.0")
    if kwargs.get("softcap") is not None:
        raise ValueError(f"petl_{pattern} does not implement logit softcapping; use a model without attn softcap")
    out = sparse_attention(query, key, value, cfg, attention_mask=attention_mask,
                           position_ids=kwargs.get("position_ids"), scaling=scaling)
    return out, None
