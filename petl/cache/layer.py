"""One layer of the H2O cache: KV tensors, accumulated attention scores, and eviction.

Each (sample, kv head) keeps the same number of slots, so the tensors stay rectangular, but *which*
token positions a slot holds differs per sample and per head. The layer therefore stores, beside
keys and values, the original position of every slot and the attention mass it has received.

Life of one forward step (one call of the attention module of this layer):
1. ``update`` adds the new keys/values (already rotated by RoPE) and returns all slots;
2. the ``petl_h2o`` attention function computes softmax probabilities explicitly and calls
   ``accumulate`` with the column sums (per sample, per kv head);
3. ``accumulate`` adds them to the scores and evicts down to ``heavy + recent`` slots.

Two paths, one policy. Prefill (or any multi-token step) appends in position order and evicts
with :func:`select_kept`. Steady-state decode is in place: once the cache is full, each step evicts
exactly one slot per (sample, head) — the lowest-scored token outside the recent window, which is
what ``select_kept`` would drop — and marks it free (position -1); the next token is written into
that slot. Decode thus moves O(1) KV rows per step instead of copying the cache, and the
tensors hold ``heavy + recent + 1`` physical slots, one of them free between steps.
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

    Tensors (B batch, H kv heads, N physical slots, D head dim):
        keys, values: ``[B, H, N, D]``, keys after RoPE, so a kept token keeps its position.
        positions: ``[B, H, N]`` long, original token position of each slot (padding included),
            -1 for the free slot left by a decode-step eviction.
        scores: ``[B, H, N]`` float32, attention probability the slot has received so far,
            summed over the query heads that share the kv head.

    ``get_seq_length`` is the number of tokens seen (so new tokens get the right RoPE position),
    not the number kept. Slots are in position order after a multi-token step; in-place decode
    steps leave them unordered (attention does not care: the mask is read through ``positions``).
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
        self.free: torch.Tensor | None = None  # [B, H, 1] slot freed by the last decode eviction
        self.ordered = True  # slots are in position order
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

    @property
    def kept_length(self) -> int:
        """Slots holding a token (the same for every sample and head)."""
        if not self.is_initialized:
            return 0
        return self.keys.shape[-2] - (0 if self.free is None else 1)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add ``[B, H, q, D]`` new keys/values; return all slots ``[B, H, N', D]``."""
        if self.awaiting_scores:
            raise RuntimeError(NOT_SWITCHED)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, heads, q_len, _ = key_states.shape
        if self.heavy is None:
            self.heavy, self.recent = self.budget.resolve(q_len)
        if q_len == 1 and self.free is not None:
            self._write_into_free_slot(key_states, value_states)
        else:
            self._append(key_states, value_states)
        self.cumulative_length += q_len
        self.awaiting_scores = True
        return self.keys, self.values

    def _write_into_free_slot(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        free = self.free  # [B, H, 1]
        self.keys.scatter_(2, free.unsqueeze(-1).expand_as(key_states), key_states)
        self.values.scatter_(2, free.unsqueeze(-1).expand_as(value_states), value_states)
        self.positions.scatter_(2, free, self.cumulative_length)
        self.scores.scatter_(2, free, 0.0)
        self.free, self.ordered = None, False

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if not self.ordered or self.free is not None:
            self._sort_by_position()
        batch, heads, q_len, _ = key_states.shape
        new_pos = torch.arange(self.cumulative_length, self.cumulative_length + q_len, device=self.device)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.positions = torch.cat([self.positions, new_pos.expand(batch, heads, q_len)], dim=-1)
        self.scores = torch.cat([self.scores, self.scores.new_zeros(batch, heads, q_len)], dim=-1)

    def _sort_by_position(self) -> None:
        """Put slots back in position order and drop the free slot (multi-token steps only)."""
        order = self.positions.argsort(dim=-1)  # the free slot (position -1) sorts first
        if self.free is not None:
            order = order[..., 1:]
        self.free, self.ordered = None, True
        self._gather(order)

    def accumulate(self, column_scores: torch.Tensor) -> None:
        """Add this step's attention column sums ``[B, H, N]`` and evict down to the budget."""
        if column_scores.shape != self.scores.shape:
            raise ValueError(f"H2O scores of shape {tuple(column_scores.shape)} do not match the cache "
                             f"slots {tuple(self.scores.shape)}; pass column sums per sample and kv head")
        self.scores += column_scores.to(torch.float32)
        self.awaiting_scores = False
        self.evict()

    def evict(self) -> None:
        """Keep the top-``heavy`` old slots by score plus the ``recent`` newest ones."""
        n = self.keys.shape[-2]
        if self.capacity is None or n <= self.capacity:
            return
        if n == self.capacity + 1:
            self._evict_one()
        else:
            keep = select_kept(self.scores, self.heavy, self.recent)  # [B, H, heavy + recent]
            self._gather(keep)

    def _evict_one(self) -> None:
        """Free the lowest-scored slot outside the recent window, per sample and head.

        With ``heavy + recent + 1`` slots, exactly ``heavy + 1`` lie outside the recent window (the
        heavy hitters and the token that just left the window), so dropping their minimum is
        ``select_kept``'s choice without touching K/V.
        """
        outside = self.positions < self.cumulative_length - self.recent  # [B, H, N]
        free = self.scores.masked_fill(~outside, float("inf")).argmin(dim=-1, keepdim=True)
        self.positions.scatter_(2, free, -1)
        self.scores.scatter_(2, free, 0.0)
        self.free = free

    def _gather(self, keep: torch.Tensor) -> None:
        self.keys = self.keys.gather(2, keep.unsqueeze(-1).expand(-1, -1, -1, self.keys.shape[-1]))
        self.values = self.values.gather(2, keep.unsqueeze(-1).expand(-1, -1, -1, self.values.shape[-1]))
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
        self.keys = self.values = self.positions = self.scores = self.free = None
        self.is_initialized, self.ordered = False, True
        self.heavy = self.recent = None
        self.cumulative_length = 0
        self.awaiting_scores = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise ValueError("H2OCache cannot be cropped: evicted tokens cannot be restored; "
                         "don't use assisted/speculative decoding with H2O")

    def _tensor_names(self) -> list[str]:
        return ["keys", "values", "positions", "scores"] + ([] if self.free is None else ["free"])

    def _select_batch(self, index: torch.Tensor) -> None:
        if self.is_initialized:
            index = index.to(self.device)
            for name in self._tensor_names():
                setattr(self, name, getattr(self, name)[index])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            for name in self._tensor_names():
                setattr(self, name, getattr(self, name).repeat_interleave(repeats, dim=0))

    def offload(self) -> None:
        if self.is_initialized:
            for name in self._tensor_names():
                setattr(self, name, getattr(self, name).to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized and self.keys.device != self.device:
            for name in self._tensor_names():
                setattr(self, name, getattr(self, name).to(self.device, non_blocking=True))
