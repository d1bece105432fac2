"""Classification metrics with LexGLUE's conventions: micro-/macro-F1 and accuracy.

LexGLUE (Chalkidis et al., 2022) scores with scikit-learn's ``f1_score(..., zero_division=0)``:

* single-label (SCOTUS, LEDGAR, CaseHOLD, ...): predictions are the argmax; micro-F1 equals
  accuracy, macro-F1 averages the per-class F1 over the classes that occur in the gold labels or
  the predictions;
* multi-label (ECtHR, EUR-LEX, UNFAIR-ToS): a label is predicted when its sigmoid exceeds 0.5; the
  F1 of every label column is averaged (a label absent from gold and predictions scores 0). For
  ECtHR and UNFAIR-ToS an extra "none" column marks documents with no label, in the gold labels
  and in the predictions, so that predicting "nothing" correctly is rewarded.

Per-class F1 is ``2 TP / (2 TP + FP + FN)`` (0 when the denominator is 0). Implemented with numpy so
petl does not depend on scikit-learn; the tests compare with hand-computed values.
"""
from __future__ import annotations

import numpy as np


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros(tp.shape, dtype=np.float64), where=denom > 0)


def add_none_column(indicator: np.ndarray) -> np.ndarray:
    """[N, L] 0/1 -> [N, L + 1] with a last column set where a row has no label (LexGLUE)."""
    none = (indicator.sum(axis=1) == 0).astype(indicator.dtype)[:, None]
    return np.concatenate([indicator, none], axis=1)


def multilabel_f1(y_true: np.ndarray, y_pred: np.ndarray, *, none_class: bool = False) -> dict[str, float]:
    """Micro and macro F1 of 0/1 indicator matrices ``y_true``, ``y_pred`` of shape [N, L]."""
    y_true = np.asarray(y_true).astype(np.int64)
    y_pred = np.asarray(y_pred).astype(np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 2:
        raise ValueError(f"multi-label gold and predictions must both be [N, L] indicator matrices, "
                         f"got {y_true.shape} and {y_pred.shape}")
    if none_class:
        y_true, y_pred = add_none_column(y_true), add_none_column(y_pred)
    tp = (y_true & y_pred).sum(axis=0)
    fp = ((1 - y_true) & y_pred).sum(axis=0)
    fn = (y_true & (1 - y_pred)).sum(axis=0)
    micro = _f1(tp.sum(keepdims=True), fp.sum(keepdims=True), fn.sum(keepdims=True))[0]
    macro = _f1(tp, fp, fn).mean() if tp.size else 0.0
    return {"micro_f1": float(micro), "macro_f1": float(macro)}


def multiclass_f1(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Micro and macro F1 of class ids [N]; macro over the classes seen in gold or predictions."""
    y_true = np.asarray(y_true).astype(np.int64).reshape(-1)
    y_pred = np.asarray(y_pred).astype(np.int64).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"gold labels and predictions differ in length: {y_true.shape} vs {y_pred.shape}")
    classes = np.union1d(y_true, y_pred)
    tp = np.array([np.sum((y_true == c) & (y_pred == c)) for c in classes])
    fp = np.array([np.sum((y_true != c) & (y_pred == c)) for c in classes])
    fn = np.array([np.sum((y_true == c) & (y_pred != c)) for c in classes])
    micro = _f1(tp.sum(keepdims=True), fp.sum(keepdims=True), fn.sum(keepdims=True))[0] if classes.size else 0.0
    macro = _f1(tp, fp, fn).mean() if classes.size else 0.0
    return {"micro_f1": float(micro), "macro_f1": float(macro)}


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of exact matches; for [N, L] indicator rows every label must match (subset accuracy)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"gold labels and predictions differ in shape: {y_true.shape} vs {y_pred.shape}")
    if y_true.size == 0:
        return 0.0
    same = y_true == y_pred
    return float(same.all(axis=1).mean() if same.ndim == 2 else same.mean())


def classification_metrics(logits: np.ndarray, gold: np.ndarray, *, multi_label: bool, threshold: float = 0.5,
                           none_class: bool = False) -> dict[str, float]:
    """Micro-F1, macro-F1 and accuracy from logits, LexGLUE style.

    Args:
        logits (ndarray): ``# [N, L]`` scores (document-level, chunks already pooled).
        gold (ndarray): ``# [N]`` class ids, or ``# [N, L]`` 0/1 indicators when ``multi_label``.
        multi_label (bool): threshold sigmoid(logits) instead of taking the argmax.
        threshold (float): sigmoid threshold for multi-label predictions. Default: 0.5.
        none_class (bool): add LexGLUE's "no label" column before scoring multi-label F1.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if multi_label:
        pred = (1.0 / (1.0 + np.exp(-logits)) > threshold).astype(np.int64)
        scores = multilabel_f1(gold, pred, none_class=none_class)
    else:
        pred = logits.argmax(axis=-1)
        scores = multiclass_f1(gold, pred)
    scores["accuracy"] = accuracy(gold, pred)
    return scores
