"""Convert a loaded transformers model to LAWCAT, and save / reload a converted model.

``convert_to_lawcat(model, LawcatConfig(...))`` swaps the ``self_attn`` module of each chosen
decoder layer for a :class:`LawcatAttention` built around it (the projections are shared, not
copied); the other layers keep softmax attention. The converted model is still the same
transformers class, so ``save_pretrained`` writes every weight (the new ones under
``...self_attn.lawcat_*``) to safetensors, and peft LoRA on ``q_proj/k_proj/v_proj/o_proj``
works unchanged (stage 2).

Reloading: ``save_lawcat`` also writes ``lawcat_config.json``; ``load_lawcat(dir)`` loads the
base weights with ``from_pretrained``, converts the same layers and loads the ``lawcat_*``
tensors from the saved safetensors files.
"""
from __future__ import annotations

import json
import os
from typing import Iterator

import torch
import torch.nn as nn

from .attention import LawcatAttention
from .config import LawcatConfig

PARAM_PREFIX = "lawcat_"


def _attention_modules(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute name, attention module) for every decoder self-attention, in order."""
    found = []
    for parent in model.modules():
        attn = getattr(parent, "self_attn", None)
        if isinstance(attn, nn.Module) and hasattr(attn, "layer_idx"):
            found.append((parent, "self_attn", attn))
    return sorted(found, key=lambda item: item[2].layer_idx)


def convert_to_lawcat(model: nn.Module, config: LawcatConfig | None = None, **overrides) -> nn.Module:
    """Replace softmax attention with LAWCAT in ``config.layers`` (all layers if None), in place.

    Args:
        model (nn.Module): a loaded causal LM (Llama, Mistral, Qwen2, Qwen3 families).
        config (LawcatConfig, Optional): hyper-parameters. Default: ``LawcatConfig()``.
        **overrides: fields of ``LawcatConfig`` to change (e.g. ``layers=[0, 2]``).

    Returns:
        The same model object, converted. New parameters require grad; nothing else changes.
    """
    config = LawcatConfig(**{**(config or LawcatConfig()).to_dict(), **overrides})
    attns = _attention_modules(model)
    if not attns:
        raise ValueError(f"{type(model).__name__} has no decoder layers with a `self_attn` module; "
                         "LAWCAT supports Llama/Mistral/Qwen2/Qwen3-style causal LMs")
    indices = {a.layer_idx for _, _, a in attns}
    wanted = indices if config.layers is None else set(config.layers)
    missing = sorted(wanted - indices)
    if missing:
        raise ValueError(f"LawcatConfig.layers has {missing}, but the model's layers are 0..{max(indices)}")
    for parent, name, attn in attns:
        if attn.layer_idx in wanted and not isinstance(attn, LawcatAttention):
            setattr(parent, name, LawcatAttention(attn, config))
    return model


def lawcat_layers(model: nn.Module) -> list[int]:
    """Indices of the converted layers."""
    return sorted(m.layer_idx for m in model.modules() if isinstance(m, LawcatAttention))


def get_lawcat_config(model: nn.Module) -> LawcatConfig:
    """The config a converted model was built with, ``layers`` filled in."""
    modules = [m for m in model.modules() if isinstance(m, LawcatAttention)]
    if not modules:
        raise ValueError("model has no LAWCAT layers: call petl.linear.convert_to_lawcat first")
    data = modules[0].lawcat_config.to_dict()
    data["layers"] = lawcat_layers(model)
    return LawcatConfig.from_dict(data)


def lawcat_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of everything LAWCAT added: convs, feature maps, gates, window factors."""
    for name, p in model.named_parameters():
        if any(part.startswith(PARAM_PREFIX) for part in name.split(".")):
            yield name, p


def mark_only_lawcat_trainable(model: nn.Module) -> int:
    """Freeze everything except the LAWCAT parameters (stage 1); returns the trainable count."""
    for p in model.parameters():
        p.requires_grad_(False)
    n = 0
    for _, p in lawcat_parameters(model):
        p.requires_grad_(True)
        n += p.numel()
    return n


def save_lawcat(model: nn.Module, directory: str | os.PathLike, **save_kwargs) -> None:
    """``model.save_pretrained(directory)`` (safetensors) plus ``lawcat_config.json``.

    For a peft-wrapped model, merge first (``model.merge_and_unload()``) or save the adapter
    separately and the converted base with this function.
    """
    get_lawcat_config(model).save(directory)
    model.save_pretrained(directory, **save_kwargs)


def _saved_lawcat_tensors(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for fname in files:
        path = os.path.join(directory, fname)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: save with petl.linear.save_lawcat (safetensors)")
        out.update({k: t for k, t in load_file(path).items() if PARAM_PREFIX in k})
    return out


def load_lawcat(directory: str | os.PathLike, model_class=None, **from_pretrained_kwargs) -> nn.Module:
    """Rebuild a model saved with :func:`save_lawcat`.

    Args:
        directory (str): the save directory.
        model_class: a transformers auto/model class. Default: ``AutoModelForCausalLM``.
        **from_pretrained_kwargs: passed on (``dtype``, ``device_map``, ``attn_implementation``...).
    """
    import logging

    from transformers import AutoModelForCausalLM

    directory = os.fspath(directory)
    config = LawcatConfig.load(directory)
    cls = model_class or AutoModelForCausalLM
    tf_logger = logging.getLogger("transformers.modeling_utils")
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)  # the lawcat_* keys are "unexpected" until we convert
    try:
        model = cls.from_pretrained(directory, **from_pretrained_kwargs)
    finally:
        tf_logger.setLevel(level)
    convert_to_lawcat(model, config)
    saved = _saved_lawcat_tensors(directory)
    expected = {n for n, _ in lawcat_parameters(model)}
    missing = sorted(expected - set(saved))
    if missing:
        raise ValueError(f"{directory} lacks LAWCAT weights {missing[:3]}...; was it saved after conversion?")
    model.load_state_dict(saved, strict=False)
    return model
