"""Backend choice and the transformers-facing attention forward ("train sparse, infer dense").

Backends (all compute :func:`petl.attention.patterns.make_mask_mod`'s pattern):

* ``reference``: SDPA with a dense mask; everything, O(L^2) memory.
* ``grouped``: fused causal SDPA with the segments folded into the batch
  (:mod:`petl.kernels.attention_grouped`); static layouts (no padding, no packing).
* ``triton``: petl's Triton kernel (:mod:`petl.kernels.attention_triton`, imported lazily).
* ``flex``: FlexAttention with a per-head block mask; everything except CPU training.
* ``varlen``: ``torch.nn.attention.varlen`` segments; non-cyclic, no sinks.

Resolution, first match wins: the explicit ``backend=`` argument > the pattern's ``backend``
parameter (recipe key ``attention.backend``) > ``PETL_ATTENTION_BACKEND`` > ``PETL_KERNELS``
(``off``: reference; ``on``: triton) > automatic. Automatic on CUDA takes the first backend of
:data:`AUTO_ORDER` that supports the call, with triton moved first for static rows whose groups
are shorter than :data:`TRITON_BELOW_GROUP` (both from the H200 measurements in
``benchmarks/results/attention_kernels.json``); elsewhere the reference. A forced backend that
cannot run the call raises a one-line error with the reason and the backends that can.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from petl.attention.flex import flex_pattern_attention
from petl.attention.layout import SequenceLayout, layout_for
from petl.attention.patterns import BACKENDS, PatternConfig
from petl.attention.reference import reference_attention
from petl.attention.varlen import varlen_pattern_attention
from petl.kernels.attention_grouped import grouped_pattern_attention, grouped_unsupported, group_size_for
from petl.kernels.switch import ENV_KERNELS, kernel_mode, use_kernels

ENV_BACKEND = "PETL_ATTENTION_BACKEND"
#: automatic choice on CUDA, fastest first (H200, bf16, B=1, H=32, D=128, fwd+bwd)
AUTO_ORDER = ("grouped", "triton", "flex")
#: group sizes below which triton beats grouped on static rows: (S2, SF). Short cuDNN segments
#: leave the GPU underused, and SF's prepended sinks cost grouped a copy and misaligned lengths.
#: SF (G = L/4): triton measured fastest at 8k and 16k, grouped at 32k and 64k (runs 0 and 1 of
#: attention_kernels.json; grouped's "merge" sink mode was not faster than "square").
TRITON_BELOW_GROUP = (3072, 6144)
_IMPLS: dict[str, Callable] = {"reference": reference_attention, "flex": flex_pattern_attention,
                               "varlen": varlen_pattern_attention, "grouped": grouped_pattern_attention}
_CONFIGS: dict[tuple, PatternConfig] = {}
_TRITON: list = []  # [(attention, unsupported)] or [error text], filled on first use


def _triton_api() -> tuple[Callable, Callable]:
    """``(triton_pattern_attention, triton_unsupported)``, imported once; ImportError when unusable."""
    if not _TRITON:
        try:
            from petl.kernels.attention_triton import triton_pattern_attention, triton_unsupported
            _TRITON.append((triton_pattern_attention, triton_unsupported))
        except Exception as err:  # missing module, missing triton, or a broken install: one line
            _TRITON.append(f"petl.kernels.attention_triton does not import ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''})")
    if isinstance(_TRITON[0], str):
        raise ImportError(_TRITON[0])
    return _TRITON[0]


def unsupported_reason(name: str, cfg: PatternConfig, layout: SequenceLayout, query: torch.Tensor) -> str | None:
    """Why backend ``name`` cannot run this call (one line), or None when it can."""
    if name == "grouped":
        return grouped_unsupported(cfg, layout, query)
    if name == "triton":
        try:
            _, unsupported = _triton_api()
        except ImportError as err:
            return str(err)
        return unsupported(cfg, layout, query)
    if name == "varlen" and (cfg.cyclic or cfg.n_sink):
        return "varlen runs non-cyclic segments without sinks"
    return None


def _checked(name: str, source: str, cfg: PatternConfig, device: torch.device, query: torch.Tensor | None,
             layout: SequenceLayout | None) -> str:
    """``name`` if it can run this call (or the call is unknown), else a one-line ValueError."""
    if query is None or layout is None:
        return name
    reason = unsupported_reason(name, cfg, layout, query)
    if reason is None:
        return name
    others = [n for n in BACKENDS[1:] if n != name and unsupported_reason(n, cfg, layout, query) is None]
    raise ValueError(f"attention backend {name!r} (from {source}) cannot run this call: {reason}; "
                     f"backends that can: {', '.join(others)}")


def _auto(cfg: PatternConfig, device: torch.device, query: torch.Tensor | None,
          layout: SequenceLayout | None) -> str:
    if device.type != "cuda":
        return "reference"
    if query is None or layout is None:  # nothing known about the call: the general fast path
        return "flex"
    order = AUTO_ORDER
    if layout.static and group_size_for(cfg, layout.seq_len) < TRITON_BELOW_GROUP[cfg.n_sink > 0]:
        order = ("triton",) + tuple(n for n in AUTO_ORDER if n != "triton")
    for name in order:
        if name == "triton" and not use_kernels(device):
            continue
        if unsupported_reason(name, cfg, layout, query) is None:
            return name
    return "flex"


def resolve_backend(cfg: PatternConfig, device: torch.device, backend: str | None = None, *,
                    query: torch.Tensor | None = None, layout: SequenceLayout | None = None) -> str:
    """The backend for one call (see the module docstring for the order).

    Args:
        cfg (PatternConfig): the pattern; its ``backend`` parameter is the second choice.
        device (torch.device): where the tensors are.
        backend (str, Optional): an explicit choice (wins over everything). Default: None.
        query (Tensor, Optional), layout (SequenceLayout, Optional): the call, so that a forced
            backend is checked and ``auto`` can pick per layout; without them no check is made
            and ``auto`` on CUDA gives ``flex``.
    """
    sources = ((backend, "backend"), (cfg.backend, "the pattern's backend parameter"),
               (os.environ.get(ENV_BACKEND), ENV_BACKEND))
    for choice, source in sources:
        if choice in (None, "", "auto"):
            continue
        if choice not in BACKENDS:
            raise ValueError(f"{source}={choice!r} is not a backend; use one of {BACKENDS}")
        return _checked(choice, f"{source}={choice}", cfg, device, query, layout)
    mode = kernel_mode()
    if mode == "off":
        return "reference"
    if mode == "on":
        if query is not None:
            use_kernels(device, "on")  # one-line error when Triton cannot run here at all
        return _checked("triton", f"{ENV_KERNELS}=on", cfg, device, query, layout)
    return _auto(cfg, device, query, layout)


def backend_impl(name: str) -> Callable:
    """The attention function of backend ``name`` (``triton`` is imported here, lazily)."""
    if name == "triton":
        try:
            return _triton_api()[0]
        except ImportError as err:
            raise RuntimeError(f"attention backend 'triton' is unavailable: {err}; use 'grouped' or 'flex'") from None
    return _IMPLS[name]


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
        backend (str, Optional): force one of ``BACKENDS`` (``"auto"``: the usual resolution).

    Returns:
        Tensor ``[B, L, Hq, D]``; positions outside a sample's valid span are 0.
    """
    if query.ndim != 4 or key.shape != value.shape or key.shape[0] != query.shape[0] or key.shape[2:] != query.shape[2:]:
        raise ValueError(f"expected q [B,Hq,L,D] and k/v [B,Hkv,L,D]; got q {tuple(query.shape)}, "
                         f"k {tuple(key.shape)}, v {tuple(value.shape)}")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"query heads ({query.shape[1]}) must be a multiple of key/value heads ({key.shape[1]})")
    layout = layout_for(query, attention_mask, position_ids).with_groups(cfg)
    name = resolve_backend(cfg, query.device, backend, query=query, layout=layout)
    return backend_impl(name)(query, key, value, cfg, layout, scaling)


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
