"""PETL-AST adapters (Cappellazzo et al., MLSP 2024) for transformers' Audio Spectrogram Transformer.

Importing this package registers ``PetlType.AUDIO_ADAPTER`` with peft, after which
``get_peft_model(ast_model, AudioAdapterConfig(...))``, ``PeftModel.from_pretrained`` and the rest
of peft's API work. Methods: bottleneck and Conformer adapters, ConvPass, prompt and prefix tuning,
LoRA, BitFit and linear probing (see :class:`AudioAdapterConfig` and docs/audio.md).
"""
from ..registration import PetlType, register_petl_method
from .blocks import Bottleneck, ConformerConv, ConvPass2d, QuickGELU
from .config import METHODS, AudioAdapterConfig
from .layer import AudioAdapterLayer, NotMergeableError, Placement, PoolingLayer, SublayerAdapter
from .linear import BiasDelta, LoraLinear
from .model import AudioAdapterModel, patch_grid
from .tokens import PrefixAttention, PromptLayer

register_petl_method(PetlType.AUDIO_ADAPTER, AudioAdapterConfig, AudioAdapterModel, prefix=AudioAdapterModel.prefix)

__all__ = ["AudioAdapterConfig", "AudioAdapterModel", "AudioAdapterLayer", "METHODS", "NotMergeableError",
           "Placement", "Bottleneck", "ConformerConv", "ConvPass2d", "QuickGELU", "SublayerAdapter", "PoolingLayer",
           "PromptLayer", "PrefixAttention", "LoraLinear", "BiasDelta", "patch_grid"]
