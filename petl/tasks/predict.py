"""Scoring a trained task model on evaluation records with the benchmark's metrics.

``evaluate_task`` encodes the records the same way training did, runs the model in eval mode (full
attention) without gradients, pools chunk logits, decodes QA spans or generates answers, and
returns ``(metrics, predictions)``. Predictions hold label names, spans or generated texts per
record; with ``task.phi`` they keep only indices and label ids — never text.
"""
from __future__ import annotations

from typing import Any, Callable

import datasets
import numpy as np
import torch

from petl.tasks.aggregate import ChunkedDocumentCollator, chunked_forward
from petl.tasks.metrics import classification_metrics, qa_metrics
from petl.tasks.section import TASK_METRICS


def default_max_length(recipe: Any, model: Any, tokenizer: Any) -> int:
    """``task.max_length``, else the model's input limit (``model.context_length`` with ``extend``)."""
    if recipe.task.max_length:
        return recipe.task.max_length
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    positions = getattr(config, "max_position_embeddings", None) or 512
    if recipe.task.long_document == "extend" or recipe.task.type == "generative":
        return recipe.model.context_length or positions
    # RoBERTa-style encoders (Longformer too) number positions from padding_idx + 1: 514 slots, 512 tokens
    if getattr(config, "model_type", "") in ("roberta", "longformer", "xlm-roberta", "camembert"):
        positions -= 2
    tokenizer_limit = getattr(tokenizer, "model_max_length", None) or positions
    return int(min(positions, tokenizer_limit))


def _batches(dataset: datasets.Dataset, collate: Callable, batch_size: int, device: torch.device):
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        yield {k: v.to(device) for k, v in batch.items()}


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict_documents(model: Any, encoded: datasets.Dataset, *, pad_token_id: int, aggregate: str,
                      batch_size: int) -> np.ndarray:
    """Document logits ``# [N, L]`` (chunk logits pooled with ``aggregate``)."""
    collate = ChunkedDocumentCollator(pad_token_id)
    cols = [c for c in encoded.column_names if c in ("input_ids", "attention_mask", "token_type_ids")]
    out = [chunked_forward(model, batch, aggregate).float().cpu()
           for batch in _batches(encoded.select_columns(cols), collate, batch_size, _device(model))]
    return torch.cat(out).numpy()


@torch.no_grad()
def predict_choices(model: Any, encoded: datasets.Dataset, *, pad_token_id: int, batch_size: int) -> np.ndarray:
    """Choice logits ``# [N, K]``."""
    from petl.tasks.features import ChoiceCollator

    cols = [c for c in encoded.column_names if c in ("input_ids", "attention_mask", "token_type_ids")]
    batches = _batches(encoded.select_columns(cols), ChoiceCollator(pad_token_id), batch_size, _device(model))
    out = [model(**batch).logits.float().cpu() for batch in batches]
    return torch.cat(out).numpy()


@torch.no_grad()
def predict_spans(model: Any, windows: datasets.Dataset, *, pad_token_id: int, batch_size: int):
    """Start / end logits per window, each ``# [T_w]`` (padding removed)."""
    from petl.tasks.qa import QACollator

    cols = [c for c in windows.column_names if c in ("input_ids", "attention_mask", "token_type_ids")]
    starts, ends = [], []
    for batch in _batches(windows.select_columns(cols), QACollator(pad_token_id), batch_size, _device(model)):
        out = model(**batch)
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        for row, n in enumerate(lengths):
            starts.append(out.start_logits[row, :n].float().cpu().numpy())
            ends.append(out.end_logits[row, :n].float().cpu().numpy())
    return starts, ends


def select_metrics(recipe: Any, scores: dict[str, float]) -> dict[str, float]:
    """The metrics the recipe asks for (default: the benchmark's own set, else the task's)."""
    from petl.tasks.registry import get_adapter

    wanted = list(recipe.task.metrics) or list(get_adapter(recipe.task.dataset, recipe.task.type).metrics.get(
        recipe.task.type, ())) or list(TASK_METRICS[recipe.task.type][:3])
    return {name: float(scores[name]) for name in wanted if name in scores}


