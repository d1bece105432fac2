"""Stage 2 of LAWCAT distillation: ordinary peft LoRA on q, k, v, o (adapters.md §3.3).

After attention transfer the converted model is fine-tuned with next-token cross-entropy; the
LAWCAT parameters (conv, feature maps, gates) stay frozen and LoRA adapts the teacher's
projections, which the LAWCAT layers read through the same ``q_proj``/``k_proj``/``v_proj``/
``o_proj`` modules. Any ``transformers.Trainer`` with ``labels`` in the batch trains it.

Saving: ``peft_model.save_pretrained(adapter_dir)`` stores the LoRA only; the converted base
is saved with :func:`petl.linear.save_lawcat` and reloaded with :func:`petl.linear.load_lawcat`
before ``PeftModel.from_pretrained(base, adapter_dir)``. Or merge (``merge_and_unload``) and
``save_lawcat`` the merged model.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from ..linear.attention import LawcatAttention
from ..linear.convert import lawcat_parameters

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def prepare_lora_finetune(model: nn.Module, r: int = 8, lora_alpha: int = 16,
                          lora_dropout: float = 0.0,
                          target_modules: Sequence[str] = LORA_TARGETS, **lora_kwargs):
    """Freeze the LAWCAT parameters, leave distill mode, and wrap ``model`` with LoRA.

    Args:
        model (nn.Module): a converted (and stage-1 trained) causal LM.
        r, lora_alpha, lora_dropout: LoRA settings (LoLCATs' defaults 8 / 16 / 0).
        target_modules (Sequence[str]): Default: q, k, v, o projections.
        **lora_kwargs: any other ``peft.LoraConfig`` field.

    Returns:
        The ``peft.PeftModel``.
    """
    from peft import LoraConfig, get_peft_model

    mods = [m for m in model.modules() if isinstance(m, LawcatAttention)]
    if not mods:
        raise ValueError("model has no LAWCAT layers: convert and distil it before stage 2")
    for m in mods:
        m.lawcat_distill = False
    for _, p in lawcat_parameters(model):
        p.requires_grad_(False)
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                        target_modules=list(target_modules), task_type="CAUSAL_LM", **lora_kwargs)
    return get_peft_model(model, config)
