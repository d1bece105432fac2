"""Tokenisation of classification and multiple-choice records into model inputs.

Classification: every document becomes a list of C chunks (C = 1 when truncating), see
:func:`petl.tasks.chunking.encode_document`; multi-label targets become 0/1 vectors.
Multiple choice: each of the K choices is paired with the context (the context is truncated, never
the choice), giving ``input_ids`` # [K, T] per record, which ``AutoModelForMultipleChoice`` takes as
# [B, K, T].
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import torch

from petl.tasks.chunking import encode_document


def encode_classification(dataset: datasets.Dataset, tokenizer: Any, *, max_length: int, strategy: str,
                          num_labels: int, multi_label: bool, overlap: int = 0, max_chunks: int = 8,
                          section_split: str = "none", truncation_side: str = "right",
                          num_proc: int | None = None) -> datasets.Dataset:
    """Records (``text``, ``text_pair``, ``labels`` ids) -> ``input_ids`` [C][T], ``attention_mask``, ``labels``.

    ``strategy`` is ``truncate``/``extend`` (one row per document) or ``chunk``.
    """
    def encode(record: dict[str, Any]) -> dict[str, Any]:
        enc = encode_document(record["text"], tokenizer, max_length=max_length, text_pair=record["text_pair"] or None,
                              strategy="chunk" if strategy == "chunk" else "truncate", overlap=overlap,
                              max_chunks=max_chunks, section_split=section_split, truncation_side=truncation_side)
        if multi_label:
            target = [0.0] * num_labels
            for i in record["labels"]:
                target[i] = 1.0
            enc["labels"] = target
        else:
            enc["labels"] = int(record["labels"])
        enc["n_chunks"] = len(enc["input_ids"])
        return enc

    return dataset.map(encode, remove_columns=dataset.column_names, num_proc=num_proc,
                       desc=f"Tokenizing documents ({strategy})")


def encode_multiple_choice(dataset: datasets.Dataset, tokenizer: Any, *, max_length: int,
                           num_proc: int | None = None) -> datasets.Dataset:
    """Records (``context``, ``question``, ``choices``, ``label``) -> ``input_ids`` [K][T] and ``labels``.

    First segment: the context (or the question when there is no context); second segment: the
    question followed by the choice (or the choice alone). Only the first segment is truncated.
    """
    def encode(record: dict[str, Any]) -> dict[str, Any]:
        choices = record["choices"]
        context, question = record["context"], record["question"]
        first = context if context else question
        second = [f"{question} {c}".strip() if context else c for c in choices]
        enc = tokenizer([first] * len(choices), second, truncation="only_first" if first else True,
                        max_length=max_length, verbose=False)
        out = {k: [list(r) for r in enc[k]] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        out["labels"] = int(record["label"])
        return out

    return dataset.map(encode, remove_columns=dataset.column_names, num_proc=num_proc,
                       desc="Tokenizing multiple-choice records")


@dataclass
class ChoiceCollator:
    """Pad multiple-choice records to ``input_ids`` # [B, K, T] (all records have K choices)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        k = {len(f["input_ids"]) for f in features}
        if len(k) != 1:
            raise ValueError(f"records in a batch have different numbers of choices {sorted(k)}; "
                             "multiple choice needs the same K for every record")
        length = max(len(row) for f in features for row in f["input_ids"])
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, torch.Tensor] = {}
        for key, pad in (("input_ids", self.pad_token_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key not in features[0]:
                continue
            rows = [[list(r) + [pad] * (length - len(r)) for r in f[key]] for f in features]
            batch[key] = torch.tensor(rows, dtype=torch.long)
        if "labels" in features[0]:
            batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        return batch