def evaluate_task(model: Any, tokenizer: Any, recipe: Any, records: datasets.Dataset, labels: Any,
                  ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Score ``records`` (task format, labels already ids) -> (metrics, per-record predictions)."""
    task = recipe.task
    was_training = model.training
    model.eval()
    max_length = default_max_length(recipe, model, tokenizer)
    pad = tokenizer.pad_token_id
    try:
        if task.type == "sequence_classification":
            from petl.tasks.features import encode_classification

            encoded = encode_classification(records, tokenizer, max_length=max_length, strategy=task.long_document,
                                            num_labels=labels.num_labels, multi_label=labels.multi_label,
                                            overlap=task.chunk_overlap, max_chunks=task.max_chunks,
                                            section_split=task.section_split, truncation_side=task.truncation_side)
            logits = predict_documents(model, encoded, pad_token_id=pad, aggregate=task.aggregate,
                                       batch_size=task.eval_batch_size)
            gold = np.asarray(encoded["labels"])
            scores = classification_metrics(logits, gold, multi_label=labels.multi_label, threshold=task.threshold,
                                             none_class=labels.none_class)
            preds = _class_predictions(logits, gold, labels, task.threshold)
        elif task.type == "multiple_choice":
            from petl.tasks.features import encode_multiple_choice

            encoded = encode_multiple_choice(records, tokenizer, max_length=max_length)
            logits = predict_choices(model, encoded, pad_token_id=pad, batch_size=task.eval_batch_size)
            gold = np.asarray(encoded["labels"])
            scores = classification_metrics(logits, gold, multi_label=False)
            preds = [{"index": i, "gold": int(g), "pred": int(p)}
                     for i, (g, p) in enumerate(zip(gold, logits.argmax(-1)))]
        elif task.type == "extractive_qa":
            scores, preds = _evaluate_qa(model, tokenizer, recipe, records, max_length)
        else:
            from petl.tasks.generative import evaluate_generative

            scores, preds = evaluate_generative(model, tokenizer, recipe, records, labels)
    finally:
        model.train(was_training)
    if task.phi:
        preds = [{k: v for k, v in p.items() if k in ("index", "gold", "pred", "correct")} for p in preds]
    return select_metrics(recipe, scores), preds


def _class_predictions(logits: np.ndarray, gold: np.ndarray, labels: Any, threshold: float) -> list[dict[str, Any]]:
    if labels.multi_label:
        pred = (1 / (1 + np.exp(-logits)) > threshold)
        return [{"index": i, "gold": [labels.names[j] for j in np.flatnonzero(g)],
                 "pred": [labels.names[j] for j in np.flatnonzero(p)]} for i, (g, p) in enumerate(zip(gold, pred))]
    return [{"index": i, "gold": labels.names[int(g)], "pred": labels.names[int(p)]}
            for i, (g, p) in enumerate(zip(gold, logits.argmax(-1)))]


def _evaluate_qa(model: Any, tokenizer: Any, recipe: Any, records: datasets.Dataset, max_length: int):
    from petl.tasks.qa import decode_answers, encode_qa_eval

    task = recipe.task
    windows = encode_qa_eval(records, tokenizer, max_length=max_length, overlap=task.chunk_overlap,
                             all_windows=task.long_document == "chunk")
    starts, ends = predict_spans(model, windows, pad_token_id=tokenizer.pad_token_id, batch_size=task.eval_batch_size)
    golds = [a["text"] for a in records["answers"]]
    allow_null = any(not g for g in golds)
    answers = decode_answers(records["context"], windows, starts, ends, max_answer_tokens=task.max_answer_tokens,
                             allow_no_answer=allow_null)
    scores = qa_metrics(answers, golds)
    preds = [{"index": i, "id": records[i]["id"], "prediction": a, "gold": g}
             for i, (a, g) in enumerate(zip(answers, golds))]
    return scores, preds
