"""Constant-size decoding state for LAWCAT layers through transformers' Cache API.

A converted layer needs, per sequence: the last ``K-1`` q and k inputs of its convolution, the
gated-linear-attention state ``[H, F, D+1]`` (float32; the last column is the normaliser) and,
with the optional softmax window, the last W RoPE'd keys, values, feature-mapped keys, gates and
padding flags. None of it grows with the sequence.

:class:`LawcatCacheLayer` is a ``CacheLayerMixin`` (the 5.x per-layer cache interface, present in
5.17 and 5.24), so ``Cache.get_seq_length`` and mask sizing keep working: it counts the tokens it
has seen and reports the same mask sizes as a ``DynamicLayer``. :class:`LawcatCache` is a
``DynamicCache`` whose converted layers are LAWCAT layers. ``model.generate`` builds a plain
``DynamicCache``; :func:`lawcat_cache_layer` then puts a LAWCAT layer into the (still empty)
slot of each converted layer on its first call, so generation works without extra arguments.
"""
from __future__ import annotations

from typing import Iterable

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicCache


class LawcatCacheLayer(CacheLayerMixin):
    """Per-layer LAWCAT decoding state (conv inputs, linear-attention state, window buffers)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.conv_states: dict[str, torch.Tensor] = {}      # "q", "k": [B, H*d, K-1]
        self.recurrent_state: torch.Tensor | None = None    # [B, H, F, D+1]
        self.window: dict[str, torch.Tensor] = {}           # [B, <=W, ...] per buffer
        self.seen_tokens = 0
        self.device: torch.device | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise RuntimeError(
            "layer is a LAWCAT (linear attention) layer: it keeps a recurrent state, not keys and "
            "values; call it through petl.linear.LawcatAttention, not softmax attention")

    def update_state(self, num_new_tokens: int, conv_states: dict[str, torch.Tensor],
                     recurrent_state: torch.Tensor, window: dict[str, torch.Tensor]) -> None:
        """Replace the state after a forward over ``num_new_tokens`` tokens."""
        self.conv_states = {k: v.detach() for k, v in conv_states.items()}
        self.recurrent_state = recurrent_state.detach()
        self.window = {k: v.detach() for k, v in window.items()}
        self.seen_tokens += num_new_tokens
        self.device = recurrent_state.device
        self.is_initialized = True

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def state_nbytes(self) -> int:
        """Bytes held by this layer's state (constant in the sequence length)."""
        tensors = list(self.conv_states.values()) + list(self.window.values())
        if self.recurrent_state is not None:
            tensors.append(self.recurrent_state)
        return sum(t.numel() * t.element_size() for t in tensors)

    def _map(self, fn) -> None:
        self.conv_states = {k: fn(v) for k, v in self.conv_states.items()}
        self.window = {k: fn(v) for k, v in self.window.items()}
        if self.recurrent_state is not None:
            self.recurrent_state = fn(self.recurrent_state)

    def reset(self) -> None:
        self.conv_states, self.window, self.recurrent_state = {}, {}, None
        self.seen_tokens = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.device is not None:
            self._map(lambda t: t.to(self.device, non_blocking=True))

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("a LAWCAT layer's recurrent state cannot be cropped (assisted decoding "
                           "and prompt-lookup need a KV cache); decode without them")


class LawcatCache(DynamicCache):
    """A ``DynamicCache`` whose converted layers hold LAWCAT state.

    Args:
        config: the model's (text) config.
        lawcat_layers (Iterable[int]): indices of the converted layers.

    Example::

        cache = LawcatCache.from_model(model)
        model.generate(input_ids, past_key_values=cache, max_new_tokens=32)
    """

    def __init__(self, config, lawcat_layers: Iterable[int]) -> None:
        super().__init__(config=config)
        for idx in lawcat_layers:
            if idx >= len(self.layers):
                raise ValueError(f"layer {idx} is out of range for a model with {len(self.layers)} layers")
            self.layers[idx] = LawcatCacheLayer()

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "LawcatCache":
        from .attention import LawcatAttention

        layers = [m.layer_idx for m in model.modules() if isinstance(m, LawcatAttention)]
        return cls(model.config, layers)

    def lawcat_state_nbytes(self) -> int:
        """Total bytes of all LAWCAT layers' state."""
        return sum(l.state_nbytes() for l in self.layers if isinstance(l, LawcatCacheLayer))


def lawcat_cache_layer(cache, layer_idx: int) -> LawcatCacheLayer:
    """Return the LAWCAT layer of ``cache`` at ``layer_idx``, creating it in an empty slot.

    Raises if the slot already holds softmax keys/values (a cache filled by another model).
    """
    layers = cache.layers
    if layer_idx < len(layers) and isinstance(layers[layer_idx], LawcatCacheLayer):
        return layers[layer_idx]
    replicate = getattr(cache, "layer_class_to_replicate", None)
    while len(layers) <= layer_idx:
        if replicate is None:
            raise ValueError(f"cache has {len(layers)} layers, LAWCAT layer {layer_idx} is out of range")
        layers.append(replicate())
    current = layers[layer_idx]
    seen = current.get_seq_length() if hasattr(current, "get_seq_length") else 0
    if seen:
        raise ValueError(
            f"cache layer {layer_idx} already holds {seen} softmax tokens; pass a fresh cache or "
            "petl.linear.LawcatCache.from_model(model)")
    layers[layer_idx] = LawcatCacheLayer()
    return layers[layer_idx]
