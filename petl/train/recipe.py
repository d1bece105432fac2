"""The recipe schema: typed sections model / adapter / attention / data / train / eval / output.

A recipe is a YAML file validated against these dataclasses (DESIGN.md principle 4). Each field is
documented once, here; ``petl recipes show`` prints the resolved values. Range checks live in each
section's ``__post_init__`` so a bad value fails before any model loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from petl.audio.section import AudioSection
from petl.distill.section import DistillSection
from petl.tasks.section import TaskSection
from petl.train.schema_types import RecipeError

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise RecipeError(f"recipe key '{key}' has value {value!r}; {allowed}")


@dataclass
class ModelSection:
    """Which base model to load and how.

    name: hub id (e.g. ``meta-llama/Llama-2-7b-hf``), a local directory, or
        ``petl/shakespeare-llama`` (the embedded model shipped with petl).
    dtype: weights dtype on load; ``auto`` keeps the checkpoint's dtype (float32 on CPU).
    context_length: target context after extension; null keeps the native context. When larger
        than the model's native context, RoPE is scaled with ``rope_scaling``.
    rope_scaling: ``linear`` is LongLoRA's position interpolation with factor
        ceil(target / native); ``ntk`` (dynamic) and ``yarn`` go through transformers' rope parameters.
    quantization: ``4bit`` loads the base with bitsandbytes NF4 (QLoRA); needs bitsandbytes and CUDA.
    trust_remote_code: run model code from the hub; off unless you trust the repository.
    """

    name: str = "petl/shakespeare-llama"
    revision: Optional[str] = None
    dtype: Dtype = "auto"
    context_length: Optional[int] = None
    rope_scaling: Literal["linear", "ntk", "yarn", "none"] = "linear"
    quantization: Literal["none", "4bit"] = "none"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        _check(bool(self.name), "model.name", self.name, "give a hub id or a local directory")
        if self.context_length is not None:
            _check(self.context_length > 0, "model.context_length", self.context_length, "must be > 0")


@dataclass
class AdapterSection:
    """The parameter-efficient adapter.

    type: ``lora`` (peft LoRA), ``soka`` (Kronecker SVD adapters), ``audio`` (audio-spectrogram
        adapters, configured by ``options``), ``none`` (train only
        ``trainable_modules``; full fine-tuning is not petl's job).
    target_modules: module name suffixes that get adapters.
    trainable_modules: extra modules trained in full and saved with the adapter (peft
        ``modules_to_save``); LongLoRA's "LoRA+" is ``[embed_tokens, norm]`` ("norm" matches every
        norm layer by suffix).
    options: method-specific extra fields passed to the peft config (e.g. SoKA's
        ``energy_threshold``); unknown names are rejected by that config.
    """

    type: Literal["lora", "soka", "audio", "none"] = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    trainable_modules: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.r > 0, "adapter.r", self.r, "must be a positive integer")
        _check(0.0 <= self.dropout < 1.0, "adapter.dropout", self.dropout, "must be in [0, 1)")
        _check(self.type == "none" or bool(self.target_modules), "adapter.target_modules",
               self.target_modules, "name at least one module, e.g. [q_proj, v_proj]")


@dataclass
class AttentionSection:
    """Training-time attention pattern (inference always uses full attention).

    pattern: ``full``, ``s2`` (LongLoRA shifted sparse attention) or ``sf`` (SinkLoRA).
    group_ratio: group size as a fraction of the sequence length (LongLoRA: 1/4).
    group_size: a fixed group size in tokens instead (LongLoRA's SFT setting); overrides group_ratio.
    cyclic: S2 only: LongLoRA's roll with wrap-around (paper parity) instead of non-cyclic segments.
    n_sink, shift_head_fraction, sink_bidirectional: SF-Attn options.
    backend: ``auto`` picks the fastest backend that supports the batch on CUDA (``grouped``:
        fused causal SDPA per segment, unpadded rows; ``triton``: petl's kernel; ``flex``) and the
        reference elsewhere; ``varlen`` is torch's flash varlen path (non-cyclic S2 only).
    """

    pattern: Literal["full", "s2", "sf"] = "full"
    group_ratio: float = 0.25
    group_size: Optional[int] = None
    cyclic: bool = False
    n_sink: int = 4
    shift_head_fraction: float = 0.5
    sink_bidirectional: bool = False
    backend: Literal["auto", "reference", "flex", "varlen", "grouped", "triton"] = "auto"

    def __post_init__(self) -> None:
        if self.group_size is not None:
            _check(self.group_size >= 2 and self.group_size % 2 == 0, "attention.group_size", self.group_size,
                   "must be an even integer >= 2 (or null to use group_ratio)")
        _check(0.0 < self.group_ratio <= 1.0, "attention.group_ratio", self.group_ratio, "must be in (0, 1]")
        _check(self.n_sink >= 0, "attention.n_sink", self.n_sink, "must be >= 0")
        _check(0.0 <= self.shift_head_fraction <= 1.0, "attention.shift_head_fraction",
               self.shift_head_fraction, "must be in [0, 1]")

    def params(self) -> dict[str, Any]:
        """Keyword arguments for :func:`petl.attention.use_attention` for this pattern."""
        common = {"group_ratio": self.group_ratio, "group_size": self.group_size, "backend": self.backend}
        if self.pattern == "s2":
            return {**common, "cyclic": self.cyclic}
        if self.pattern == "sf":
            return {**common, "n_sink": self.n_sink, "shift_head_fraction": self.shift_head_fraction,
                    "sink_bidirectional": self.sink_bidirectional}
        return {}


@dataclass
class DataSection:
    """Training data.

    source: a local file or folder (txt, jsonl, json, csv, parquet) or a hub dataset id; the
        embedded model's texts are ``petl:shakespeare-train`` / ``petl:shakespeare-heldout``.
    format: ``pretrain`` packs documents into blocks of ``block_size`` tokens; ``sft`` builds
        instruction/response examples with the loss masked on the prompt (LongAlpaca format).
    block_size: tokens per training example; null uses ``model.context_length`` (or the native context).
    template, truncate: SFT prompt template and which end of a too-long example is cut
        (see docs/data.md).
    instruction_field, input_field, output_field: SFT record columns (MetaMathQA: query, -, response).
    txt_sample_by: for ``.txt`` sources, one example per file, paragraph or line.
    config_name: configuration name of a hub data set.
    data_files: files of a hub data set to read with a packaged builder (``source: json`` with
        ``data_files: [hf://datasets/ORG/NAME/*.jsonl]``), for script-based sets that datasets >= 4
        no longer runs.
    eval_source: held-out text for perplexity evaluation (a file or the same forms as ``source``).
    """

    source: str = "petl:shakespeare-train"
    split: str = "train"
    format: Literal["pretrain", "sft"] = "pretrain"
    text_field: str = "text"
    block_size: Optional[int] = None
    max_samples: Optional[int] = None
    restart_positions: bool = True
    template: Literal["longalpaca", "alpaca", "raw", "chat"] = "longalpaca"
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    truncate: Literal["left", "right", "error"] = "left"
    txt_sample_by: Literal["document", "paragraph", "line"] = "document"
    config_name: Optional[str] = None
    data_files: Optional[list[str]] = None
    eval_source: Optional[str] = "petl:shakespeare-heldout"
    num_proc: Optional[int] = None

    def __post_init__(self) -> None:
        if self.block_size is not None:
            _check(self.block_size > 1, "data.block_size", self.block_size, "must be > 1")
        if self.max_samples is not None:
            _check(self.max_samples > 0, "data.max_samples", self.max_samples, "must be > 0")


@dataclass
class TrainSection:
    """Optimisation (passed to ``transformers.TrainingArguments``).

    kernels: petl's fused LoRA training kernels (docs/kernels.md) for Llama/Mistral/Qwen2 models:
        ``auto`` uses them on CUDA and peft's unfused path elsewhere (other model types train
        unfused), ``on`` requires them (an unsupported model, and any task other than
        ``causal_lm`` or ``petl distill``, is an error), ``off`` never. ``on``
        and ``off`` override ``$PETL_KERNELS``; ``auto`` defers to it.
    """

    max_steps: int = 100
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 2e-4
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    optim: Literal["adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "paged_adamw_8bit", "sgd"] = "adamw_torch"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    seed: int = 42
    logging_steps: int = 1
    save_steps: int = 0
    save_total_limit: Optional[int] = 2
    dataloader_workers: int = 0
    kernels: Literal["auto", "on", "off"] = "auto"

    def __post_init__(self) -> None:
        for key in ("max_steps", "batch_size", "grad_accum", "logging_steps"):
            _check(getattr(self, key) > 0, f"train.{key}", getattr(self, key), "must be a positive integer")
        _check(self.lr > 0, "train.lr", self.lr, "must be > 0")
        _check(self.save_steps >= 0, "train.save_steps", self.save_steps, "must be >= 0 (0 = only at the end)")
        _check(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "must be >= 0")
        _check(self.kernels in ("auto", "on", "off"), "train.kernels", self.kernels, "choose one of: auto, on, off")


@dataclass
class EvalSection:
    """Evaluation run by ``petl finetune`` before and after training.

    perplexity_lengths: context lengths for held-out perplexity (``data.eval_source``); empty skips it.
    perplexity_mode: ``sliding`` (strided, scores new tokens) or ``longlora`` (LongLoRA's eval.py).
    passkey_lengths: token lengths for passkey retrieval; empty skips it.
    """

    before_training: bool = True
    perplexity_lengths: list[int] = field(default_factory=list)
    perplexity_mode: Literal["sliding", "longlora"] = "sliding"
    max_windows: Optional[int] = None
    passkey_lengths: list[int] = field(default_factory=list)
    passkey_num_tests: int = 10

    def __post_init__(self) -> None:
        for n in self.perplexity_lengths + self.passkey_lengths:
            _check(n > 1, "eval lengths", n, "every length must be > 1")


@dataclass
class OutputSection:
    """Where results go. ``dir`` may contain ``{name}`` (the recipe name)."""

    dir: str = "runs/{name}"
    overwrite: bool = False
    save_merged: bool = False


@dataclass
class Recipe:
    """A complete petl recipe."""

    name: str = "recipe"
    description: str = ""
    task: TaskSection = field(default_factory=TaskSection)
    model: ModelSection = field(default_factory=ModelSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    attention: AttentionSection = field(default_factory=AttentionSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    output: OutputSection = field(default_factory=OutputSection)
    audio: AudioSection = field(default_factory=AudioSection)
    distill: DistillSection = field(default_factory=DistillSection)

    def __post_init__(self) -> None:
        if self.model.quantization == "4bit" and self.adapter.type == "soka":
            raise RecipeError("recipe key 'model.quantization' = '4bit' cannot be combined with "
                              "adapter.type 'soka'; use adapter.type 'lora' for QLoRA")
        if self.train.kernels == "on" and self.task.type != "causal_lm":
            raise RecipeError(f"recipe key 'train.kernels' = 'on' applies to causal-LM training; task.type "
                              f"{self.task.type!r} trains unfused, set train.kernels=auto or off")

    @property
    def output_dir(self) -> str:
        return self.output.dir.replace("{name}", self.name)
