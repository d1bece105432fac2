"""ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum F-measures (Lin, 2004), without extra dependencies.

Tokenisation follows Google's ``rouge_score`` package with ``use_stemmer=False``: lower case, every
character outside ``[a-z0-9]`` becomes a space, split on whitespace. For each pair,
precision = overlap / predicted units and recall = overlap / reference units, F = 2PR / (P + R).

* ROUGE-N: overlap = clipped count of shared n-grams.
* ROUGE-L: overlap = length of the longest common subsequence (LCS) of the two token lists.
* ROUGE-Lsum (summary level; sentences are the newline-separated lines): for each reference
  sentence, the union of its tokens that lie on an LCS with any predicted sentence; tokens are
  counted at most as often as they occur in both texts.

``rouge`` averages each F-measure over the pairs (what ``evaluate``'s rouge reports). No stemming:
scores are slightly lower than stemmed ROUGE on inflected words.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def tokenize(text: str) -> list[str]:
    return _NON_ALNUM.sub(" ", text.lower()).split()


def _fmeasure(overlap: float, n_pred: int, n_ref: int) -> float:
    if n_pred == 0 or n_ref == 0 or overlap == 0:
        return 0.0
    precision, recall = overlap / n_pred, overlap / n_ref
    return 2 * precision * recall / (precision + recall)


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def rouge_n(prediction: str, reference: str, n: int) -> float:
    pred, ref = _ngrams(tokenize(prediction), n), _ngrams(tokenize(reference), n)
    return _fmeasure(sum((pred & ref).values()), sum(pred.values()), sum(ref.values()))


def _lcs_table(a: list[str], b: list[str]) -> list[list[int]]:
    """table[i][j] = LCS length of a[:i] and b[:j]."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a, 1):
        row, prev = table[i], table[i - 1]
        for j, y in enumerate(b, 1):
            row[j] = prev[j - 1] + 1 if x == y else max(prev[j], row[j - 1])
    return table


def _lcs_positions(a: list[str], b: list[str]) -> set[int]:
    """Indices into ``a`` of one longest common subsequence of a and b (backtracking the table)."""
    table, i, j, hits = _lcs_table(a, b), len(a), len(b), set()
    while i > 0 and j > 0:
        if a[i - 1] == b[j - 1]:
            hits.add(i - 1)
            i, j = i - 1, j - 1
        elif table[i - 1][j] >= table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return hits


def rouge_l(prediction: str, reference: str) -> float:
    pred, ref = tokenize(prediction), tokenize(reference)
    return _fmeasure(_lcs_table(ref, pred)[-1][-1] if pred and ref else 0, len(pred), len(ref))


def rouge_lsum(prediction: str, reference: str) -> float:
    pred_sents = [tokenize(s) for s in prediction.split("\n")]
    ref_sents = [tokenize(s) for s in reference.split("\n")]
    pred_sents, ref_sents = [s for s in pred_sents if s], [s for s in ref_sents if s]
    n_pred, n_ref = sum(map(len, pred_sents)), sum(map(len, ref_sents))
    if not n_pred or not n_ref:
        return 0.0
    pred_left = Counter(t for s in pred_sents for t in s)
    ref_left = Counter(t for s in ref_sents for t in s)
    hits = 0
    for ref in ref_sents:
        union: set[int] = set()
        for pred in pred_sents:
            union |= _lcs_positions(ref, pred)
        for token in (ref[i] for i in sorted(union)):
            if pred_left[token] > 0 and ref_left[token] > 0:
                hits += 1
                pred_left[token] -= 1
                ref_left[token] -= 1
    return _fmeasure(hits, n_pred, n_ref)


def rouge_scores(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE F-measures of one prediction against one reference."""
    return {"rouge1": rouge_n(prediction, reference, 1), "rouge2": rouge_n(prediction, reference, 2),
            "rougeL": rouge_l(prediction, reference), "rougeLsum": rouge_lsum(prediction, reference)}


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE F-measures over prediction/reference pairs (each in [0, 1])."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, references):
        for key, value in rouge_scores(pred, ref).items():
            totals[key] += value
    n = max(len(predictions), 1)
    return {key: value / n for key, value in totals.items()}
