"""Benchmark metrics for the legal and clinical tasks: LexGLUE micro/macro-F1, accuracy, ROUGE,
SQuAD-style exact match / F1. Plain numpy / Python: no scikit-learn or rouge_score needed."""
from petl.tasks.metrics.classification import (accuracy, classification_metrics, multiclass_f1,
                                               multilabel_f1)
from petl.tasks.metrics.qa import exact_match, normalize_answer, qa_metrics, token_f1
from petl.tasks.metrics.rouge import ROUGE_TYPES, rouge, rouge_scores

__all__ = ["ROUGE_TYPES", "accuracy", "classification_metrics", "exact_match", "multiclass_f1", "multilabel_f1",
           "normalize_answer", "qa_metrics", "rouge", "rouge_scores", "token_f1"]
