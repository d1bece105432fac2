"""LAWCAT teacher -> student distillation: stage 1 attention transfer, stage 2 LoRA."""
from .attention_transfer import (
    AttentionTransferStep,
    AttentionTransferTrainer,
    attention_transfer_loss,
    attention_transfer_mode,
    attention_transfer_step,
    prepare_attention_transfer,
    set_attention_transfer,
)
from .finetune import LORA_TARGETS, prepare_lora_finetune

__all__ = [
    "AttentionTransferStep",
    "AttentionTransferTrainer",
    "LORA_TARGETS",
    "attention_transfer_loss",
    "attention_transfer_mode",
    "attention_transfer_step",
    "prepare_attention_transfer",
    "prepare_lora_finetune",
    "set_attention_transfer",
]
