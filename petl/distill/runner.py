"""``run_distill``: the data flow of ``petl distill RECIPE`` (LAWCAT, adapters.md §3.3).

recipe -> teacher (hub id / local / embedded; dtype) -> teacher evaluation, as published -> RoPE
scaling when ``model.context_length`` asks for it -> convert the chosen layers to LAWCAT -> stage 1 attention transfer (per-layer output MSE against
the teacher's softmax attention, same forward pass; only LAWCAT parameters train) -> save the
converted model -> stage 2 LoRA on q/k/v/o with next-token loss -> save adapter (and merged model)
-> student evaluation -> metrics.json.

Both stages are ``transformers.Trainer`` runs with atomic checkpoints; ``resume=True`` continues
the stage that was running (stage 1 from its newest checkpoint, or stage 2 from the saved stage-1
model and its newest checkpoint). The folder layout is described in :mod:`petl.distill.outputs`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from petl.distill import outputs as layout
from petl.train.recipe import Recipe
from petl.train.schema_types import RecipeError


def _echo(message: str) -> None:
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(message, flush=True)


def check_distill_recipe(recipe: Recipe) -> None:
    """Reject recipe settings that ``petl distill`` cannot honour, with a one-line fix."""
    if recipe.task.type != "causal_lm":
        raise RecipeError(f"recipe key 'task.type' is {recipe.task.type!r}; petl distill linearises causal LMs, "
                          "set task.type=causal_lm")
    if recipe.attention.pattern != "full":
        raise RecipeError(f"recipe key 'attention.pattern' is {recipe.attention.pattern!r}; the teacher of "
                          "petl distill uses full attention, set attention.pattern=full")
    if recipe.model.quantization != "none":
        raise RecipeError("recipe key 'model.quantization' must be 'none' for petl distill: the teacher's "
                          "projections are shared with the student and merged after stage 2")
    if recipe.train.kernels == "on":
        raise RecipeError("recipe key 'train.kernels' = 'on' is not honoured by petl distill (LAWCAT layers have their "
                          "own kernels, distill.backend); set train.kernels=auto or off")
    if recipe.data.format != "pretrain":
        raise RecipeError(f"recipe key 'data.format' is {recipe.data.format!r}; distillation uses packed text, "
                          "set data.format=pretrain")
    if recipe.data.restart_positions:
        raise RecipeError("recipe key 'data.restart_positions' must be false for petl distill: LAWCAT's state "
                          "runs across packed documents, so the teacher must attend across them too")


def _stage_args(recipe: Recipe, out: Path, precision: str, stage: int):
    """TrainingArguments of one stage: shared ``train`` settings, the stage's steps / lr / schedule."""
    from petl.train.runner import training_arguments

    s = recipe.distill.stage1 if stage == 1 else recipe.distill.stage2
    train = dataclasses.replace(recipe.train, max_steps=max(s.steps, 1), lr=s.lr,
                                lr_scheduler=s.lr_scheduler, warmup_steps=s.warmup_steps)
    return training_arguments(dataclasses.replace(recipe, train=train), out / f"stage{stage}", precision)


def _fp32_trainable(model, precision: str) -> None:
    if precision == "fp16":  # fp16 optimiser states need fp32 master weights
        for p in model.parameters():
            if p.requires_grad and p.dtype == torch.float16:
                p.data = p.data.float()


def build_distill_dataset(recipe: Recipe, tokenizer, block_size: int):
    """Packed text blocks of ``block_size`` tokens plus ``distill.passkey_samples`` passkey sequences."""
    from petl.train.runner import build_train_dataset

    blocks = build_train_dataset(recipe, tokenizer, block_size)
    n = recipe.distill.passkey_samples
    if not n:
        return blocks
    import datasets

    from petl.distill.passkey_data import passkey_training_dataset

    try:
        extra = passkey_training_dataset(tokenizer, n, block_size, seed=recipe.train.seed)
    except ValueError as exc:  # the block cannot hold even the prompt without filler
        raise RecipeError(f"recipe key 'distill.passkey_samples' needs longer sequences: {exc} "
                          "(set data.block_size higher, or distill.passkey_samples=0)") from None
    return datasets.concatenate_datasets([blocks, extra.cast(blocks.features)])


def _train_stage(recipe: Recipe, out: Path, stage: int, trainer_cls, model, dataset, collator, precision: str,
                 resume: bool, callbacks: Sequence, **trainer_kwargs) -> dict[str, Any]:
    """Run one stage's Trainer (resuming from its newest complete checkpoint); returns its metrics."""
    from petl.distill.steplog import StageStepLogger
    from petl.train.checkpointing import last_complete_checkpoint

    args = _stage_args(recipe, out, precision, stage)
    checkpoint = last_complete_checkpoint(args.output_dir) if resume else None
    resume_step = int(checkpoint.name.split("-")[-1]) if checkpoint else 0
    logger = StageStepLogger(out / layout.STEP_LOG, layout.STAGE_NAMES[stage], resume_step=resume_step)
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, data_collator=collator,
                          callbacks=[logger, *callbacks], **trainer_kwargs)
    if checkpoint is not None:
        _echo(f"[petl] stage {stage}: resuming from {checkpoint}")
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    use_cache, config.use_cache = config.use_cache, False
    try:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        config.use_cache = use_cache
    if trainer.state.global_step < args.max_steps:
        raise RuntimeError(f"stage {stage} stopped at step {trainer.state.global_step} of {args.max_steps}; "
                           "run again with --resume to continue it")
    metrics = dict(result.metrics)
    losses = [h for h in trainer.state.log_history if "loss" in h]
    if losses:
        metrics["final_log"] = losses[-1]
    return metrics


