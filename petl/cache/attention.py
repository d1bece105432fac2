"""The ``petl_h2o`` attention function: explicit softmax that feeds column sums to the H2O cache.

SDPA and flash attention never materialise probabilities, which H2O needs. This function computes
``softmax(q k^T * scale)`` explicitly, chunked over queries so that a long prefill holds at most
``CHUNK_ELEMENTS`` logits at a time (decode is a single row), and hands the per-slot column sums to
the :class:`~petl.cache.layer.H2OLayer` of ``module.layer_idx``.

Mask: ``H2OLayer.get_mask_sizes`` makes transformers build the mask over *all* positions seen
(``[B, 1, L, seen + L]`` bool, or None for a plain causal batch). Each cached slot reads the column
of its original position (``H2OLayer.positions``), so padding and any mask pattern (e.g. a sliding
window) stay right after eviction. Without an H2O cache (a DynamicCache, or no cache) the mask is
used as is, so a model switched to ``petl_h2o`` still runs any forward correctly.

GQA: k/v arrive un-repeated ``[B, Hkv, S, D]``. A kv head's slot score is the **sum** over its
``Hq / Hkv`` query heads, because eviction happens per kv head: a slot that any of those heads
attends to strongly is worth keeping.
"""
from __future__ import annotations

import torch
from torch import nn

from petl.cache.layer import H2OLayer

ATTENTION_NAME = "petl_h2o"
#: Upper bound on the logits held at once during prefill (per chunk of queries).
CHUNK_ELEMENTS = 1 << 25


def _find_layer(module: nn.Module, kwargs: dict) -> H2OLayer | None:
    """The H2O layer of this module's layer, if the running forward uses an H2OCache.

    transformers 5.17 and 5.24 consume the cache in the attention module's own signature
    (``past_key_values`` / ``cache``) and do not forward it here, so ``enable_h2o`` installs a
    binding that carries the cache of the running forward; kwargs are checked first in case a
    model does pass the cache through.
    """
    from petl.cache.h2o import H2OCache

    cache = kwargs.get("past_key_values")
    if cache is None:
        cache = kwargs.get("cache")
    if cache is None:
        binding = getattr(module, "_petl_h2o_binding", None)
        cache = None if binding is None else binding.cache
    if not isinstance(cache, H2OCache):
        return None
    layer_idx = getattr(module, "layer_idx", None)
    if layer_idx is None or layer_idx >= len(cache.layers):
        raise ValueError(f"{type(module).__name__} has no layer_idx matching an H2OCache layer; "
                         "H2O needs attention modules that update the cache by layer_idx")
    return cache.layers[layer_idx]


def _allowed(mask: torch.Tensor | None, key_pos: torch.Tensor, query_pos: torch.Tensor,
             rows: slice, gather: bool, causal: bool) -> torch.Tensor | None:
    """Boolean ``[B|1, Hkv|1, l, S]`` of the key slots each query row may see.

    Args:
        mask: transformers' mask ``[B, 1, L, K]`` (bool, or additive float), or None.
        key_pos: original position of each key slot, ``[B, Hkv, S]`` or ``[1, 1, S]``.
        query_pos: position of each query row, ``[L]``.
        rows: the query rows of this chunk.
        gather: the mask spans all seen positions and must be read at ``key_pos``.
        causal: apply causality when no mask is given.
    """
    if mask is None:
        # A single new query sees every kept slot (all are in its past): no mask needed.
        if not causal or query_pos.numel() == 1:
            return None
        return key_pos.unsqueeze(-2) <= query_pos[rows].view(1, 1, -1, 1)
    chunk = mask[:, :1, rows]  # [B, 1, l, K]
    if chunk.dtype != torch.bool:
        chunk = chunk > torch.finfo(chunk.dtype).min / 2
    if not gather:
        return chunk
    batch = max(chunk.shape[0], key_pos.shape[0])
    heads, length = key_pos.shape[1], chunk.shape[2]
    index = key_pos.unsqueeze(-2).expand(batch, heads, length, key_pos.shape[-1])
    return chunk.expand(batch, heads, length, chunk.shape[-1]).gather(-1, index)


