"""Tiny randomly initialised models for tests, examples and benchmarks.

Nothing here touches the network: every model is built from a config. The shapes are chosen so
that GQA is exercised (more query heads than key/value heads) and head dims stay small enough for
CPU tests to run in milliseconds.
"""
from __future__ import annotations

from typing import Any

import torch

#: Architectures petl's attention patterns and adapters are tested on. Each entry builds a
#: transformers config with GQA (4 query heads, 2 key/value heads) and head_dim 16.
TINY_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gpt_neox")


def tiny_config(arch: str = "llama", vocab_size: int = 128, hidden_size: int = 64,
                num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                max_position_embeddings: int = 256, **overrides: Any):
    """Return a small transformers config of architecture ``arch``.

    Args:
        arch (str): one of :data:`TINY_ARCHITECTURES`.
        vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, max_position_embeddings:
            model sizes. ``hidden_size // num_heads`` is the head dim.
        **overrides: extra config attributes (e.g. ``tie_word_embeddings=False``).
    """
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, max_position_embeddings=max_position_embeddings,
                  intermediate_size=2 * hidden_size)
    if arch in ("llama", "mistral", "qwen2", "qwen3"):
        common.update(num_key_value_heads=num_kv_heads)
        if arch == "qwen3":
            common.update(head_dim=hidden_size // num_heads)
        if arch == "mistral":
            common.update(sliding_window=None)
    elif arch == "gemma":
        common.update(num_key_value_heads=num_kv_heads, head_dim=hidden_size // num_heads)
    elif arch == "gpt_neox":
        common.update(rotary_pct=1.0, use_parallel_residual=True)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {TINY_ARCHITECTURES}")
    common.update(overrides)
    return AutoConfig.for_model(arch, **common)


def tiny_causal_lm(arch: str = "llama", seed: int = 0, attn_implementation: str = "eager",
                   dtype: torch.dtype = torch.float32, **config_kwargs: Any):
    """Build a randomly initialised causal LM (deterministic for a given ``seed``)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation,
                                             dtype=dtype)
    return model.eval()


SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "All that glitters is not gold. The early bird catches the worm. Actions speak louder than words. "
    "Where there is a will there is a way. Knowledge is power. Time and tide wait for no man. "
)


def tiny_tokenizer(texts: list[str] | None = None, vocab_size: int = 320):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts`` (default: a few proverbs).

    It has ``<s>``, ``</s>``, ``<pad>`` and ``<unk>`` special tokens and adds ``<s>`` at the start of
    each encoded text, like Llama tokenizers do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts or [SAMPLE_TEXT] * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def save_tiny_model(path, arch: str = "llama", seed: int = 0, **config_kwargs: Any):
    """Save a tiny random causal LM plus a matching tokenizer to ``path`` (safetensors); returns path."""
    from pathlib import Path

    tokenizer = tiny_tokenizer()
    config_kwargs.setdefault("vocab_size", len(tokenizer))
    model = tiny_causal_lm(arch, seed=seed, attn_implementation="sdpa", **config_kwargs)
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    path = Path(path)
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path
