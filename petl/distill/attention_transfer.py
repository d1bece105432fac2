"""Stage 1 of LAWCAT distillation: attention transfer (adapters.md §3.3).

Every converted layer, in *distill mode*, computes in one forward pass both the frozen teacher's
causal softmax attention (RoPE'd q/k, the model's own attention implementation) and its LAWCAT
output from the same q/k/v, records ``MSE(student, teacher)`` and passes the teacher output on.
The loss is ``loss_scale * mean over layers`` (the paper's ``xent0_mse1000``); only the LAWCAT
parameters (conv taps, feature maps, gates, window factors) train.

Three ways in, from low to high level:

* :func:`attention_transfer_loss` — one forward, returns the loss and the per-layer MSEs;
* :func:`attention_transfer_step` — forward, backward and an optimiser step (own loops);
* :class:`AttentionTransferTrainer` — a ``transformers.Trainer`` (accelerate, checkpoints,
  resume) that logs ``distill_mse/layer_<i>`` next to the loss.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn
from transformers import Trainer

from ..linear.attention import LawcatAttention
from ..linear.convert import mark_only_lawcat_trainable

_MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds")


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module  # DDP / accelerate wrappers
    return model


def _lawcat_modules(model: nn.Module) -> list[LawcatAttention]:
    mods = [m for m in _unwrap(model).modules() if isinstance(m, LawcatAttention)]
    if not mods:
        raise ValueError("model has no LAWCAT layers: call petl.linear.convert_to_lawcat(model) first")
    return sorted(mods, key=lambda m: m.layer_idx)


def set_attention_transfer(model: nn.Module, enabled: bool = True) -> list[bool]:
    """Switch every LAWCAT layer into (or out of) distill mode; returns the previous flags."""
    mods = _lawcat_modules(model)
    before = [m.lawcat_distill for m in mods]
    for m in mods:
        m.lawcat_distill = enabled
    return before


@contextlib.contextmanager
def attention_transfer_mode(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Distill mode for the ``with`` block (include the backward pass when gradient
    checkpointing is on: the recomputed forward must take the same path)."""
    mods = _lawcat_modules(model)
    before = set_attention_transfer(model, enabled)
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.lawcat_distill = b


def prepare_attention_transfer(model: nn.Module) -> int:
    """Freeze everything but the LAWCAT parameters; returns how many parameters train."""
    n = mark_only_lawcat_trainable(_unwrap(model))
    if n == 0:
        raise ValueError("no LAWCAT parameters found: convert the model before stage 1")
    return n


def attention_transfer_loss(model: nn.Module, batch: dict[str, Any], loss_scale: float = 1000.0
                            ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """One distill-mode forward.

    Args:
        model (nn.Module): a converted causal LM (possibly DDP-wrapped).
        batch (dict): ``input_ids`` ``[B, T]`` (and optionally ``attention_mask``,
            ``position_ids``); other keys such as ``labels`` are ignored.
        loss_scale (float): multiplier of the mean per-layer MSE. Default: 1000.

    Returns:
        ``(loss, {layer_idx: mse})``; the per-layer MSEs are unscaled and carry gradients.

    The model is left in distill mode: with gradient checkpointing the backward pass re-runs
    the forward, which must take the same path. Leave it with ``set_attention_transfer(model,
    False)`` (``prepare_lora_finetune`` does).
    """
    inputs = {k: v for k, v in batch.items() if k in _MODEL_INPUTS}
    mods = _lawcat_modules(model)
    set_attention_transfer(model, True)
    for m in mods:
        m.lawcat_distill_loss = None
    model(**inputs, use_cache=False, logits_to_keep=1)  # skip the full vocabulary projection
    per_layer = {m.layer_idx: m.lawcat_distill_loss for m in mods}
    if any(v is None for v in per_layer.values()):
        raise RuntimeError("a LAWCAT layer produced no distillation loss (was it skipped in forward?)")
    loss = loss_scale * torch.stack(list(per_layer.values())).mean()
    return loss, per_layer


@dataclass
class AttentionTransferStep:
    """Result of :func:`attention_transfer_step`: the scaled loss and per-layer MSEs."""

    loss: float
    per_layer: dict[int, float]


def attention_transfer_step(model: nn.Module, batch: dict[str, Any],
                            optimizer: torch.optim.Optimizer, loss_scale: float = 1000.0,
                            max_grad_norm: float | None = 1.0) -> AttentionTransferStep:
    """Forward in distill mode, backward, clip, optimiser step, zero grads (mode restored after)."""
    model.train()
    with attention_transfer_mode(model):
        loss, per_layer = attention_transfer_loss(model, batch, loss_scale)
        loss.backward()
    if max_grad_norm is not None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return AttentionTransferStep(float(loss.detach()), {i: float(v.detach()) for i, v in per_layer.items()})


class AttentionTransferTrainer(Trainer):
    """``transformers.Trainer`` whose loss is the stage-1 attention-transfer loss.

    On construction it freezes everything except the LAWCAT parameters. Logs gain
    ``distill_mse/layer_<i>`` (mean since the last log) besides ``loss``.

    Args:
        *args, **kwargs: as ``transformers.Trainer``.
        loss_scale (float): multiplier of the mean per-layer MSE. Default: 1000.
    """

    def __init__(self, *args, loss_scale: float = 1000.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loss_scale = loss_scale
        prepare_attention_transfer(self.model)
        self._layer_sums: dict[int, float] = {}
        self._layer_count = 0

    def train(self, *args, **kwargs):
        with attention_transfer_mode(self.model):
            return super().train(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        with attention_transfer_mode(self.model):
            return super().evaluate(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, per_layer = attention_transfer_loss(model, inputs, self.loss_scale)
        if model.training:
            for i, v in per_layer.items():
                self._layer_sums[i] = self._layer_sums.get(i, 0.0) + float(v.detach())
            self._layer_count += 1
        return (loss, {"loss": loss}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, _ = attention_transfer_loss(model, inputs, self.loss_scale)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._layer_count and "loss" in logs:
            for i, s in sorted(self._layer_sums.items()):
                logs[f"distill_mse/layer_{i}"] = s / self._layer_count
            self._layer_sums, self._layer_count = {}, 0
        super().log(logs, *args, **kwargs)
