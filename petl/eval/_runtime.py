"""How the evaluators put a model into inference state and give it back unchanged.

Perplexity and passkey both need the same three things: the device the inputs must go to, eval
mode (no dropout) and ordinary full attention. A model fine-tuned with petl may still carry a
training-time pattern (S2-Attn, SF-Attn: DESIGN.md principle 3, "train sparse, infer dense"), so the
evaluators switch any non-standard attention implementation to SDPA for the duration of the call
and restore the user's setting afterwards.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

#: Attention implementations that compute exact full causal attention (name or name prefix).
FULL_ATTENTION_PREFIXES = ("eager", "sdpa", "flash_attention", "flex_attention", "paged|")


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft ``PeftModel`` (or ``model`` itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def input_device(model: torch.nn.Module) -> torch.device:
    """Device of the input embeddings: where ``input_ids`` must live (also under device_map)."""
    get_emb = getattr(model, "get_input_embeddings", None)
    if callable(get_emb):
        emb = get_emb()
        if emb is not None and getattr(emb, "weight", None) is not None:
            return emb.weight.device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def attention_implementation(model: torch.nn.Module) -> str | None:
    """The ``attn_implementation`` name the model's config currently selects."""
    config = getattr(base_model(model), "config", None)
    return getattr(config, "_attn_implementation", None)


def is_full_attention(name: str | None) -> bool:
    """True for transformers' built-in exact attention functions (and for "unknown": None)."""
    return name is None or any(name.startswith(p) for p in FULL_ATTENTION_PREFIXES)


@contextlib.contextmanager
def full_attention(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run the body with full attention, switching a training-time pattern to SDPA and back.

    Args:
        model (nn.Module): a transformers model or a peft ``PeftModel``.
        enabled (bool): when False the model is left exactly as it is (e.g. to measure a model
            *with* its sparse pattern, as LongLoRA's "w/o FT" row was, issue LL#105).
    """
    previous = attention_implementation(model)
    if not enabled or is_full_attention(previous):
        yield
        return
    inner = base_model(model)
    if not hasattr(inner, "set_attn_implementation"):
        raise ValueError(
            f"model uses attention {previous!r} and cannot be switched to full attention; "
            "call petl.use_attention(model, 'full') first or pass full_attention=False")
    inner.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        inner.set_attn_implementation(previous)


@contextlib.contextmanager
def inference_mode(model: torch.nn.Module, full: bool = True) -> Iterator[None]:
    """eval() + no_grad + full attention; the model's training flag is restored on exit."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), full_attention(model, enabled=full):
            yield
    finally:
        model.train(was_training)


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar (or a silent stand-in with the same ``update``/``close`` methods)."""
    if enabled:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=False)
    return _NoBar()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass
