"""Chunk-and-aggregate classification: batching chunked documents and pooling chunk logits.

A batch of B documents with up to C chunks of up to T tokens is padded to ``input_ids`` # [B, C, T]
with ``chunk_mask`` # [B, C] marking real chunks. Only real chunks go through the encoder (as one
flat batch # [N, T], N = chunk_mask.sum()); their logits # [N, L] are scattered back and pooled over
each document's chunks:

* ``max``: the strongest evidence in any chunk (a violated article is mentioned somewhere);
* ``mean``: evidence spread over the whole document;
* ``logsumexp``: a smooth maximum, log(mean(exp(logits))) so a one-chunk document keeps its logit.

A truncated document is the special case C = 1, so every strategy shares this code path.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

AGGREGATES = ("max", "mean", "logsumexp")


def aggregate_chunk_logits(chunk_logits: torch.Tensor, chunk_mask: torch.Tensor, how: str = "max") -> torch.Tensor:
    """Pool per-chunk logits into per-document logits.

    Args:
        chunk_logits (Tensor): ``# [N, L]`` logits of the real chunks, in row-major order of ``chunk_mask``.
        chunk_mask (Tensor): ``# [B, C]`` bool/0-1, True where a document has a chunk; every row needs one.
        how (str): ``max``, ``mean`` or ``logsumexp``.
    Returns:
        ``# [B, L]`` document logits.
    """
    if how not in AGGREGATES:
        raise ValueError(f"unknown chunk aggregation {how!r}; choose one of {', '.join(AGGREGATES)}")
    mask = chunk_mask.bool()
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every document needs at least one chunk (a row of chunk_mask is all False)")
    B, C = mask.shape
    L = chunk_logits.shape[-1]
    fill = 0.0 if how == "mean" else float("-inf")
    full = chunk_logits.new_full((B, C, L), fill)  # [B, C, L]
    full[mask] = chunk_logits
    counts = mask.sum(dim=1, keepdim=True).to(chunk_logits.dtype)  # [B, 1]
    if how == "max":
        return full.amax(dim=1)
    if how == "mean":
        return full.sum(dim=1) / counts
    return torch.logsumexp(full, dim=1) - torch.log(counts)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Cross-entropy on class ids [B], or binary cross-entropy on 0/1 targets [B, L] (multi-label)."""
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits.float(), labels.to(torch.float32))
    return F.cross_entropy(logits.float(), labels.long())


def chunked_forward(model: Any, inputs: dict[str, torch.Tensor], how: str) -> torch.Tensor:
    """Run ``model`` on the real chunks of a padded batch and pool: returns ``# [B, L]`` logits."""
    mask = inputs["chunk_mask"].bool()  # [B, C]
    flat = {key: inputs[key][mask] for key in ("input_ids", "attention_mask", "token_type_ids") if key in inputs}
    logits = model(**flat).logits  # [N, L]
    return aggregate_chunk_logits(logits, mask, how)


@dataclass
class ChunkedDocumentCollator:
    """Pad chunked documents to ``input_ids``/``attention_mask``/``token_type_ids`` # [B, C, T].

    Each feature holds ``input_ids`` as a list of chunks (lists of token ids) and ``labels`` (a class
    id, or a 0/1 list for multi-label). ``pad_to_multiple_of`` rounds T up (tensor cores, Longformer's
    attention window).
    """

    pad_token_id: int
    multi_label: bool = False
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        n_chunks = max(len(f["input_ids"]) for f in features)
        length = max(len(row) for f in features for row in f["input_ids"])
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        B = len(features)
        batch = {"input_ids": torch.full((B, n_chunks, length), self.pad_token_id, dtype=torch.long),
                 "attention_mask": torch.zeros((B, n_chunks, length), dtype=torch.long),
                 "chunk_mask": torch.zeros((B, n_chunks), dtype=torch.bool)}
        has_types = "token_type_ids" in features[0]
        if has_types:
            batch["token_type_ids"] = torch.zeros((B, n_chunks, length), dtype=torch.long)
        for b, feature in enumerate(features):
            for c, row in enumerate(feature["input_ids"]):
                batch["input_ids"][b, c, : len(row)] = torch.as_tensor(row)
                batch["attention_mask"][b, c, : len(row)] = 1
                batch["chunk_mask"][b, c] = True
                if has_types:
                    types = feature["token_type_ids"][c]
                    batch["token_type_ids"][b, c, : len(types)] = torch.as_tensor(types)
        if "labels" in features[0]:
            dtype = torch.float32 if self.multi_label else torch.long
            batch["labels"] = torch.as_tensor([f["labels"] for f in features], dtype=dtype)
        return batch
