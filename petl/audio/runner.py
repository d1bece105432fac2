"""``run_audio_recipe``: PETL-AST fine-tuning of an Audio Spectrogram Transformer, fold by fold.

recipe -> corpus (local folder or hub id) -> runs of the protocol (official split or k-fold
rotation) -> per run: AST with a fresh head and resized positional embeddings -> peft adapter ->
Trainer (atomic checkpoints, JSONL log) validating every epoch -> the best-on-validation adapter
evaluated on the test split -> metrics per run and mean +- std over runs.

Output folder: the causal-LM layout (recipe.yaml, metrics.json, adapter/, checkpoints/,
steps.jsonl, loss_curve.png) for an official split; for a rotation each run has that layout in
``fold-<r>/`` and the top-level metrics.json aggregates them. A resumed run skips finished folds
and continues an unfinished one from its last complete checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from petl.audio.datasets import FoldSplit, load_corpus, per_class, plan_splits, subsample
from petl.audio.selection import BestAdapterCallback, restore_adapter
from petl.train.recipe import Recipe
from petl.train.schema_types import RecipeError

FOLD_METRICS = "metrics.json"


def _echo(message: str) -> None:
    print(message, flush=True)


def audio_adapter_config(recipe: Recipe):
    """The peft config of the recipe's adapter section (``type: audio``) with the audio pooling."""
    from petl.adapters.audio import AudioAdapterConfig

    section = recipe.adapter
    if section.type != "audio":
        raise RecipeError(f"audio_classification recipes use adapter.type 'audio' (PETL-AST methods, e.g. "
                          f"options {{method: lora}}), not {section.type!r}")
    options = dict(section.options)
    if "pooling" in options:
        raise RecipeError("set the pooling with audio.pooling, not adapter.options.pooling")
    if section.trainable_modules:
        options.setdefault("modules_to_save", None)
        extra = AudioAdapterConfig(**{**options, "pooling": recipe.audio.pooling}).modules_to_save
        options["modules_to_save"] = list(dict.fromkeys([*extra, *section.trainable_modules]))
    try:
        return AudioAdapterConfig(**options, pooling=recipe.audio.pooling)
    except TypeError as exc:
        raise RecipeError(f"adapter.options: {exc}; see AudioAdapterConfig for the allowed keys") from None
    except ValueError as exc:
        raise RecipeError(f"adapter.options: {exc}") from None


def run_audio_recipe(recipe: Recipe, resume: bool = False) -> dict[str, Any]:
    """Run an ``audio_classification`` recipe; returns the metrics written to ``metrics.json``."""
    from petl.train.runner import start_run

    if recipe.task.options:
        raise RecipeError(f"task.options {sorted(recipe.task.options)} are not used by audio_classification; "
                          "its settings live in the audio section")
    section = recipe.audio
    audio_adapter_config(recipe)  # validate before any data or model is loaded
    corpus = load_corpus(section.dataset, section.source, section.hub_config, recipe.model.trust_remote_code)
    runs = plan_splits(corpus, section.protocol, section.val_folds, section.folds or None)
    run = start_run(recipe, resume, before_prepare=lambda folder: _prepare(recipe, folder, resume))
    out, state = run.out, run.state
    _echo(f"[petl] {corpus.name}: {len(corpus.examples)} clips, {len(corpus.label_names)} classes, "
          f"{len(runs)} run(s) ({section.protocol})")
    results = [run_fold(recipe, out / run.name if run.name else out, run, corpus.label_names, resume)
               for run in runs]
    metrics = {"recipe": recipe.name, "dataset": corpus.name, "protocol": section.protocol,
               "num_classes": len(corpus.label_names), "runs": results, **summarise(results)}
    if state.is_main_process:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
        _echo(format_summary(metrics, out))
    return metrics


