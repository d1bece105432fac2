"""LoRA and LongLoRA's "LoRA+" through peft's own LoraConfig.

LongLoRA trains every parameter whose name contains ``embed`` or ``norm`` next to the LoRA
factors (attention.md §1.4). peft's ``modules_to_save`` does this natively: each matched module is
wrapped with a trainable copy that is saved inside the adapter, so ``PeftModel.from_pretrained``
restores it and ``merge_and_unload`` keeps it. Matching is by name suffix, so ``norm`` catches
``input_layernorm``, ``post_attention_layernorm`` and the final ``norm``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from peft import LoraConfig

#: LongLoRA's extra trainable modules for Llama-family models.
LORA_PLUS_MODULES = ("embed_tokens", "norm")
#: LongLoRA's attention targets (GPT-NeoX uses fused names, see :func:`default_lora_targets`).
LONGLORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def default_lora_targets(model_type: str) -> list[str]:
    """LongLoRA's LoRA targets for a model family (GPT-NeoX fuses q/k/v)."""
    if model_type == "gpt_neox":
        return ["query_key_value", "dense"]
    return list(LONGLORA_TARGETS)


def lora_config(*, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                target_modules: Sequence[str] = LONGLORA_TARGETS,
                trainable_modules: Sequence[str] = (), tie_embeddings: bool = False,
                options: dict[str, Any] | None = None) -> LoraConfig:
    """A peft ``LoraConfig`` for causal LMs; ``trainable_modules`` become ``modules_to_save``.

    Args:
        r, alpha, dropout: LoRA rank, scaling numerator and dropout (LongLoRA: 8, 16, 0).
        target_modules: module name suffixes that get LoRA factors.
        trainable_modules: modules trained in full and saved with the adapter (LoRA+:
            ``["embed_tokens", "norm"]``).
        tie_embeddings: the model ties input and output embeddings; keep them tied when the
            embedding is trained.
        options: further ``LoraConfig`` fields (e.g. ``use_rslora``); unknown names raise.
    """
    options = dict(options or {})
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"adapter.options key {unknown[0]!r} is not a LoraConfig field; "
                         "see peft.LoraConfig for the allowed names")
    kwargs: dict[str, Any] = dict(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                  target_modules=list(target_modules), bias="none", task_type="CAUSAL_LM",
                                  modules_to_save=list(trainable_modules) or None)
    if tie_embeddings and any("embed" in m for m in trainable_modules) and "ensure_weight_tying" in known:
        kwargs["ensure_weight_tying"] = True
    kwargs.update(options)
    return LoraConfig(**kwargs)
