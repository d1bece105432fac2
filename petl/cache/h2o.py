"""`H2OCache`: a transformers `Cache` that keeps heavy hitters plus a recent window per head.

Usage::

    from petl.cache import H2OCache, enable_h2o
    enable_h2o(model)                      # attention that returns probabilities to the cache
    out = model.generate(**inputs, past_key_values=H2OCache(heavy=64, recent=448))

The cache only stores and evicts; the scores come from the ``petl_h2o`` attention function
(see :mod:`petl.cache.attention`), which ``enable_h2o`` switches the model to.
"""
from __future__ import annotations

import functools
import inspect

from transformers.cache_utils import Cache

from petl.cache.budget import H2OBudget
from petl.cache.layer import H2OLayer


class H2OCache(Cache):
    """Heavy-Hitter Oracle KV cache (Zhang et al., 2023) for ``model.generate``.

    Every layer keeps, for each sample and each kv head independently, the ``recent`` newest
    tokens plus the ``heavy`` older tokens that have received the most attention probability
    (summed over all queries so far, and over the query heads sharing the kv head under GQA).
    Scores are kept per sample, so batched generation with left padding is exact per sequence.

    Args:
        heavy (int, Optional): heavy-hitter slots per head. Default: None.
        recent (int, Optional): recent-window slots per head. Default: None.
        heavy_ratio (float, Optional): ``heavy`` as a fraction of the prompt length. Default: None.
        recent_ratio (float, Optional): ``recent`` as a fraction of the prompt length. Default: None.
        offloading (bool): move layers to CPU between uses, as in transformers' caches. Default: False.

    Give one of ``heavy``/``heavy_ratio`` and one of ``recent``/``recent_ratio``; ratios resolve
    to ``ceil(ratio * prompt_length)`` at prefill. The prompt itself is attended in full; eviction
    starts right after the prefill.

    Example::

        >>> cache = H2OCache(heavy_ratio=0.1, recent_ratio=0.1)   # 20% of the prompt
        >>> model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
    """

    def __init__(self, heavy: int | None = None, recent: int | None = None,
                 heavy_ratio: float | None = None, recent_ratio: float | None = None,
                 offloading: bool = False) -> None:
        self.budget = H2OBudget(heavy=heavy, recent=recent, heavy_ratio=heavy_ratio,
                                recent_ratio=recent_ratio)
        # Layers are created on first use, one per layer index the model updates.
        super().__init__(layers=[], offloading=offloading)

    def __repr__(self) -> str:
        b = self.budget
        spec = (f"heavy={b.heavy if b.heavy is not None else f'{b.heavy_ratio:g}*prompt'}, "
                f"recent={b.recent if b.recent is not None else f'{b.recent_ratio:g}*prompt'}")
        return f"H2OCache({spec}, layers={len(self.layers)})"

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(H2OLayer(self.budget))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def kv_bytes(self) -> int:
        """Bytes held by all layers (keys, values, positions and scores)."""
        return sum(layer.kv_bytes() for layer in self.layers)

    def kept_lengths(self) -> list[int]:
        """Number of tokens each layer holds now (the same for every sample and head)."""
        return [layer.kept_length for layer in self.layers]


@functools.cache
def _generate_cache_name() -> str:
    from transformers.generation.utils import GenerationMixin

    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return "cache" if "cache" in params else "past_key_values"


def generate_cache_kwargs(cache: Cache) -> dict[str, Cache]:
    """``{name: cache}`` for ``model.generate(**...)`` under the installed transformers.

    transformers 5.24 renamed generate's ``past_key_values`` to ``cache`` (the old name still
    works there, with a FutureWarning); 5.17 only knows ``past_key_values``.
    """
    return {_generate_cache_name(): cache}
