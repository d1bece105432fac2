"""One layer of the H2O cache: KV tensors, accumulated attention scores, and eviction.

Each (sample, kv head) keeps the same number of slots, so the tensors stay rectangular, but *which*
token positions a slot holds differs per sample and per head. The layer therefore stores, beside
keys and values, the original position of every slot and the attention mass it has received.

Life of one forward step (one call of the attention module of this layer):
1. ``update`` appends the new keys/values (already rotated by RoPE) and returns all slots;
2. the ``petl_h2o`` attention function computes softmax probabilities explicitly and calls
   ``accumulate`` with the column sums (per sample, per kv head);
3. ``accumulate`` adds them to the scores and evicts down to ``heavy + recent`` slots.
Between steps the layer therefore never holds more than the budget.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from petl.cache.budget import H2OBudget

NOT_SWITCHED = ("H2OCache got no attention scores: the model does not run the 'petl_h2o' attention; "
                "call petl.cache.enable_h2o(model) before generating with an H2OCache")


def select_kept(scores: torch.Tensor, heavy: int, recent: int) -> torch.Tensor:
    """Slots to keep under the H2O policy, sorted by slot (= by position).

    Args:
        scores (Tensor): accumulated attention per slot, ``[B, H, N]``, slots in position order.
        heavy (int): number of heavy hitters, chosen among the ``N - recent`` oldest slots.
        recent (int): number of newest slots kept unconditionally.

    Returns:
        Tensor: long indices ``[B, H, heavy + recent]`` into the slot axis (requires
        ``N > heavy + recent``).
    """
    batch, heads, n = scores.shape
    old = n - recent
    recent_idx = torch.arange(old, n, device=scores.device).expand(batch, heads, recent)
    if heavy == 0:
        return recent_idx
    heavy_idx = scores[..., :old].topk(heavy, dim=-1).indices.sort(dim=-1).values
    return torch.cat([heavy_idx, recent_idx], dim=-1)


class H2OLayer(CacheLayerMixin):
    """KV cache of one attention layer under the H2O heavy-hitter + recent-window policy.

    Tensors (B batch, H kv heads, N kept slots, D head dim):
        keys, values: ``[B, H, N, D]``, keys after RoPE, so a kept token keeps its position.
        positions: ``[B, H, N]`` long, original token position of each slot (padding included).
        scores: ``[B, H, N]`` float32, attention probability the slot has received so far,
            summed over the query heads that share the kv head.

    ``get_seq_length`` is the number of tokens seen (so new tokens get the right RoPE position),
    not the number kept.
    """

    is_sliding = False
    is_compileable = False
    # Evicted entries cannot be brought back, so assisted decoding (which rolls back) is refused.
    is_croppable = False

    def __init__(self, budget: H2OBudget, **kwargs) -> None:
        super().__init__()
        self.budget = budget
        self.heavy: int | None = None
        self.recent: int | None = None
        self.cumulative_length = 0
        self.positions: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.awaiting_scores = False

    def __repr__(self) -> str:
        return f"H2OLayer(heavy={self.heavy}, recent={self.recent}, seen={self.cumulative_length})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, _ = key_states.shape
        self.device, self.dtype = key_states.device, key_states.dtype
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.positions = torch.zeros(batch, heads, 0, dtype=torch.long, device=self.device)
        self.scores = torch.zeros(batch, heads, 0, dtype=torch.float32, device=self.device)
        self.is_initialized = True

    @property
    def capacity(self) -> int | None:
        """``heavy + recent`` once resolved at prefill, else None."""
        return None if self.heavy is None else self.heavy + self.recent

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``[B, H, q, D]`` new keys/values; return all slots ``[B, H, N + q, D]``."""
        if self.awaiting_scores:
            raise RuntimeError(NOT_SWITCHED)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, heads, q_len, _ = key_states.shape
        if self.heavy is None:
            self.heavy, self.recent = self.budget.resolve(q_len)
        new_pos = torch.arange(self.cumulative_length, self.cumulative_length + q_len, device=self.device)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.positions = torch.cat([self.positions, new_pos.expand(batch, heads, q_len)], dim=-1)
        self.scores = torch.cat([self.scores, self.scores.new_zeros(batch, heads, q_len)], dim=-1)
        self.cumulative_length += q_len
        self.awaiting_scores = True
        return self.keys, self.values

    def accumulate(self, column_scores: torch.Tensor) -> None:
        """Add this step's attention column sums ``[B, H, N]`` and evict down to the budget."""
        if column_scores.shape != self.scores.shape:
            raise ValueError(f"H2O scores of shape {tuple(column_scores.shape)} do not match the cache "
                             f"slots {tuple(self.scores.shape)}; pass column sums per sample and kv head")
        self.scores = self.scores + column_scores.to(torch.float32)
        self.awaiting_scores = False
        self.evict()

    def evict(self) -> None:
        """Keep the top-``heavy`` old slots by score plus the ``recent`` newest ones."""
        if self.capacity is None or self.keys.shape[-2] <= self.capacity:
            return
        keep = select_kept(self.scores, self.heavy, self.recent)  # [B, H, heavy + recent]
        self._gather(keep)

    def _gather(self, keep: torch.Tensor) -> None:
        kv_index = keep.unsqueeze(-1).expand(-1, -1, -1, self.keys.shape[-1])
        self.keys = self.keys.gather(2, kv_index)
        self.values = self.values.gather(2, kv_index.expand(-1, -1, -1, self.values.shape[-1]))
        self.positions = self.positions.gather(2, keep)
        self.scores = self.scores.gather(2, keep)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The mask is built over *all* positions seen (offset 0): kept slots are a different,
        # non-contiguous set per sample and head, so the attention function picks each slot's
        # column by `positions`. A mask sized to the kept tensor could not say which slots are
        # padding once eviction has reordered them.
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1 if self.capacity is None else self.capacity

    def kv_bytes(self) -> int:
        """Bytes held by this layer (keys, values, positions and scores)."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.positions, self.scores))

    def reset(self) -> None:
        self.keys = self.values = self.positions = self.scores = None
        self.is_initialized = False
        self.heavy = self.recent = None
        self.cumulative_length = 0
        self.awaiting_scores = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise ValueError("H2OCache cannot be cropped: evicted tokens cannot be restored; "
                         "don't use assisted/speculative decoding with H2O")

    def _select_batch(self, index: torch.Tensor) -> None:
        if self.is_initialized:
            index = index.to(self.device)
            for name in ("keys", "values", "positions", "scores"):
                setattr(self, name, getattr(self, name)[index])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            for name in ("keys", "values", "positions", "scores"):
                setattr(self, name, getattr(self, name).repeat_interleave(repeats, dim=0))

    def offload(self) -> None:
        if self.is_initialized:
            for name in ("keys", "values", "positions", "scores"):
                setattr(self, name, getattr(self, name).to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized and self.keys.device != self.device:
            for name in ("keys", "values", "positions", "scores"):
                setattr(self, name, getattr(self, name).to(self.device, non_blocking=True))
