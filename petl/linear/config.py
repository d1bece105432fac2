"""``LawcatConfig``: what a LAWCAT conversion builds (shared/methods/adapters.md §3).

LAWCAT is an architecture change, not an adapter: the converted attention keeps the teacher's
q/k/v/o projections and adds a causal short convolution on q and k, a Hedgehog feature map and a
data-dependent GLA gate. The config is therefore a plain dataclass saved next to the converted
model (``lawcat_config.json``); stage 2 trains ordinary peft LoRA on top of the converted model.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

CONFIG_NAME = "lawcat_config.json"
BACKENDS = ("auto", "reference", "chunked", "fla")
KERNEL_SETTINGS = ("auto", "on", "off")


@dataclass
class LawcatConfig:
    """Hyper-parameters of the LAWCAT attention that replaces softmax attention.

    Args:
        layers (list[int], Optional): indices of the decoder layers to linearise; the others keep
            softmax attention. Default: ``None`` (all layers).
        conv_size (int): kernel size of the causal depthwise convolution across tokens on q and k.
            Default: 4.
        conv_init (str): ``"identity"`` (last tap 1, the others ``conv_init_eps``; the paper's
            "idt") or ``"random"`` (PyTorch's default Conv1d init). Default: ``"identity"``.
        conv_init_eps (float): value of the non-current taps under ``"identity"``. Default: 1e-3.
        feature_dim (int, Optional): f, the width of one half of the Hedgehog feature map
            ``[softmax(uW), softmax(-uW)]``; the map outputs 2f features. Default: ``None``
            (head_dim // 2, so the feature map keeps the head dim, as in the paper's fd32/fd64).
        tie_feature_maps (bool): one feature map shared by q and k (the LAWCAT wrapper's
            ``tie_qk_kernels: true``) or one each. Default: ``True``.
        feature_map_init (str): ``"identity"`` (rectangular identity W, the paper's
            ``--lk_zero_init``) or ``"random"`` (normal, std 1/sqrt(head_dim)). Default:
            ``"identity"``.
        gate_low_rank (int): rank of the gate projection ``W2 W1 x``. Default: 16.
        gate_logit_normalizer (float): ``log alpha = logsigmoid(W2 W1 x + b) / normalizer``.
            Default: 16.
        window_size (int): 0 for pure gated linear attention (the paper's default); > 0 adds a
            LoLCATs-style sliding softmax window of this many tokens (RoPE'd q/k, exp-scores)
            whose terms are combined with the linear terms of the older tokens. Default: 0.
        window_factor_init (float): initial sigmoid value of the per-head window weight.
            Default: 0.1.
        eps (float): added to the normaliser. Default: 1e-10 (the paper's value; outputs are
            divided in float32).
        chunk_size (int): chunk length of the chunked PyTorch form. Default: 64.
        backend (str): the gated-linear-attention core: ``"auto"`` (fla on CUDA if importable and
            kernels are not off, else chunked on CUDA, reference on CPU), ``"reference"``,
            ``"chunked"`` or ``"fla"``. The environment variable ``PETL_LAWCAT_BACKEND`` overrides
            it. Default: ``"auto"``.
        kernels (str): petl's fused Triton kernels around the core (conv + feature map, gate +
            normaliser, division; petl/linear/fused.py): ``"auto"`` (defer to ``PETL_KERNELS``,
            whose auto means CUDA with Triton), ``"on"`` or ``"off"`` (the PyTorch path).
            Default: ``"auto"``.
        loss_scale (float): stage-1 attention-transfer loss multiplier (``xent0_mse1000``).
            Default: 1000.
    """

    layers: list[int] | None = None
    conv_size: int = 4
    conv_init: str = "identity"
    conv_init_eps: float = 1e-3
    feature_dim: int | None = None
    tie_feature_maps: bool = True
    feature_map_init: str = "identity"
    gate_low_rank: int = 16
    gate_logit_normalizer: float = 16.0
    window_size: int = 0
    window_factor_init: float = 0.1
    eps: float = 1e-10
    chunk_size: int = 64
    backend: str = "auto"
    kernels: str = "auto"
    loss_scale: float = 1000.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.conv_size < 1:
            raise ValueError(f"LawcatConfig.conv_size={self.conv_size} must be >= 1 (the paper uses 4)")
        if self.conv_init not in ("identity", "random"):
            raise ValueError(f"LawcatConfig.conv_init={self.conv_init!r}: use 'identity' or 'random'")
        if self.feature_map_init not in ("identity", "random"):
            raise ValueError(
                f"LawcatConfig.feature_map_init={self.feature_map_init!r}: use 'identity' or 'random'")
        if self.feature_dim is not None and self.feature_dim < 1:
            raise ValueError(f"LawcatConfig.feature_dim={self.feature_dim} must be >= 1 or None")
        if self.gate_low_rank < 1:
            raise ValueError(f"LawcatConfig.gate_low_rank={self.gate_low_rank} must be >= 1")
        if self.gate_logit_normalizer <= 0:
            raise ValueError("LawcatConfig.gate_logit_normalizer must be > 0 (the paper uses 16)")
        if self.window_size < 0:
            raise ValueError(f"LawcatConfig.window_size={self.window_size} must be >= 0 (0 = off)")
        if not 0.0 < self.window_factor_init < 1.0:
            raise ValueError("LawcatConfig.window_factor_init must be in (0, 1): it is a sigmoid value")
        if self.chunk_size < 1:
            raise ValueError(f"LawcatConfig.chunk_size={self.chunk_size} must be >= 1")
        if self.backend not in BACKENDS:
            raise ValueError(f"LawcatConfig.backend={self.backend!r}: choose one of {BACKENDS}")
        if self.kernels not in KERNEL_SETTINGS:
            raise ValueError(f"LawcatConfig.kernels={self.kernels!r}: choose one of {KERNEL_SETTINGS}")
        if self.layers is not None:
            self.layers = sorted({int(i) for i in self.layers})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LawcatConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LawcatConfig keys {unknown}; valid keys are {sorted(known)}")
        return cls(**data)

    def save(self, directory: str | os.PathLike) -> str:
        """Write ``lawcat_config.json`` into ``directory``; returns the file path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2, sort_keys=True)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "LawcatConfig":
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} not found: save the converted model with petl.linear.save_lawcat(model, dir)")
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))
