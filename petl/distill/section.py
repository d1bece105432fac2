"""The recipe's ``distill`` section: LAWCAT linearisation by distillation (``petl distill``).

Three parts, each documented once here (adapters.md §3.3 for the paper's values):

* the LAWCAT architecture (which layers, conv kernel, feature map, window, GLA backend), turned
  into a :class:`petl.linear.LawcatConfig` by :meth:`DistillSection.lawcat_config`;
* ``stage1``: attention transfer, per-layer output MSE against the frozen teacher;
* ``stage2``: LoRA on q/k/v/o with next-token loss.

Settings shared by both stages come from the recipe's ``train`` section (batch size, gradient
accumulation, precision, gradient checkpointing, seed, logging and checkpoint steps, optimiser,
gradient clipping); the training sequences from ``data`` (``data.block_size``, null = the model's
native context). ``train.max_steps``, ``train.lr``, the schedule fields of ``train`` and the
``adapter`` section are not used by ``petl distill``: each stage has its own below.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from petl.train.schema_types import RecipeError

Scheduler = Literal["constant", "constant_with_warmup", "linear", "cosine"]


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise RecipeError(f"recipe key '{key}' has value {value!r}; {allowed}")


@dataclass
class AttentionTransferStage:
    """Stage 1: train the LAWCAT parameters (conv taps, feature maps, gates, window factors) so
    that every converted layer's output matches the teacher's softmax attention output.

    steps: optimiser steps (each ``train.batch_size * train.grad_accum`` sequences); 0 skips
        the stage (the LAWCAT layers keep their initialisation).
    lr: AdamW learning rate (paper: 1e-2).
    loss_scale: the loss is ``loss_scale * mean over layers of MSE`` (paper: 1000, ``mse1000``).
    lr_scheduler, warmup_steps: learning-rate schedule (the paper's ReduceLROnPlateau on an
        eval MSE is not offered; ``constant`` is its behaviour until the first plateau).
    """

    steps: int = 100
    lr: float = 1e-2
    loss_scale: float = 1000.0
    lr_scheduler: Scheduler = "constant"
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        _check(self.steps >= 0, "distill.stage1.steps", self.steps, "must be >= 0 (0 skips the stage)")
        _check(self.lr > 0, "distill.stage1.lr", self.lr, "must be > 0 (the paper uses 1e-2)")
        _check(self.loss_scale > 0, "distill.stage1.loss_scale", self.loss_scale, "must be > 0 (the paper uses 1000)")
        _check(self.warmup_steps >= 0, "distill.stage1.warmup_steps", self.warmup_steps, "must be >= 0")


@dataclass
class LoraFinetuneStage:
    """Stage 2: peft LoRA on the teacher's projections with next-token cross-entropy; the LAWCAT
    parameters are frozen.

    steps: optimiser steps; 0 skips the stage (the result is the stage-1 model).
    lr: AdamW learning rate (LoLCATs: 1e-4).
    lora_r, lora_alpha, lora_dropout: LoRA rank, scaling numerator and dropout (LoLCATs: 8, 16, 0).
    target_modules: module name suffixes that get LoRA (paper: q, k, v, o projections).
    merge: merge the LoRA into the converted model at the end and save it as ``merged/`` (the
        paper's choice); the adapter is saved in ``adapter/`` either way.
    lr_scheduler, warmup_steps: learning-rate schedule.
    """

    steps: int = 100
    lr: float = 1e-4
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    merge: bool = True
    lr_scheduler: Scheduler = "constant"
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        _check(self.steps >= 0, "distill.stage2.steps", self.steps, "must be >= 0 (0 skips the stage)")
        _check(self.lr > 0, "distill.stage2.lr", self.lr, "must be > 0 (LoLCATs uses 1e-4)")
        _check(self.lora_r > 0, "distill.stage2.lora_r", self.lora_r, "must be a positive integer")
        _check(self.lora_alpha > 0, "distill.stage2.lora_alpha", self.lora_alpha, "must be > 0")
        _check(0.0 <= self.lora_dropout < 1.0, "distill.stage2.lora_dropout", self.lora_dropout, "must be in [0, 1)")
        _check(bool(self.target_modules), "distill.stage2.target_modules", self.target_modules,
               "name at least one module, e.g. [q_proj, k_proj, v_proj, o_proj]")
        _check(self.warmup_steps >= 0, "distill.stage2.warmup_steps", self.warmup_steps, "must be >= 0")


@dataclass
class DistillSection:
    """LAWCAT distillation settings (see docs/lawcat.md).

    layers: decoder layers to linearise; null converts all of them (the paper); the others keep
        softmax attention.
    conv_size: kernel of the causal depthwise convolution across tokens on q and k (paper: 4).
    feature_dim: width f of each half of the Hedgehog map ``[softmax(uW), softmax(-uW)]``; null
        is head_dim / 2 (paper: fd32 for d=64, fd64 for d=128).
    tie_feature_maps: one feature map shared by q and k (the LAWCAT wrapper's ``tie_qk_kernels``)
        or one each.
    gate_low_rank: rank of the data-dependent gate projection (paper: 16).
    window_size: 0 for pure gated linear attention (paper default); > 0 adds a sliding softmax
        window of this many tokens (LoLCATs-style hybrid).
    backend: gated-linear-attention kernel: ``auto`` (fla on CUDA if installed, chunked PyTorch on
        CUDA otherwise, the recurrent reference on CPU), ``reference``, ``chunked`` or ``fla``.
    chunk_size: chunk length of the chunked PyTorch form.
    passkey_samples: synthetic passkey-retrieval sequences (``data.block_size`` tokens, answer
        included) added to the distillation data of both stages, as the paper's
        ``distill_passkey`` data suggests; 0 uses the text data only.
    stage1, stage2: the two training stages.
    """

    layers: Optional[list[int]] = None
    conv_size: int = 4
    feature_dim: Optional[int] = None
    tie_feature_maps: bool = True
    gate_low_rank: int = 16
    window_size: int = 0
    backend: Literal["auto", "reference", "chunked", "fla"] = "auto"
    chunk_size: int = 64
    passkey_samples: int = 0
    stage1: AttentionTransferStage = field(default_factory=AttentionTransferStage)
    stage2: LoraFinetuneStage = field(default_factory=LoraFinetuneStage)

    def __post_init__(self) -> None:
        if self.layers is not None:
            _check(bool(self.layers) and all(i >= 0 for i in self.layers), "distill.layers", self.layers,
                   "list layer indices >= 0, or null for all layers")
        _check(self.conv_size >= 1, "distill.conv_size", self.conv_size, "must be >= 1 (the paper uses 4)")
        if self.feature_dim is not None:
            _check(self.feature_dim >= 1, "distill.feature_dim", self.feature_dim, "must be >= 1 or null (head_dim/2)")
        _check(self.gate_low_rank >= 1, "distill.gate_low_rank", self.gate_low_rank, "must be >= 1 (the paper uses 16)")
        _check(self.window_size >= 0, "distill.window_size", self.window_size, "must be >= 0 (0 = no softmax window)")
        _check(self.chunk_size >= 1, "distill.chunk_size", self.chunk_size, "must be >= 1")
        _check(self.passkey_samples >= 0, "distill.passkey_samples", self.passkey_samples, "must be >= 0")
        _check(self.stage1.steps + self.stage2.steps > 0, "distill.stage1.steps", self.stage1.steps,
               "stage1.steps and stage2.steps are both 0; give at least one stage some steps")

    def lawcat_config(self, **extra: Any):
        """The :class:`petl.linear.LawcatConfig` this section describes."""
        from petl.linear.config import LawcatConfig

        return LawcatConfig(layers=self.layers, conv_size=self.conv_size, feature_dim=self.feature_dim,
                            tie_feature_maps=self.tie_feature_maps, gate_low_rank=self.gate_low_rank,
                            window_size=self.window_size, backend=self.backend, chunk_size=self.chunk_size,
                            loss_scale=self.stage1.loss_scale, **extra)
