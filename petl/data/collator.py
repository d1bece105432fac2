"""Dynamic padding for causal-LM batches (packed blocks or SFT examples).

Which collator to use:

* `DataCollatorForCausalLM` (this file) keeps one example per row and right-pads rows to the longest
  one, optionally to a multiple of some value. Use it with S2/SF attention (their group size must
  divide the row length, hence `pad_to_multiple_of`), with eager/SDPA/Flex attention, and whenever
  rows should stay rows (per-example losses, batch shapes that a compiled model reuses).
* `transformers.DataCollatorWithFlattening` concatenates the whole batch into a single row of
  ``sum(lengths)`` tokens with restarting `position_ids` (and, with ``return_flash_attn_kwargs=True``,
  ``cu_seq_lens``). No padding at all, so it is the fastest for variable-length SFT data, but only
  with an attention that honours the packed boundaries (flash-attention varlen, or SDPA/Flex through
  transformers' position-id detection); S2/SF groups would then straddle examples.

Attention mask and packed rows: transformers builds block-diagonal (per-document) attention from
restarting `position_ids` **only when no attention_mask is passed**. So by default this collator
omits `attention_mask` whenever the examples carry `position_ids` (output of `pack_for_causal_lm`),
and returns it otherwise. Omitting it is safe for training because padding is on the right: with a
causal mask no real token attends to a later (padding) position, and padded labels are -100.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from petl.data._utils import IGNORE_INDEX


@dataclass
class DataCollatorForCausalLM:
    """Right-pad ``input_ids``, ``labels``, ``position_ids`` and build ``attention_mask``.

    Args:
        tokenizer (PreTrainedTokenizerBase, Optional): source of ``pad_token_id`` when it is not
            given. Default: None.
        pad_token_id (int, Optional): id used to pad ``input_ids``. Default: ``tokenizer.pad_token_id``.
        pad_to_multiple_of (int, Optional): pad the batch length up to a multiple of this (e.g. the
            S2-Attn group size, or 8/64 for tensor cores). Default: None.
        return_attention_mask (bool, Optional): True / False force it; None returns it unless the
            examples carry ``position_ids`` (see the module docstring). Default: None.
        label_pad_token_id (int, Optional): label of padded positions. Default: -100.

    Each example is a mapping with ``input_ids`` (list or 1-D tensor) and optionally ``labels``
    (default: a copy of ``input_ids``) and ``position_ids`` (all examples or none). Padded
    ``position_ids`` keep counting up from the row's last position.

    Returns (from ``__call__``): dict of int64 tensors ``input_ids``, ``labels`` ``# [B, T]``,
    plus ``position_ids`` ``# [B, T]`` when given and ``attention_mask`` ``# [B, T]`` (1 = real token).

    Example:
        >>> collate = DataCollatorForCausalLM(tok, pad_to_multiple_of=2048)
        >>> trainer = Trainer(model, args, train_dataset=blocks, data_collator=collate)
    """

    tokenizer: Any = None
    pad_token_id: int | None = None
    pad_to_multiple_of: int | None = None
    return_attention_mask: bool | None = None
    label_pad_token_id: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        if self.pad_token_id is None:
            self.pad_token_id = getattr(self.tokenizer, "pad_token_id", None)
        if self.pad_token_id is None:
            raise ValueError("no pad token id: set tokenizer.pad_token (e.g. to tokenizer.eos_token) "
                             "or pass pad_token_id=.")
        multiple = self.pad_to_multiple_of
        if multiple is not None and (isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1):
            raise ValueError(f"pad_to_multiple_of must be a positive integer or None, got {multiple!r}.")

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch.")
        ids = [_as_long(f["input_ids"]) for f in features]
        labels = [_as_long(f["labels"]) if "labels" in f else t.clone() for f, t in zip(features, ids)]
        has_pos = ["position_ids" in f for f in features]
        if any(has_pos) and not all(has_pos):
            raise ValueError("some examples have position_ids and some do not; give them to all or none.")
        positions = [_as_long(f["position_ids"]) for f in features] if all(has_pos) else None
        for i, t in enumerate(ids):
            if len(labels[i]) != len(t) or (positions is not None and len(positions[i]) != len(t)):
                raise ValueError(f"example {i}: input_ids, labels and position_ids must have the same length.")
        length = max(len(t) for t in ids)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": _pad(ids, length, self.pad_token_id),
                 "labels": _pad(labels, length, self.label_pad_token_id)}
        if positions is not None:
            batch["position_ids"] = torch.stack([_pad_positions(p, length) for p in positions])
        want_mask = self.return_attention_mask
        if want_mask is None:
            want_mask = positions is None
        if want_mask:
            lengths = torch.tensor([len(t) for t in ids])
            batch["attention_mask"] = (torch.arange(length)[None, :] < lengths[:, None]).long()
        return batch


def _as_long(values) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.long)
    if t.dim() != 1:
        raise ValueError(f"expected a 1-D sequence of token ids per example, got shape {tuple(t.shape)}.")
    return t


def _pad(rows: list[torch.Tensor], length: int, value: int) -> torch.Tensor:
    """[B, length]: each row followed by `value`."""
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _pad_positions(pos: torch.Tensor, length: int) -> torch.Tensor:
    """[length]: positions followed by last+1, last+2, ... (one continuing sequence, not new documents)."""
    start = int(pos[-1]) + 1 if len(pos) else 0
    tail = torch.arange(start, start + length - len(pos), dtype=torch.long)
    return torch.cat([pos, tail])
