"""``run_task_recipe``: classification, multiple choice, extractive QA and generative recipes.

recipe -> data (adapter, labels, de-identification) -> model with task head (or causal LM) ->
adapter -> tokenised training set (truncated, chunked or context-extended) -> TaskTrainer with
atomic checkpoints -> adapter + petl_task.json + recipe.yaml + metrics.json + steps.jsonl +
loss_curve.png + predictions.jsonl -> scoring with the benchmark's metrics.

The output folder has the causal-LM runs' layout; ``petl eval task RUN_DIR`` re-scores it
(:func:`evaluate_run`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from petl.tasks.loading import LabelSpace, load_task_split
from petl.tasks.phi import phi_guard, sample_preview
from petl.train.recipe import Recipe
from petl.train.runner import ADAPTER_DIR, CHECKPOINT_DIR, MODEL_INFO, STEP_LOG, _echo, _model_dtype, start_run

PREDICTIONS = "predictions.jsonl"


def build_model_and_adapter(recipe: Recipe, labels: LabelSpace, precision: str):
    """(model with adapter, tokenizer, info) for the recipe's task type."""
    if recipe.task.type == "generative":
        from petl.train.runner import apply_adapter_section, build_model

        model, tokenizer, info = build_model(recipe, precision)
        return model, tokenizer, info, (lambda m: apply_adapter_section(m, recipe))
    from petl.tasks.models import apply_task_adapter, load_task_model

    model, tokenizer, info, new_modules = load_task_model(recipe, labels=labels, dtype=_model_dtype(recipe, precision))
    return model, tokenizer, info, (lambda m: apply_task_adapter(m, recipe, new_modules))


def build_training_set(recipe: Recipe, records, tokenizer, labels: LabelSpace, max_length: int):
    """(tokenised dataset, collator, preview text) for the task type."""
    task = recipe.task
    pad = tokenizer.pad_token_id
    if task.type == "sequence_classification":
        from petl.tasks.aggregate import ChunkedDocumentCollator
        from petl.tasks.features import encode_classification

        data = encode_classification(records, tokenizer, max_length=max_length, strategy=task.long_document,
                                     num_labels=labels.num_labels, multi_label=labels.multi_label,
                                     overlap=task.chunk_overlap, max_chunks=task.max_chunks,
                                     section_split=task.section_split, truncation_side=task.truncation_side)
        n = sum(data["n_chunks"])
        _echo(f"[petl] {len(data)} documents -> {n} chunks of <= {max_length} tokens ({task.long_document})")
        return data, ChunkedDocumentCollator(pad, multi_label=labels.multi_label), data[0]["input_ids"][0]
    if task.type == "multiple_choice":
        from petl.tasks.features import ChoiceCollator, encode_multiple_choice

        data = encode_multiple_choice(records, tokenizer, max_length=max_length)
        return data, ChoiceCollator(pad), data[0]["input_ids"][0]
    if task.type == "extractive_qa":
        from petl.tasks.qa import QACollator, encode_qa_train

        data = encode_qa_train(records, tokenizer, max_length=max_length, overlap=task.chunk_overlap,
                               all_windows=task.long_document == "chunk",
                               negative_window_ratio=task.negative_window_ratio, seed=recipe.train.seed)
        _echo(f"[petl] {len(records)} questions -> {len(data)} windows of <= {max_length} tokens")
        return data, QACollator(pad), data[0]["input_ids"]
    from petl.data import DataCollatorForCausalLM
    from petl.tasks.generative import build_generative_train

    data = build_generative_train(records, tokenizer, max_length=max_length, template=recipe.data.template,
                                  truncation_side=task.truncation_side)
    multiple = None
    if recipe.attention.pattern != "full":  # S2/SF groups must divide the padded length
        multiple = max(2, int(max_length * recipe.attention.group_ratio))
        multiple += multiple % 2
    return data, DataCollatorForCausalLM(tokenizer, pad_to_multiple_of=multiple), data[0]["input_ids"]