def h2o_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, attention_mask: torch.Tensor | None,
                          scaling: float | None = None, dropout: float = 0.0,
                          softcap: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Attention with explicit probabilities; registered as ``"petl_h2o"``.

    Args:
        module: the attention module (gives ``layer_idx``, ``is_causal``).
        query: ``[B, Hq, L, D]``.
        key, value: ``[B, Hkv, S, D]``, not repeated for GQA; with an H2OCache these are the kept
            slots followed by the ``L`` new tokens.
        attention_mask: bool ``[B, 1, L, K]`` / additive float mask, or None (pure causal).
        scaling: logit scale. Default: ``D ** -0.5``.
        dropout: attention dropout on the output path (scores never see dropout).
        softcap: optional tanh logit soft-capping (Gemma 2 style).

    Returns:
        (output ``[B, L, Hq, D]``, None).
    """
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("petl_h2o does not support attention sinks (s_aux); "
                                  "use H2O on a model without learned sinks")
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, s_len = key.shape[1], key.shape[2]
    groups = q_heads // kv_heads
    scaling = head_dim ** -0.5 if scaling is None else scaling
    layer = _find_layer(module, kwargs)
    if layer is not None:
        key_pos = layer.positions  # [B, Hkv, S]
        seen = layer.cumulative_length
    else:
        key_pos = torch.arange(s_len, device=query.device).view(1, 1, s_len)
        seen = s_len
    query_pos = torch.arange(seen - q_len, seen, device=query.device)
    gather = layer is not None and attention_mask is not None
    causal = getattr(module, "is_causal", True)

    q = query.view(batch, kv_heads, groups, q_len, head_dim)
    out = query.new_empty(batch, kv_heads, groups, q_len, value.shape[-1])
    col_sums = torch.zeros(batch, kv_heads, s_len, dtype=torch.float32, device=query.device)
    step = max(1, CHUNK_ELEMENTS // max(1, batch * q_heads * s_len))
    for start in range(0, q_len, step):
        rows = slice(start, min(start + step, q_len))
        allowed = _allowed(attention_mask, key_pos, query_pos, rows, gather, causal)
        # The last L slots are this call's tokens in order, so under causality the slots after
        # this chunk's last query are invisible: skip them (halves the prefill work).
        limit = s_len - q_len + rows.stop
        if limit < s_len and (allowed is None or (attention_mask is not None and allowed[..., limit:].any())):
            limit = s_len
        probs, chunk_out = _attend(q[:, :, :, rows], key[:, :, :limit], value[:, :, :limit],
                                   None if allowed is None else allowed[..., :limit],
                                   scaling, softcap, attention_mask is not None)
        if layer is not None:
            col_sums[..., :limit] += probs.sum(dim=(2, 3))
        if dropout > 0.0 and module.training:
            chunk_out = _attend_dropout(probs, value[:, :, :limit], dropout)
        out[:, :, :, rows] = chunk_out
    if layer is not None:
        layer.accumulate(col_sums)
    return out.view(batch, q_heads, q_len, -1).transpose(1, 2).contiguous(), None


def _attend(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor | None,
            scaling: float, softcap: float | None, may_have_empty_rows: bool
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities ``[B, Hkv, G, l, S]`` (float32) and output ``[B, Hkv, G, l, D]`` of one chunk.

    ``q`` is ``[B, Hkv, G, l, D]``, key/value ``[B, Hkv, S, D]``, allowed ``[B|1, Hkv|1, l, S]``.
    """
    batch, kv_heads, groups, n_rows, head_dim = q.shape
    s_len = key.shape[2]
    # [B*Hkv, G*l, D] @ [B*Hkv, D, S]: no broadcast, so k is never expanded per query head.
    logits = _float32_bmm(q.reshape(batch * kv_heads, groups * n_rows, head_dim),
                          key.reshape(batch * kv_heads, s_len, head_dim).transpose(1, 2))
    logits = logits.view(batch, kv_heads, groups, n_rows, s_len) * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if allowed is not None:
        allowed = allowed.unsqueeze(2)  # [B, Hkv, 1, l, S]
        logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, dim=-1)
    if allowed is not None and may_have_empty_rows:
        # Rows with no visible key (left padding) give zeros, not a uniform spread over padding.
        probs = probs * allowed
    flat = probs.to(value.dtype).view(batch * kv_heads, groups * n_rows, s_len)
    out = torch.bmm(flat, value.reshape(batch * kv_heads, s_len, value.shape[-1]))
    return probs, out.view(batch, kv_heads, groups, n_rows, -1)


_FLOAT32_OUT_OK: dict[str, bool] = {}


def _float32_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as float32. For bf16/fp16 on CUDA the product is written in float32 straight
    from the float32 accumulators (``out_dtype``), as SDPA's kernels keep their logits; rounding
    logits to bf16 first (what eager attention does) costs ~1e-2 relative error at long context."""
    if a.dtype in (torch.bfloat16, torch.float16) and a.is_cuda and _FLOAT32_OUT_OK.get("cuda", True):
        try:
            out = torch.bmm(a, b, out_dtype=torch.float32)
            _FLOAT32_OUT_OK["cuda"] = True
            return out
        except (RuntimeError, TypeError):  # torch without bmm(out_dtype=) for this dtype
            _FLOAT32_OUT_OK["cuda"] = False
    return torch.bmm(a, b).float()


def _attend_dropout(probs: torch.Tensor, value: torch.Tensor, dropout: float) -> torch.Tensor:
    """Output with attention dropout (training only; the H2O scores use the undropped probs)."""
    batch, kv_heads, groups, n_rows, s_len = probs.shape
    dropped = nn.functional.dropout(probs, p=dropout).to(value.dtype)
    out = torch.matmul(dropped.view(batch, kv_heads, groups * n_rows, s_len), value)
    return out.view(batch, kv_heads, groups, n_rows, -1)
