"""Extractive QA over long contracts: overlapping windows for training, best span across windows at scoring.

A context longer than ``max_length`` is cut into windows sharing ``chunk_overlap`` tokens (the
tokenizer's ``stride``); each window is ``[CLS] question [SEP] context piece [SEP]``. A training
window whose piece holds the first gold answer is labelled with its token positions; every other
window (and an unanswerable question) points at the CLS token, SQuAD 2.0 style. CUAD contracts
yield many answer-less windows, so ``negative_window_ratio`` keeps only a fraction of them.
``long_document: truncate`` keeps the first window only.

Scoring picks, per question, the highest start+end logit over all windows among spans inside the
context of at most ``max_answer_tokens`` tokens, and answers "" when the no-answer score (CLS) of
its best window is higher and unanswerable questions exist.
"""
from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Optional

import datasets
import numpy as np
import torch


def _windows(tokenizer: Any, records: dict[str, list], max_length: int, overlap: int, all_windows: bool):
    return tokenizer([q.lstrip() for q in records["question"]], records["context"], truncation="only_second",
                     max_length=max_length, stride=overlap, return_overflowing_tokens=all_windows,
                     return_offsets_mapping=True, padding=False, verbose=False)


def encode_qa_train(dataset: datasets.Dataset, tokenizer: Any, *, max_length: int, overlap: int,
                    all_windows: bool = True, negative_window_ratio: float = 1.0, seed: int = 0) -> datasets.Dataset:
    """SQuAD records -> windows with ``start_positions`` / ``end_positions`` (0 = no answer here)."""
    rng = random.Random(seed)

    def encode(records: dict[str, list]) -> dict[str, list]:
        enc = _windows(tokenizer, records, max_length, overlap, all_windows)
        mapping = enc.get("overflow_to_sample_mapping", list(range(len(enc["input_ids"]))))
        out: dict[str, list] = defaultdict(list)
        for w, sample in enumerate(mapping):
            answers = records["answers"][sample]
            start, end = 0, 0
            seq = enc.sequence_ids(w)
            offsets = enc["offset_mapping"][w]
            if answers["answer_start"]:
                a0 = answers["answer_start"][0]
                a1 = a0 + len(answers["text"][0])
                ctx = [i for i, s in enumerate(seq) if s == 1]
                if ctx and offsets[ctx[0]][0] <= a0 and offsets[ctx[-1]][1] >= a1:
                    start = next(i for i in ctx if offsets[i][1] > a0)
                    end = max(i for i in ctx if offsets[i][0] < a1)
            if start == 0 and negative_window_ratio < 1.0 and rng.random() >= negative_window_ratio:
                continue
            for key in ("input_ids", "attention_mask", "token_type_ids"):
                if key in enc:
                    out[key].append(enc[key][w])
            out["start_positions"].append(start)
            out["end_positions"].append(end)
        return dict(out)

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="Windowing QA contexts")


def encode_qa_eval(dataset: datasets.Dataset, tokenizer: Any, *, max_length: int, overlap: int,
                   all_windows: bool = True) -> datasets.Dataset:
    """SQuAD records -> windows with ``example`` (record index) and context-only ``offsets``."""
    def encode(records: dict[str, list], indices: list[int]) -> dict[str, list]:
        enc = _windows(tokenizer, records, max_length, overlap, all_windows)
        mapping = enc.get("overflow_to_sample_mapping", list(range(len(enc["input_ids"]))))
        out: dict[str, list] = defaultdict(list)
        for w, sample in enumerate(mapping):
            seq = enc.sequence_ids(w)
            for key in ("input_ids", "attention_mask", "token_type_ids"):
                if key in enc:
                    out[key].append(enc[key][w])
            out["example"].append(indices[sample])
            out["offsets"].append([list(o) if s == 1 else [-1, -1] for o, s in zip(enc["offset_mapping"][w], seq)])
        return dict(out)

    return dataset.map(encode, batched=True, with_indices=True, remove_columns=dataset.column_names,
                       desc="Windowing QA contexts")


@dataclass
class SpanCandidate:
    score: float
    start_char: int
    end_char: int


def best_span(start_logits: np.ndarray, end_logits: np.ndarray, offsets: list[list[int]], *,
              max_answer_tokens: int, n_best: int = 20) -> Optional[SpanCandidate]:
    """Highest-scoring span inside the context of one window (None when there is none).

    start_logits, end_logits: # [T]; offsets: [T] of [char_start, char_end], [-1, -1] outside the context.
    """
    starts = np.argsort(start_logits)[::-1][:n_best]
    ends = np.argsort(end_logits)[::-1][:n_best]
    best: Optional[SpanCandidate] = None
    for s in starts:
        for e in ends:
            if s >= len(offsets) or e >= len(offsets) or offsets[s][0] < 0 or offsets[e][0] < 0:
                continue
            if e < s or e - s + 1 > max_answer_tokens:
                continue
            score = float(start_logits[s] + end_logits[e])
            if best is None or score > best.score:
                best = SpanCandidate(score, offsets[s][0], offsets[e][1])
    return best


def decode_answers(contexts: list[str], windows: datasets.Dataset, start_logits: list[np.ndarray],
                   end_logits: list[np.ndarray], *, max_answer_tokens: int, allow_no_answer: bool) -> list[str]:
    """One answer string per context from the logits of its windows (``windows["example"]`` maps them)."""
    best: dict[int, SpanCandidate] = {}
    null: dict[int, float] = {}
    for w, example in enumerate(windows["example"]):
        s_log, e_log = start_logits[w], end_logits[w]
        null[example] = min(null.get(example, float("inf")), float(s_log[0] + e_log[0]))
        cand = best_span(s_log, e_log, windows[w]["offsets"], max_answer_tokens=max_answer_tokens)
        if cand is not None and (example not in best or cand.score > best[example].score):
            best[example] = cand
    answers = []
    for i, context in enumerate(contexts):
        cand = best.get(i)
        if cand is None or (allow_no_answer and null.get(i, float("-inf")) > cand.score):
            answers.append("")
        else:
            answers.append(context[cand.start_char:cand.end_char])
    return answers


@dataclass
class QACollator:
    """Right-pad QA windows; passes ``start_positions`` / ``end_positions`` when present."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        batch: dict[str, torch.Tensor] = {}
        for key, pad in (("input_ids", self.pad_token_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key in features[0]:
                batch[key] = torch.tensor([list(f[key]) + [pad] * (length - len(f[key])) for f in features])
        for key in ("start_positions", "end_positions"):
            if key in features[0]:
                batch[key] = torch.tensor([f[key] for f in features], dtype=torch.long)
        return batch
