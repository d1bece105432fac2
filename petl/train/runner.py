"""``run_recipe``: the data flow of ``petl finetune`` (DESIGN.md), on ``transformers.Trainer``.

recipe -> model (dtype, RoPE scaling) -> attention pattern -> adapter (peft) -> data (pack or SFT)
-> optional evaluation before -> Trainer with atomic checkpoints -> adapter + resolved recipe +
metrics.json + JSONL step log + loss curve -> evaluation after (full attention).

Everything here is also reachable from Python (``petl.load_recipe`` + ``petl.run_recipe``), and each
step is an ordinary library call a user can make in their own Trainer script.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from petl.train.recipe import Recipe
from petl.train.recipe_io import recipe_to_yaml
from petl.train.schema_types import RecipeError

ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
STEP_LOG = "steps.jsonl"
MODEL_INFO = "petl_model.json"


def _echo(message: str) -> None:
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(message, flush=True)


def resolve_data_source(source: str) -> str:
    """``petl:shakespeare-train`` / ``petl:shakespeare-heldout`` -> the embedded text files."""
    if source.startswith("petl:"):
        from petl import embedded

        files = {"shakespeare-train": embedded.train_text_path, "shakespeare-heldout": embedded.heldout_text_path}
        key = source.split(":", 1)[1]
        if key not in files:
            raise RecipeError(f"data source {source!r} is unknown; petl ships: "
                              + ", ".join(f"petl:{k}" for k in files))
        return str(files[key]())
    return source


def _precision(recipe: Recipe) -> str:
    if recipe.train.precision != "auto":
        return recipe.train.precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def _model_dtype(recipe: Recipe, precision: str) -> str:
    if recipe.model.dtype != "auto":
        return recipe.model.dtype
    return {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")


RUN_ENTRIES = ("metrics.json", CHECKPOINT_DIR, ADAPTER_DIR)


def prepare_output_dir(recipe: Recipe, resume: bool, run_entries: tuple[str, ...] = RUN_ENTRIES) -> Path:
    """Create the output folder; refuse to overwrite a previous run unless resuming or told to.

    ``run_entries`` are the names whose presence marks a folder as holding a run.
    """
    out = Path(recipe.output_dir)
    holds_run = out.is_dir() and any((out / n).exists() for n in run_entries)
    if holds_run and not resume:
        if not recipe.output.overwrite:
            raise RecipeError(f"output folder {str(out)!r} already holds a run; pass --resume to continue it, "
                              "set output.overwrite=true to replace it, or choose output.dir=...")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def load_base_model(recipe: Recipe, precision: str):
    """Load the base model and tokenizer as published (no RoPE scaling, full attention)."""
    from petl.models import load_model

    return load_model(recipe.model.name, dtype=_model_dtype(recipe, precision),
                      trust_remote_code=recipe.model.trust_remote_code, revision=recipe.model.revision,
                      attn_implementation=recipe.model.attn_implementation,
                      quantization=recipe.model.quantization)


def prepare_for_training(model, recipe: Recipe) -> dict[str, Any]:
    """Scale RoPE to the target context and set the training attention pattern; returns model info.

    Done after the "before" evaluation, so that it measures the base model as published.
    """
    from petl.attention.rope import extend_context, native_context_length

    native = native_context_length(model.config)
    target = recipe.model.context_length
    scaled = bool(target and target > native and recipe.model.rope_scaling != "none")
    if scaled:
        extend_context(model, target, recipe.model.rope_scaling)
    if recipe.attention.pattern != "full":
        from petl.attention import use_attention

        use_attention(model, recipe.attention.pattern, **recipe.attention.params())
    return {"base_model": recipe.model.name, "native_context": native, "context_length": target or native,
            "rope_parameters": dict(model.config.rope_parameters or {}) if scaled else None,
            "max_position_embeddings": model.config.max_position_embeddings}


def build_model(recipe: Recipe, precision: str):
    """Load the base model and prepare it for training in one step: (model, tokenizer, info).

    For callers that do not evaluate the base model in between (task runners).
    """
    model, tokenizer = load_base_model(recipe, precision)
    return model, tokenizer, prepare_for_training(model, recipe)


GRAD_INIT_BATCHES = 4  # batches SoKA's "grad" init averages the loss gradient over


def apply_adapter_section(model, recipe: Recipe, dataset=None, tokenizer=None):
    """Wrap the model with the recipe's peft adapter (or freeze all but ``trainable_modules``).

    ``dataset`` and ``tokenizer`` are needed only by inits that look at data (SoKA ``grad``).
    """
    from peft import get_peft_model

    section = recipe.adapter
    if section.type == "none":
        if not section.trainable_modules:
            raise RecipeError("adapter.type 'none' trains only adapter.trainable_modules, which is empty; "
                              "name modules to train or use adapter.type=lora")
        for name, param in model.named_parameters():
            param.requires_grad = any(m in name for m in section.trainable_modules)
        return model
    if section.type == "lora":
        from petl.adapters.lora import lora_config

        config = lora_config(r=section.r, alpha=section.alpha, dropout=section.dropout,
                             target_modules=section.target_modules, trainable_modules=section.trainable_modules,
                             tie_embeddings=bool(getattr(model.config, "tie_word_embeddings", False)),
                             options=section.options)
    elif section.type == "soka":
        from petl.adapters.soka import SokaConfig, accumulate_gradients

        try:
            config = SokaConfig(r=section.r, target_modules=section.target_modules,
                                modules_to_save=section.trainable_modules or None, **section.options)
        except TypeError as exc:
            raise RecipeError(f"adapter.options for soka: {exc}; see petl.adapters.soka.SokaConfig "
                              "for the allowed names") from None
        if config.init_weights == "grad":
            if dataset is None:
                raise RecipeError("adapter.options.init_weights 'grad' needs training data to take gradients on")
            from petl.data import DataCollatorForCausalLM

            collate = DataCollatorForCausalLM(tokenizer)
            size = recipe.train.batch_size
            batches = [collate([dataset[j] for j in range(i, min(i + size, len(dataset)))])
                       for i in range(0, min(len(dataset), GRAD_INIT_BATCHES * size), size)]
            device = next(model.parameters()).device
            accumulate_gradients(model, [{k: v.to(device) for k, v in b.items()} for b in batches], config)
    else:
        raise RecipeError(f"adapter.type {section.type!r} is for task.type audio_classification recipes; "
                          "use lora or soka for causal LM training")
    if recipe.model.quantization == "4bit":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.train.gradient_checkpointing)
    peft_model = get_peft_model(model, config)
    if _precision(recipe) == "fp16":
        for param in peft_model.parameters():  # fp16 optimiser states need fp32 master weights
            if param.requires_grad and param.dtype == torch.float16:
                param.data = param.data.float()
    return peft_model


def apply_kernels(model, recipe: Recipe):
    """Put petl's fused LoRA kernels into the model (``train.kernels``; docs/kernels.md).

    Called after the adapter is applied. ``auto`` fuses supported model types (the fused modules
    still run peft's path on CPU); ``on`` turns an unsupported model or device into an error.
    """
    from petl.kernels.switch import kernel_mode, use_kernels

    mode = kernel_mode(recipe.train.kernels)
    if mode == "off":
        return model
    from petl.kernels.fuse import SUPPORTED, fuse_lora

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "model_type", None) not in SUPPORTED and mode == "auto":
        return model
    try:
        if mode == "on":
            use_kernels(next(base.parameters()).device, "on")
        return fuse_lora(model, kernels=recipe.train.kernels)
    except (ValueError, RuntimeError) as exc:
        raise RecipeError(f"train.kernels={recipe.train.kernels}: {exc}") from None


def build_train_dataset(recipe: Recipe, tokenizer, block_size: int):
    from petl.data import build_sft_dataset, load_text_dataset, pack_for_causal_lm

    source = resolve_data_source(recipe.data.source)
    text_field = recipe.data.text_field if recipe.data.format == "pretrain" else None
    raw = load_text_dataset(source, split=recipe.data.split, text_field=text_field,
                            max_samples=recipe.data.max_samples, trust_remote_code=recipe.model.trust_remote_code,
                            name=recipe.data.config_name, data_files=recipe.data.data_files,
                            txt_sample_by=recipe.data.txt_sample_by)
    if recipe.data.format == "sft":
        return build_sft_dataset(raw, tokenizer, max_length=block_size, template=recipe.data.template,
                                 truncate=recipe.data.truncate, num_proc=recipe.data.num_proc,
                                 instruction_field=recipe.data.instruction_field,
                                 input_field=recipe.data.input_field, output_field=recipe.data.output_field)
    return pack_for_causal_lm(raw, tokenizer, block_size=block_size, text_field=recipe.data.text_field,
                              restart_positions=recipe.data.restart_positions, num_proc=recipe.data.num_proc)


def evaluate(model, tokenizer, recipe: Recipe, stage: str) -> dict[str, Any]:
    """Held-out perplexity by length and passkey accuracy, as the eval section asks."""
    results: dict[str, Any] = {}
    section = recipe.eval
    was_training = model.training
    model.eval()
    if section.perplexity_lengths and recipe.data.eval_source:
        from petl.eval import load_eval_tokens, perplexity

        tokens = load_eval_tokens(resolve_data_source(recipe.data.eval_source), tokenizer)
        _echo(f"[petl] {stage}: held-out perplexity at lengths {section.perplexity_lengths}")
        results["perplexity"] = perplexity(model, tokens, lengths=section.perplexity_lengths,
                                           mode=section.perplexity_mode, max_windows=section.max_windows)
    if section.passkey_lengths:
        from petl.eval import passkey

        _echo(f"[petl] {stage}: passkey retrieval at lengths {section.passkey_lengths}")
        results["passkey"] = passkey(model, tokenizer, lengths=section.passkey_lengths,
                                     num_tests=section.passkey_num_tests, seed=recipe.train.seed)
    model.train(was_training)
    return results


@dataclass
class RunStart:
    """What every recipe run has once :func:`start_run` returns."""

    out: Path  # the output folder (created; a previous run refused unless resuming or overwriting)
    args: Any  # transformers.TrainingArguments of the run (or of its first stage)
    state: Any  # accelerate.PartialState: process rank, barriers
    precision: str  # "bf16" | "fp16" | "fp32"


def start_run(recipe: Recipe, resume: bool, *, run_entries: tuple[str, ...] = RUN_ENTRIES,
              arguments: Optional[Callable[[Recipe, Path, str], Any]] = None,
              before_prepare: Optional[Callable[[Path], None]] = None) -> RunStart:
    """The start shared by every runner (causal LM, tasks, audio, distillation).

    TrainingArguments are built first because they set up the process group (torchrun /
    accelerate launch), so the PartialState after them sees every process, on CPU (gloo) as on
    GPU. Then the main process prepares the output folder and writes the resolved
    ``recipe.yaml`` while the others wait.

    Args:
        recipe (Recipe): the validated recipe.
        resume (bool): continuing a killed run (the folder may hold its entries).
        run_entries (tuple[str, ...]): folder entries that mark an earlier run of this kind.
        arguments (Callable, Optional): ``(recipe, out, precision) -> TrainingArguments``;
            default :func:`training_arguments`.
        before_prepare (Callable, Optional): ``(out) -> None`` run on the main process before
            the folder is prepared (a runner's own checks of stale entries).
    """
    from accelerate import PartialState

    precision = _precision(recipe)
    out = Path(recipe.output_dir)
    args = (arguments or training_arguments)(recipe, out, precision)
    state = PartialState()
    if state.is_main_process:
        if before_prepare is not None:
            before_prepare(out)
        prepare_output_dir(recipe, resume, run_entries)
        (out / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    state.wait_for_everyone()
    return RunStart(out=out, args=args, state=state, precision=precision)


def training_arguments(recipe: Recipe, out: Path, precision: str):
    from transformers import TrainingArguments

    t = recipe.train
    return TrainingArguments(
        output_dir=str(out / CHECKPOINT_DIR), max_steps=t.max_steps, per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr, lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, adam_beta2=t.adam_beta2,
        max_grad_norm=t.max_grad_norm, optim=t.optim, bf16=precision == "bf16", fp16=precision == "fp16",
        logging_steps=t.logging_steps, save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500, save_total_limit=t.save_total_limit, seed=t.seed, data_seed=t.seed,
        report_to="none", remove_unused_columns=False, dataloader_num_workers=t.dataloader_workers,
        disable_tqdm=False, use_cpu=not torch.cuda.is_available(), ddp_find_unused_parameters=False,
        **_checkpointing_arguments(TrainingArguments, t.gradient_checkpointing),
    )


def _checkpointing_arguments(arguments_class: type, enabled: bool) -> dict:
    """Activation-checkpointing fields under the installed transformers' names.

    transformers 5.24 renamed ``gradient_checkpointing`` to ``activation_checkpointing`` (the old name
    warns); 5.17 only knows the old one.
    """
    names = {f.name for f in fields(arguments_class)}
    prefix = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {prefix: enabled, f"{prefix}_kwargs": {"use_reentrant": False} if enabled else None}


#: task.type -> "module:function" of the runner for tasks other than causal LM training.
TASK_RUNNERS = {
    "sequence_classification": "petl.tasks.runner:run_task_recipe",
    "multiple_choice": "petl.tasks.runner:run_task_recipe",
    "extractive_qa": "petl.tasks.runner:run_task_recipe",
    "generative": "petl.tasks.runner:run_task_recipe",
    "audio_classification": "petl.audio.runner:run_audio_recipe",
}


def run_recipe(recipe: Recipe, *, resume: bool = False) -> dict[str, Any]:
    """Run a recipe end to end; returns the metrics also written to ``metrics.json``.

    Args:
        recipe (Recipe): a validated recipe (see :func:`petl.load_recipe`).
        resume (bool): continue from the newest complete checkpoint in the output folder.
    """
    if recipe.task.type != "causal_lm":
        import importlib

        module, function = TASK_RUNNERS[recipe.task.type].split(":")
        return getattr(importlib.import_module(module), function)(recipe, resume=resume)
    return run_causal_lm_recipe(recipe, resume=resume)


def run_causal_lm_recipe(recipe: Recipe, *, resume: bool = False) -> dict[str, Any]:
    """Next-token training (context extension, domain adaptation, SFT) of a causal LM."""
    from transformers import set_seed

    from petl.data import DataCollatorForCausalLM
    from petl.train.callbacks import JsonlStepLogger, plot_loss_curve
    from petl.train.checkpointing import AtomicCheckpointTrainer, last_complete_checkpoint

    run = start_run(recipe, resume)
    out, args, state, precision = run.out, run.args, run.state, run.precision
    checkpoint = last_complete_checkpoint(out / CHECKPOINT_DIR) if resume else None
    if resume and checkpoint is None:
        _echo(f"[petl] no complete checkpoint under {out / CHECKPOINT_DIR}; starting from step 0")
    set_seed(recipe.train.seed)
    _echo(f"[petl] loading {recipe.model.name} ({_model_dtype(recipe, precision)}, training precision {precision})")
    model, tokenizer = load_base_model(recipe, precision)
    metrics: dict[str, Any] = {"recipe": recipe.name}
    before_file = out / "eval_before.json"
    if recipe.eval.before_training and state.is_main_process:
        if before_file.exists() and resume:
            metrics["before"] = json.loads(before_file.read_text())
        else:
            metrics["before"] = evaluate(model, tokenizer, recipe, "base model, before training")
            before_file.write_text(json.dumps(metrics["before"], indent=2))
    info = metrics["model"] = prepare_for_training(model, recipe)
    block_size = recipe.data.block_size or info["context_length"]
    with state.main_process_first():
        dataset = build_train_dataset(recipe, tokenizer, block_size)
    _echo(f"[petl] {len(dataset)} training examples of {block_size} tokens")

    model = apply_adapter_section(model, recipe, dataset, tokenizer)
    model = apply_kernels(model, recipe)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    metrics["trainable_parameters"], metrics["total_parameters"] = trainable, total
    _echo(f"[petl] trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")

    collator = DataCollatorForCausalLM(tokenizer, pad_to_multiple_of=_pad_multiple(recipe, block_size))
    resume_step = int(checkpoint.name.split("-")[-1]) if checkpoint else 0
    trainer = AtomicCheckpointTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                                      callbacks=[JsonlStepLogger(out / STEP_LOG, resume_step=resume_step)])
    if checkpoint is not None:
        _echo(f"[petl] resuming from {checkpoint}")
    # No KV cache while training: transformers keeps packed documents apart (block-diagonal
    # attention from restarting position_ids) only when no cache is built.
    base_config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    use_cache, base_config.use_cache = base_config.use_cache, False
    train_output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    base_config.use_cache = use_cache
    metrics["train"] = dict(train_output.metrics)

    if state.is_main_process:
        adapter_dir = out / ADAPTER_DIR
        model.save_pretrained(str(adapter_dir)) if recipe.adapter.type != "none" else model.save_pretrained(
            str(adapter_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(adapter_dir))
        (adapter_dir / MODEL_INFO).write_text(json.dumps(info, indent=2))
        plot_loss_curve(out / STEP_LOG, out / "loss_curve.png", title=f"{recipe.name}: training loss")
        metrics["after"] = evaluate(model, tokenizer, recipe, "after training")
        if recipe.output.save_merged and recipe.adapter.type != "none":
            from petl.merge import merge_adapter

            merge_adapter(model, tokenizer, out / "merged")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
        _echo(format_summary(metrics, out))
    state.wait_for_everyone()
    return metrics


def _pad_multiple(recipe: Recipe, block_size: int) -> Optional[int]:
    # Sparse attention patterns need lengths that split into even groups; SFT batches are padded
    # to a multiple of the group size (packed pretraining blocks already have the full length).
    if recipe.attention.pattern == "full" or recipe.data.format != "sft":
        return None
    group = recipe.attention.group_size or max(2, int(block_size * recipe.attention.group_ratio))
    return group + (group % 2)


def format_summary(metrics: dict[str, Any], out: Path) -> str:
    """A short table of before/after results for the terminal."""
    lines = [f"[petl] done: adapter in {out / ADAPTER_DIR}, metrics in {out / 'metrics.json'}"]
    before, after = metrics.get("before", {}), metrics.get("after", {})
    ppl_after = after.get("perplexity", {})
    if ppl_after:
        lines.append(f"  {'context':>8} {'ppl before':>12} {'ppl after':>12}")
        for length, row in ppl_after.items():
            prev = before.get("perplexity", {}).get(length, {}).get("ppl", math.nan)
            lines.append(f"  {length!s:>8} {prev:>12.3f} {row['ppl']:>12.3f}")
    key_after = after.get("passkey", {})
    if key_after:
        lines.append(f"  {'passkey':>8} {'acc before':>12} {'acc after':>12}")
        for length, acc in key_after.get("accuracy", {}).items():
            prev = before.get("passkey", {}).get("accuracy", {}).get(length, math.nan)
            lines.append(f"  {length!s:>8} {prev:>12.2f} {acc:>12.2f}")
    return "\n".join(lines)
