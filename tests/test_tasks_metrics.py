"""Task metrics against hand-computed values (LexGLUE F1 conventions, ROUGE, SQuAD EM/F1)."""
from __future__ import annotations

import numpy as np
import pytest

from petl.tasks.metrics import (accuracy, classification_metrics, multiclass_f1, multilabel_f1, qa_metrics, rouge,
                                rouge_scores)


def test_multilabel_f1_with_and_without_lexglue_none_class():
    gold = np.array([[1, 0], [0, 0], [0, 1]])
    pred = np.array([[1, 1], [0, 0], [0, 0]])
    # label 0: tp 1 -> F1 1; label 1: fp 1, fn 1 -> 0; micro 2*1 / (2 + 1 + 1)
    assert multilabel_f1(gold, pred) == pytest.approx({"micro_f1": 0.5, "macro_f1": 0.5})
    # "none" column: gold [0,1,0], pred [0,1,1] -> tp 1, fp 1 -> F1 2/3; micro 2*2 / (4 + 2 + 1)
    scores = multilabel_f1(gold, pred, none_class=True)
    assert scores["micro_f1"] == pytest.approx(4 / 7)
    assert scores["macro_f1"] == pytest.approx((1 + 0 + 2 / 3) / 3)


def test_multilabel_label_absent_everywhere_scores_zero_in_macro():
    gold = np.array([[1, 0], [1, 0]])
    assert multilabel_f1(gold, gold) == pytest.approx({"micro_f1": 1.0, "macro_f1": 0.5})


def test_multiclass_macro_averages_over_classes_seen_in_gold_or_predictions():
    scores = multiclass_f1(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]))
    # class 0: 2*1/(2+0+1); class 1: 2*1/(2+2+0); class 2: 0; micro = accuracy
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0.0) / 3)
    assert scores["micro_f1"] == pytest.approx(0.5)
    assert multiclass_f1(np.array([0, 0]), np.array([0, 0]))["macro_f1"] == 1.0  # unseen classes not averaged


def test_accuracy_is_subset_accuracy_for_indicator_rows():
    assert accuracy(np.array([[1, 0], [0, 1]]), np.array([[1, 0], [1, 1]])) == 0.5
    assert accuracy(np.array([2, 1, 0]), np.array([2, 0, 0])) == pytest.approx(2 / 3)


def test_classification_metrics_threshold_sigmoid_and_argmax():
    logits = np.array([[2.0, -1.0], [-3.0, 0.1]])  # sigmoid > 0.5 where logit > 0
    multi = classification_metrics(logits, np.array([[1, 0], [0, 1]]), multi_label=True)
    assert multi == pytest.approx({"micro_f1": 1.0, "macro_f1": 1.0, "accuracy": 1.0})
    single = classification_metrics(logits, np.array([0, 0]), multi_label=False)
    assert single["accuracy"] == 0.5
    strict = classification_metrics(logits, np.array([[1, 0], [0, 1]]), multi_label=True, threshold=0.6)
    assert strict["accuracy"] == 0.5  # sigmoid(0.1) = 0.525 is below 0.6


def test_rouge_hand_checked():
    scores = rouge_scores("the cat sat on the mat", "the cat is on the mat")
    # unigrams: 5 of 6 shared; bigrams: "the cat", "on the", "the mat" of 5; LCS "the cat on the mat"
    assert scores == pytest.approx({"rouge1": 5 / 6, "rouge2": 3 / 5, "rougeL": 5 / 6, "rougeLsum": 5 / 6})


def test_rouge_lsum_unions_lcs_over_sentences():
    scores = rouge_scores("a c\nb d e", "a b c\nd e")
    # summary level: ref sentence 1 gets {a, c} from pred 1 and {b} from pred 2; sentence 2 gets d e
    assert scores["rougeLsum"] == pytest.approx(1.0)
    assert scores["rougeL"] == pytest.approx(0.8)  # one sequence: LCS "a b d e" = 4 of 5


def test_rouge_tokenisation_and_empty_and_mean():
    assert rouge_scores("The Cat-sat!", "the cat sat")["rouge1"] == 1.0
    assert rouge_scores("", "the cat")["rouge1"] == 0.0
    assert rouge(["a b", "a"], ["a b", "b"])["rouge1"] == pytest.approx(0.5)


def test_squad_exact_match_and_f1_hand_checked():
    assert qa_metrics(["The Cat!"], [["cat"]]) == {"exact_match": 1.0, "f1": 1.0}
    scores = qa_metrics(["the big cat sat"], [["a cat sat down"]])
    assert scores["exact_match"] == 0.0 and scores["f1"] == pytest.approx(2 / 3)
    # no gold answer: only the empty prediction is right; best over several gold answers
    assert qa_metrics(["", "x", "dog"], [[], [], ["cat", "dog"]]) == pytest.approx({"exact_match": 2 / 3, "f1": 2 / 3})


def test_f1_agrees_with_scikit_learn_on_random_labels():
    sklearn = pytest.importorskip("sklearn.metrics")
    from petl.tasks.metrics.classification import add_none_column

    rng = np.random.default_rng(0)
    for _ in range(50):
        n, k = rng.integers(1, 12), rng.integers(2, 6)
        gold, pred = (rng.random((n, k)) < 0.3).astype(int), (rng.random((n, k)) < 0.3).astype(int)
        for none in (False, True):
            g, p = (add_none_column(gold), add_none_column(pred)) if none else (gold, pred)
            ours = multilabel_f1(gold, pred, none_class=none)
            for avg in ("micro", "macro"):
                assert ours[f"{avg}_f1"] == pytest.approx(sklearn.f1_score(g, p, average=avg, zero_division=0))
        gold, pred = rng.integers(0, 5, n), rng.integers(0, 5, n)
        ours = multiclass_f1(gold, pred)
        for avg in ("micro", "macro"):
            assert ours[f"{avg}_f1"] == pytest.approx(sklearn.f1_score(gold, pred, average=avg, zero_division=0))