def _stage1(recipe: Recipe, out: Path, precision: str, resume: bool, callbacks: Sequence):
    """Teacher -> converted model trained by attention transfer, saved to ``lawcat/``."""
    from transformers import set_seed

    from petl.data import DataCollatorForCausalLM
    from petl.distill.attention_transfer import prepare_attention_transfer
    from petl.distill.checkpoint import AttentionTransferCheckpointTrainer
    from petl.linear import convert_to_lawcat, save_lawcat
    from petl.train.runner import evaluate, load_base_model, prepare_for_training

    from accelerate import PartialState

    state = PartialState()
    _echo(f"[petl] loading teacher {recipe.model.name}")
    model, tokenizer = load_base_model(recipe, precision)
    before_file = out / layout.EVAL_BEFORE
    if recipe.eval.before_training and state.is_main_process and not (resume and before_file.is_file()):
        before_file.write_text(json.dumps(evaluate(model, tokenizer, recipe, "teacher"), indent=2, default=str))
    info = prepare_for_training(model, recipe)  # RoPE scaling when model.context_length asks for it
    block_size = recipe.data.block_size or info["context_length"]
    set_seed(recipe.train.seed)
    convert_to_lawcat(model, recipe.distill.lawcat_config())
    record: dict[str, Any] = {"model": info, "block_size": block_size,
                              "trainable_parameters": prepare_attention_transfer(model)}
    _echo(f"[petl] stage 1 (attention transfer): {record['trainable_parameters']:,} LAWCAT parameters, "
          f"{recipe.distill.stage1.steps} steps at {block_size} tokens")
    if recipe.distill.stage1.steps > 0:
        with state.main_process_first():
            dataset = build_distill_dataset(recipe, tokenizer, block_size)
        _fp32_trainable(model, precision)
        record["train"] = _train_stage(recipe, out, 1, AttentionTransferCheckpointTrainer, model, dataset,
                                       DataCollatorForCausalLM(tokenizer), precision, resume, callbacks,
                                       loss_scale=recipe.distill.stage1.loss_scale)
    model.eval()
    if state.is_main_process:
        def write(folder: Path) -> None:
            save_lawcat(model, folder)
            tokenizer.save_pretrained(str(folder))
        layout.write_complete(out / layout.LAWCAT_DIR, write, record)
    state.wait_for_everyone()
    return model, tokenizer, record


def _load_stage1(recipe: Recipe, out: Path, precision: str):
    from petl.linear import load_lawcat
    from petl.models import load_tokenizer
    from petl.train.runner import _model_dtype

    folder = out / layout.LAWCAT_DIR
    _echo(f"[petl] stage 1 already done: loading {folder}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_lawcat(folder, dtype=_model_dtype(recipe, precision),
                        attn_implementation=recipe.model.attn_implementation).to(device)
    return model, load_tokenizer(str(folder)), layout.read_marker(folder)


def _stage2(recipe: Recipe, out: Path, model, tokenizer, block_size: int, precision: str, resume: bool,
            callbacks: Sequence):
    """LoRA on the converted model with next-token loss; saves ``adapter/``."""
    from accelerate import PartialState
    from transformers import set_seed

    from petl.data import DataCollatorForCausalLM
    from petl.distill.finetune import prepare_lora_finetune
    from petl.train.checkpointing import AtomicCheckpointTrainer

    s, state = recipe.distill.stage2, PartialState()
    set_seed(recipe.train.seed)  # LoRA init: identical whether or not the run was resumed here
    model = prepare_lora_finetune(model, r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                                  target_modules=s.target_modules)
    _fp32_trainable(model, precision)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _echo(f"[petl] stage 2 (LoRA r={s.lora_r} on {', '.join(s.target_modules)}): {trainable:,} parameters, "
          f"{s.steps} steps")
    with state.main_process_first():
        dataset = build_distill_dataset(recipe, tokenizer, block_size)
    metrics = _train_stage(recipe, out, 2, AtomicCheckpointTrainer, model, dataset,
                           DataCollatorForCausalLM(tokenizer), precision, resume, callbacks)
    model.eval()
    if state.is_main_process:
        def write(folder: Path) -> None:
            model.save_pretrained(str(folder))
            tokenizer.save_pretrained(str(folder))
        layout.write_complete(out / layout.ADAPTER_DIR, write, {"train": metrics})
    state.wait_for_everyone()
    return model, {"trainable_parameters": trainable, "train": metrics}