def run_task_recipe(recipe: Recipe, *, resume: bool = False) -> dict[str, Any]:
    """Train and score a task recipe end to end; returns the metrics also written to ``metrics.json``."""
    from transformers import set_seed

    from petl.tasks.models import save_task_info
    from petl.tasks.predict import default_max_length, evaluate_task
    from petl.tasks.trainer import TaskTrainer
    from petl.train.callbacks import JsonlStepLogger, plot_loss_curve
    from petl.train.checkpointing import last_complete_checkpoint

    task = recipe.task
    run = start_run(recipe, resume)
    out, args, state, precision = run.out, run.args, run.state, run.precision
    checkpoint = last_complete_checkpoint(out / CHECKPOINT_DIR) if resume else None
    set_seed(recipe.train.seed)
    with phi_guard(task.phi, "reading the data"), state.main_process_first():
        records, labels = load_task_split(recipe, "train")
        eval_records = None
        if task.eval_split or task.eval_source:
            eval_records = load_task_split(recipe, "eval", labels)[0]
    _echo(f"[petl] {task.type} on {task.dataset or recipe.data.source}: {len(records)} training records, "
          f"{len(eval_records) if eval_records is not None else 0} evaluation records"
          + (f", {labels.num_labels} labels{' (multi-label)' if labels.multi_label else ''}" if labels.names else ""))
    _echo(f"[petl] loading {recipe.model.name} (training precision {precision})")
    model, tokenizer, info, attach = build_model_and_adapter(recipe, labels, precision)
    max_length = default_max_length(recipe, model, tokenizer)
    with phi_guard(task.phi, "tokenising"), state.main_process_first():
        dataset, collator, first = build_training_set(recipe, records, tokenizer, labels, max_length)
    _echo(sample_preview(tokenizer.decode(first, skip_special_tokens=True), task.phi, "first training input"))

    metrics: dict[str, Any] = {"recipe": recipe.name, "model": info, "task": task.type, "max_length": max_length,
                               "long_document": task.long_document, "labels": labels.names}
    if recipe.eval.before_training and eval_records is not None and state.is_main_process:
        with phi_guard(task.phi, "scoring before training"):
            metrics["before"] = evaluate_task(model, tokenizer, recipe, eval_records, labels)[0]
    model = attach(model)
    metrics["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    metrics["total_parameters"] = sum(p.numel() for p in model.parameters())
    _echo(f"[petl] trainable parameters: {metrics['trainable_parameters']:,} of {metrics['total_parameters']:,}")

    resume_step = int(checkpoint.name.split("-")[-1]) if checkpoint else 0
    if resume:
        _echo(f"[petl] resuming from {checkpoint}" if checkpoint else
              f"[petl] no complete checkpoint under {out / CHECKPOINT_DIR}; starting from step 0")
    trainer = TaskTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                          callbacks=[JsonlStepLogger(out / STEP_LOG, resume_step=resume_step)],
                          aggregate=task.aggregate if task.type == "sequence_classification" else None,
                          multi_label=labels.multi_label, mean_loss=task.type != "generative")
    base_config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    use_cache, base_config.use_cache = getattr(base_config, "use_cache", None), False
    with phi_guard(task.phi, "training"):
        train_output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    base_config.use_cache = use_cache
    metrics["train"] = dict(train_output.metrics)

    if state.is_main_process:
        adapter_dir = out / ADAPTER_DIR
        model.save_pretrained(str(adapter_dir))
        tokenizer.save_pretrained(str(adapter_dir))
        save_task_info(adapter_dir, recipe, labels, {**info, "max_length": max_length})
        if task.type == "generative":
            (adapter_dir / MODEL_INFO).write_text(json.dumps(info, indent=2))
        plot_loss_curve(out / STEP_LOG, out / "loss_curve.png", title=f"{recipe.name}: training loss")
        if eval_records is not None:
            with phi_guard(task.phi, "scoring after training"):
                metrics["after"], predictions = evaluate_task(model, tokenizer, recipe, eval_records, labels)
            write_predictions(out / PREDICTIONS, predictions)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
        _echo(format_task_summary(metrics, out))
    state.wait_for_everyone()
    return metrics


def write_predictions(path: Path, predictions: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in predictions:
            handle.write(json.dumps(row, default=str) + "\n")


def format_task_summary(metrics: dict[str, Any], out: Path) -> str:
    lines = [f"[petl] done: adapter in {out / ADAPTER_DIR}, metrics in {out / 'metrics.json'}"]
    before, after = metrics.get("before", {}), metrics.get("after", {})
    if after:
        lines.append(f"  {'metric':>12} {'before':>8} {'after':>8}")
        for name, value in after.items():
            prev = before.get(name)
            lines.append(f"  {name:>12} {'' if prev is None else f'{prev:.4f}':>8} {value:>8.4f}")
    return "\n".join(lines)


def evaluate_run(run_dir: str | Path, *, split: Optional[str] = None, source: Optional[str] = None,
                 max_samples: Optional[int] = None, device: Optional[str] = None):
    """Re-score a finished task run (its ``recipe.yaml`` and ``adapter/``) -> (recipe, metrics, predictions).

    Args:
        run_dir: the output folder of ``petl finetune`` for a task recipe.
        split, source, max_samples: override ``task.eval_split`` / ``task.eval_source`` /
            ``task.max_eval_samples`` (e.g. score the test split).
    """
    import dataclasses

    from petl.models import apply_adapter
    from petl.tasks.models import load_task_model, read_task_info
    from petl.tasks.predict import evaluate_task
    from petl.train.recipe_io import load_recipe

    run = Path(run_dir)
    recipe = load_recipe(str(run / "recipe.yaml"))
    changes = {k: v for k, v in (("eval_split", split), ("eval_source", source), ("max_eval_samples", max_samples))
               if v is not None}
    recipe = dataclasses.replace(recipe, task=dataclasses.replace(recipe.task, **changes))
    adapter_dir = run / ADAPTER_DIR
    saved = read_task_info(adapter_dir)
    labels = LabelSpace(names=saved["labels"], multi_label=saved["multi_label"], none_class=saved["none_class"],
                        answer_choices=saved.get("answer_choices", []))
    with phi_guard(recipe.task.phi, "reading the evaluation data"):
        records = load_task_split(recipe, "eval", labels)[0]
    if recipe.task.type == "generative":
        from petl.models import load_model

        model, tokenizer = load_model(recipe.model.name, adapter=str(adapter_dir), dtype=recipe.model.dtype,
                                      trust_remote_code=recipe.model.trust_remote_code, device=device)
    else:
        model, tokenizer, _, _ = load_task_model(recipe, labels=labels, dtype=recipe.model.dtype, device=device)
        model = apply_adapter(model, str(adapter_dir))
    with phi_guard(recipe.task.phi, "scoring"):
        metrics, predictions = evaluate_task(model, tokenizer, recipe, records, labels)
    return recipe, metrics, predictions
