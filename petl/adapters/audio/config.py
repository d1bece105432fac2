"""Configuration of the audio-spectrogram-transformer adapters (PETL-AST, Cappellazzo et al. 2024)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from ..registration import PetlType

Method = Literal["bottleneck", "conformer", "convpass", "prompt", "prefix", "lora", "bitfit", "linear_probe"]
METHODS = ("bottleneck", "conformer", "convpass", "prompt", "prefix", "lora", "bitfit", "linear_probe")

#: Reduction rate (bottleneck = round(hidden / rate)) used when ``reduction_rate`` is not given:
#: the paper's settings (Conformer RR=96 is its best; LoRA RR=64 gives r=12; ConvPass dim 8).
DEFAULT_REDUCTION_RATE = {"bottleneck": 64, "conformer": 96, "convpass": 96, "lora": 64}
#: Prompt / prefix token counts of the paper (25 prompts; 24 prefix tokens = 12 keys + 12 values).
DEFAULT_NUM_TOKENS = {"prompt": 25, "prefix": 24}

# Module-name patterns (regex, full match) on transformers' ASTForAudioClassification / ASTModel.
_LAYER = r"(?:.*\.)?layers\.\d+"
_POOL = r"(?:.*\.)?audio_spectrogram_transformer\.layernorm|layernorm"


@dataclass
class AudioAdapterConfig(PeftConfig):
    """One parameter-efficient method for transformers' ``ASTForAudioClassification``.

    Usable with ``peft.get_peft_model`` once ``petl`` (or ``petl.adapters.audio``) is imported. The
    defaults are the paper's best setting: a parallel Pfeiffer Conformer-convolution adapter
    (RR=96, kernel 31) on the FFN of every layer, mean-pooled classification head.

    Every method also trains the classification head (``classifier``: its LayerNorm and Linear,
    the role the reference code's final LN + Linear play) and pools the encoder output as
    ``pooling`` says. Adapters additionally train the LayerNorm that feeds them
    (``layernorm_after`` for the FFN, ``layernorm_before`` for the MHSA), as the paper does.

    Args:
        method (str): ``"bottleneck"`` (Linear-GELU-Linear), ``"conformer"`` (pointwise conv, GLU,
            depthwise conv, BatchNorm, SiLU, pointwise conv over the token sequence),
            ``"convpass"`` (3x3 conv over the frequency x time patch grid, parallel to both MHSA
            and FFN), ``"prompt"`` (prompts replace the distillation token), ``"prefix"`` (key and
            value prefixes in every attention), ``"lora"`` (on q and v), ``"bitfit"`` (every
            Linear / LayerNorm bias of the layers) or ``"linear_probe"`` (head only).
            Default: ``"conformer"``.
        adapter_type (str): ``"pfeiffer"`` (one adapter per layer, at ``location``) or
            ``"houlsby"`` (one at the MHSA and one at the FFN). Bottleneck / Conformer only.
            Default: ``"pfeiffer"``.
        location (str): sub-layer of a Pfeiffer adapter: ``"ffn"`` or ``"mhsa"``. Default: ``"ffn"``.
        placement (str): ``"parallel"`` (``f(x) + Ad(a)``) or ``"sequential"`` (the adapter sits in
            the data path). Default: ``"parallel"``.
        position (str): ``"before"`` feeds the adapter the sub-layer's input (the LayerNorm
            output x), ``"after"`` its output f(x). Default: ``"before"``.
        residual (bool, Optional): add the adapter's input to its output (``Ad(a) + a``). None
            chooses the paper's setting: off for parallel, on for sequential (without it a
            sequential adapter discards the frozen sub-layer). Default: None.
        reduction_rate (int, Optional): bottleneck width / LoRA rank = round(hidden / rate); the
            LoRA scaling is ``lora_alpha / reduction_rate`` as in the paper (not alpha / r).
            Default: None (conformer 96, convpass 96, bottleneck 64, lora 64).
        kernel_size (int): depthwise kernel of the Conformer adapter ('same' padding). Default: 31.
        convpass_scale (float): the factor s of ConvPass's ``x + s * Ad(LN x)``. Default: 1.0.
        dropout (float): dropout inside the adapter block (ConvPass uses 0.1). Default: None
            (0.1 for convpass, 0 otherwise).
        lora_alpha (float): the paper's alpha. Default: 8.0.
        num_tokens (int, Optional): prompts (``prompt``) or prefix tokens, split evenly between
            keys and values (``prefix``). Default: None (25 prompts, 24 prefix tokens).
        deep (bool): prompt tuning only: fresh prompts at the input of every layer (deep) instead
            of only the first (shallow). Default: True (the paper's setting).
        pooling (str): what the head sees: ``"mean"`` of all output tokens (the paper),
            ``"cls"`` (the CLS token) or ``"native"`` (transformers' (CLS + distillation) / 2,
            the only mode a merged model reproduces). Default: ``"mean"``.
        faithful (bool): reproduce the reference code's effective behaviour where it differs from
            its intent: every adapter Linear / Conv2d and LoRA factor gets the trunc-normal(0.02)
            init that transformers' loader applied (Conv1d, BatchNorm, prompts and prefixes keep
            their own init), so adapters do not start as the identity; and the Conformer block's
            LayerNorm is built (its parameters count) but not applied. Default: False.
        modules_to_save (list[str], Optional): modules trained in full and saved; None picks the
            method's set described above. Default: None.
        target_modules (str, Optional): computed from the method; do not set. Default: None.
    """

    method: Method = "conformer"
    adapter_type: Literal["pfeiffer", "houlsby"] = "pfeiffer"
    location: Literal["ffn", "mhsa"] = "ffn"
    placement: Literal["parallel", "sequential"] = "parallel"
    position: Literal["before", "after"] = "before"
    residual: Optional[bool] = None
    reduction_rate: Optional[int] = None
    kernel_size: int = 31
    convpass_scale: float = 1.0
    dropout: Optional[float] = None
    lora_alpha: float = 8.0
    num_tokens: Optional[int] = None
    deep: bool = True
    pooling: Literal["mean", "cls", "native"] = "mean"
    faithful: bool = False
    modules_to_save: Optional[list[str]] = None
    target_modules: Optional[Union[list[str], str]] = None
    bias: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PetlType.AUDIO_ADAPTER
        self._validate()
        if self.reduction_rate is None and self.method in DEFAULT_REDUCTION_RATE:
            self.reduction_rate = DEFAULT_REDUCTION_RATE[self.method]
        if self.num_tokens is None and self.method in DEFAULT_NUM_TOKENS:
            self.num_tokens = DEFAULT_NUM_TOKENS[self.method]
        if self.residual is None:
            self.residual = self.placement == "sequential"
        if self.dropout is None:
            self.dropout = 0.1 if self.method == "convpass" else 0.0
        if self.modules_to_save is None:
            self.modules_to_save = self.default_modules_to_save()
        if self.target_modules is None:
            self.target_modules = self.target_pattern()

    def _validate(self) -> None:
        choices = {"method": METHODS, "adapter_type": ("pfeiffer", "houlsby"), "location": ("ffn", "mhsa"),
                   "placement": ("parallel", "sequential"), "position": ("before", "after"),
                   "pooling": ("mean", "cls", "native"), "bias": ("none",)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"AudioAdapterConfig.{name}={getattr(self, name)!r} is not one of {allowed}")
        if self.reduction_rate is not None and self.reduction_rate < 1:
            raise ValueError(f"AudioAdapterConfig.reduction_rate must be >= 1, got {self.reduction_rate}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"AudioAdapterConfig.kernel_size must be a positive odd number ('same' padding), "
                             f"got {self.kernel_size}")
        if self.num_tokens is not None and self.num_tokens < 1:
            raise ValueError(f"AudioAdapterConfig.num_tokens must be >= 1, got {self.num_tokens}")
        if self.method == "prefix" and self.num_tokens is not None and self.num_tokens % 2:
            raise ValueError(f"prefix tuning splits num_tokens evenly between keys and values; "
                             f"num_tokens={self.num_tokens} is odd, use an even number")
        if self.method == "prompt" and self.pooling == "native":
            raise ValueError("prompt tuning replaces the distillation token that pooling='native' reads; "
                             "use pooling='mean' or 'cls'")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AudioAdapterConfig.dropout must be in [0, 1), got {self.dropout}")

    # -- derived settings ---------------------------------------------------------------
    @property
    def sublayers(self) -> tuple[str, ...]:
        """Sub-layers (``"mhsa"``, ``"ffn"``) that get an adapter block."""
        if self.method == "convpass" or (self.method in ("bottleneck", "conformer") and self.adapter_type == "houlsby"):
            return ("mhsa", "ffn")
        if self.method in ("bottleneck", "conformer"):
            return (self.location,)
        return ()

    @property
    def mergeable(self) -> bool:
        """Whether the adapter folds into the base weights (linear in the weights, no extra tokens)."""
        return self.method in ("lora", "bitfit", "linear_probe")

    def default_modules_to_save(self) -> list[str]:
        """The classifier, plus the LayerNorm feeding each adapted sub-layer."""
        extra = {"mhsa": "layernorm_before", "ffn": "layernorm_after"}
        return ["classifier"] + [extra[s] for s in self.sublayers]

    def target_pattern(self) -> str:
        """Regex (full match) of the module names this method wraps; the final LN carries the pooling."""
        names = {"mhsa": "attention", "ffn": "mlp"}
        if self.sublayers:
            inner = "|".join(names[s] for s in self.sublayers)
            layer = rf"{_LAYER}\.(?:{inner})"
        elif self.method == "prompt":
            layer = _LAYER
        elif self.method == "prefix":
            layer = rf"{_LAYER}\.attention"
        elif self.method == "lora":
            layer = rf"{_LAYER}\.attention\.(?:q_proj|v_proj)"
        elif self.method == "bitfit":
            layer = rf"{_LAYER}\.(?:attention\.[qkvo]_proj|mlp\.fc[12]|layernorm_before|layernorm_after)"
        else:  # linear_probe: only the pooling wrapper
            return _POOL
        return f"{layer}|{_POOL}"