def run_distill(recipe: Recipe, *, resume: bool = False, stop_after: Optional[int] = None,
                callbacks: Sequence = ()) -> dict[str, Any]:
    """Run a LAWCAT distillation recipe end to end; returns the metrics written to ``metrics.json``.

    Args:
        recipe (Recipe): a validated recipe with a ``distill`` section.
        resume (bool): continue a killed run: the stage that was running, from its newest
            complete checkpoint. Default: False.
        stop_after (int, Optional): 1 stops once stage 1 is saved (``--resume`` later continues
            with stage 2). Default: None (both stages).
        callbacks (Sequence[TrainerCallback]): extra callbacks for both stages' Trainers.
    """
    from transformers import set_seed

    from petl.distill.steplog import plot_stage_losses
    from petl.train.runner import start_run

    if stop_after not in (None, 1):
        raise ValueError(f"stop_after={stop_after!r}: use None (both stages) or 1 (stop after stage 1)")
    check_distill_recipe(recipe)
    run = start_run(recipe, resume, run_entries=layout.RUN_ENTRIES,
                    arguments=lambda r, folder, precision: _stage_args(r, folder, precision, 1))
    out, state, precision = run.out, run.state, run.precision
    if resume and (out / layout.METRICS).is_file():
        _echo(f"[petl] {out} already holds a finished distillation; nothing to resume")
        return json.loads((out / layout.METRICS).read_text())
    set_seed(recipe.train.seed)
    if resume and layout.is_complete(out / layout.LAWCAT_DIR):
        model, tokenizer, stage1 = _load_stage1(recipe, out, precision)
    else:
        model, tokenizer, stage1 = _stage1(recipe, out, precision, resume, callbacks)
    if stop_after == 1:
        _echo(f"[petl] stage 1 saved in {out / layout.LAWCAT_DIR}; continue with --resume")
        return {"stage1": stage1}
    metrics: dict[str, Any] = {"recipe": recipe.name, "model": stage1.get("model"),
                               "lawcat": recipe.distill.lawcat_config().to_dict(), "stage1": stage1}
    if recipe.distill.stage2.steps > 0:
        model, metrics["stage2"] = _stage2(recipe, out, model, tokenizer, stage1["block_size"], precision,
                                           resume, callbacks)
    if state.is_main_process:
        _finish(recipe, out, model, tokenizer, metrics)
        plot_stage_losses(out / layout.STEP_LOG, out / "loss_curve.png", f"{recipe.name}: LAWCAT distillation")
        (out / layout.METRICS).write_text(json.dumps(metrics, indent=2, default=str))
        _echo(format_distill_summary(metrics, out))
    state.wait_for_everyone()
    return metrics


def _finish(recipe: Recipe, out: Path, model, tokenizer, metrics: dict[str, Any]) -> None:
    """Merge (if asked), evaluate the student against the teacher's numbers."""
    from petl.linear import save_lawcat
    from petl.train.runner import evaluate

    if recipe.distill.stage2.steps > 0 and recipe.distill.stage2.merge:
        model = model.merge_and_unload()

        def write(folder: Path) -> None:
            save_lawcat(model, folder)
            tokenizer.save_pretrained(str(folder))
        layout.write_complete(out / layout.MERGED_DIR, write)
    before = out / layout.EVAL_BEFORE
    if before.is_file():
        metrics["before"] = json.loads(before.read_text())
    metrics["after"] = evaluate(model, tokenizer, recipe, "LAWCAT student")


def format_distill_summary(metrics: dict[str, Any], out: Path) -> str:
    """Teacher against student: held-out perplexity and passkey accuracy by length."""
    where = out / layout.MERGED_DIR if (out / layout.MERGED_DIR).is_dir() else out / layout.LAWCAT_DIR
    lines = [f"[petl] done: distilled model in {where}, metrics in {out / layout.METRICS}"]
    before, after = metrics.get("before", {}), metrics.get("after", {})
    if after.get("perplexity"):
        lines.append(f"  {'context':>8} {'ppl teacher':>12} {'ppl LAWCAT':>12}")
        for length, row in after["perplexity"].items():
            prev = _by_length(before.get("perplexity", {}), length, {}).get("ppl", float("nan"))
            lines.append(f"  {length!s:>8} {prev:>12.3f} {row['ppl']:>12.3f}")
    if after.get("passkey"):
        lines.append(f"  {'passkey':>8} {'acc teacher':>12} {'acc LAWCAT':>12}")
        for length, acc in after["passkey"]["accuracy"].items():
            prev = _by_length(before.get("passkey", {}).get("accuracy", {}), length, float("nan"))
            lines.append(f"  {length!s:>8} {prev:>12.2f} {acc:>12.2f}")
    return "\n".join(lines)


def _by_length(table: dict, length: Any, default: Any) -> Any:
    """``table[length]`` whether its keys are ints (fresh) or strings (read back from JSON)."""
    return table.get(length, table.get(str(length), default))