def _prepare(recipe: Recipe, out: Path, resume: bool) -> None:
    """Refuse (or clear, with output.overwrite) fold folders of an earlier rotation run."""
    stale = sorted(out.glob("fold-*")) if out.is_dir() else []
    if stale and not resume:
        if not recipe.output.overwrite:
            raise RecipeError(f"output folder {str(out)!r} already holds a run; pass --resume to continue it, "
                              "set output.overwrite=true to replace it, or choose output.dir=...")
        for path in stale:
            shutil.rmtree(path)


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and (population) standard deviation of each accuracy over the runs."""
    summary: dict[str, Any] = {}
    for key in ("test_accuracy", "validation_accuracy"):
        values = [r[key] for r in results if r.get(key) is not None]
        if values:
            summary[key] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "per_run": values}
    if results:
        summary["trainable_parameters"] = results[0]["trainable_parameters"]
        summary["total_parameters"] = results[0]["total_parameters"]
    return summary


def _datasets(recipe: Recipe, run: FoldSplit, featurizer):
    """Train (few-shot / subsampled, SpecAugment), validation (None when absent) and test datasets."""
    from petl.audio.augment import SpecAugment
    from petl.audio.clips import ClipDataset

    s, seed = recipe.audio, recipe.train.seed
    train = per_class(run.train, s.train_per_class) if s.train_per_class else run.train
    augment = SpecAugment(s.freq_mask, s.time_mask, s.num_freq_masks, s.num_time_masks)
    train_set = ClipDataset(subsample(train, s.max_train_samples, seed), featurizer, augment, s.cache_features)

    def held_out(items):
        return ClipDataset(subsample(items, s.max_eval_samples, seed), featurizer, None, s.cache_features)

    return train_set, (held_out(run.validation) if run.validation else None), held_out(run.test)


def _arguments(recipe: Recipe, folder: Path, steps_per_epoch: int, has_validation: bool):
    from petl.train.runner import _precision, training_arguments

    s = recipe.audio
    args = training_arguments(recipe, folder, _precision(recipe))
    changes: dict[str, Any] = {"adam_epsilon": s.adam_epsilon, "label_names": ["labels"],
                               "per_device_eval_batch_size": s.eval_batch_size or recipe.train.batch_size}
    if s.epochs:
        changes["max_steps"] = s.epochs * steps_per_epoch
    if has_validation:
        changes.update(eval_strategy="steps", eval_steps=s.eval_steps or steps_per_epoch)
    return dataclasses.replace(args, **changes)


def _accuracy(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


def run_fold(recipe: Recipe, folder: Path, run: FoldSplit, label_names: list[str], resume: bool) -> dict[str, Any]:
    """Train and test one run of the protocol in ``folder``; returns (and writes) its metrics."""
    from peft import get_peft_model
    from transformers import set_seed

    import petl.adapters.audio  # noqa: F401 - registers the peft method (needed to resume)
    from petl.audio.backbone import load_ast_classifier, resize_position_embeddings
    from petl.audio.clips import collate_clips
    from petl.audio.features import AstFeaturizer
    from petl.train.callbacks import JsonlStepLogger, plot_loss_curve
    from petl.train.checkpointing import AtomicCheckpointTrainer, last_complete_checkpoint
    from petl.train.runner import ADAPTER_DIR, CHECKPOINT_DIR, STEP_LOG

    done = folder / FOLD_METRICS
    if resume and run.name and done.is_file():
        _echo(f"[petl] {run.name}: finished earlier, reusing {done}")
        return json.loads(done.read_text())
    s = recipe.audio
    if s.selection == "best_val" and not run.validation:
        raise RecipeError("audio.selection=best_val needs a validation split, which this data set / protocol "
                          "lacks; use audio.protocol=rotation with audio.val_folds >= 1, or audio.selection=last")
    folder.mkdir(parents=True, exist_ok=True)
    set_seed(recipe.train.seed)
    dtype = None if recipe.model.dtype == "auto" else getattr(torch, recipe.model.dtype)
    model = load_ast_classifier(recipe.model.name, label_names, None, s.pos_embed, recipe.model.revision, dtype,
                                recipe.model.trust_remote_code)
    frames = s.frames_for(model.config.max_length)
    if frames != model.config.max_length or s.pos_embed == "zero":
        resize_position_embeddings(model, frames, s.pos_embed)
    featurizer = AstFeaturizer(model.config.num_mel_bins, frames, s.norm_mean, s.norm_std, s.sample_rate)
    train, validation, test = _datasets(recipe, run, featurizer)
    model = get_peft_model(model, audio_adapter_config(recipe))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    _echo(f"[petl] {run.name or 'run'}: {len(train)} train / {len(validation or [])} validation / {len(test)} test "
          f"clips of {frames} frames; trainable {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")

    steps_per_epoch = max(1, math.ceil(len(train) / (recipe.train.batch_size * recipe.train.grad_accum)))
    args = _arguments(recipe, folder, steps_per_epoch, validation is not None)
    checkpoint = last_complete_checkpoint(folder / CHECKPOINT_DIR) if resume else None
    resume_step = int(checkpoint.name.split("-")[-1]) if checkpoint else 0
    best = BestAdapterCallback(folder / "best", resume=resume)
    trainer = AtomicCheckpointTrainer(model=model, args=args, train_dataset=train, eval_dataset=validation,
                                      data_collator=collate_clips, compute_metrics=_accuracy,
                                      callbacks=[JsonlStepLogger(folder / STEP_LOG, resume_step=resume_step), best])
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if validation is not None and best.last_step != trainer.state.global_step:
        trainer.evaluate()  # the final adapter competes too
    chosen_step: Optional[int] = trainer.state.global_step
    if s.selection == "best_val" and best.best_step is not None:
        trainer.accelerator.wait_for_everyone()  # the main process has written best/
        restore_adapter(model, best.folder)
        chosen_step = best.best_step
    test_metrics = trainer.evaluate(test, metric_key_prefix="test")
    main_process = trainer.is_world_process_zero()
    if main_process:
        model.save_pretrained(str(folder / ADAPTER_DIR))
        plot_loss_curve(folder / STEP_LOG, folder / "loss_curve.png", title=f"{recipe.name} {run.name or ''}".strip())
    result = {"run": run.name, "selected_step": chosen_step, "selection": s.selection,
              "validation_accuracy": best.best_value if s.selection == "best_val" else best.last_value,
              "test_accuracy": test_metrics["test_accuracy"], "test_loss": test_metrics["test_loss"],
              "trainable_parameters": trainable, "total_parameters": total, "max_frames": frames,
              "train_clips": len(train), "validation_clips": len(validation or []), "test_clips": len(test),
              "validation_history": best.history}
    if main_process:
        done.write_text(json.dumps(result, indent=2))
    return result


def format_summary(metrics: dict[str, Any], out: Path) -> str:
    lines = [f"[petl] done: metrics in {out / 'metrics.json'}"]
    for r in metrics["runs"]:
        val = r.get("validation_accuracy")
        lines.append(f"  {r['run'] or 'official split':>14}: test accuracy {100 * r['test_accuracy']:.2f}%"
                     + (f" (validation {100 * val:.2f}% at step {r['selected_step']})" if val is not None else ""))
    acc = metrics.get("test_accuracy")
    if acc and len(acc["per_run"]) > 1:
        lines.append(f"  mean over {len(acc['per_run'])} runs: {100 * acc['mean']:.2f} +- {100 * acc['std']:.2f}%")
    return "\n".join(lines)
