"""Tiny encoders (BERT-, RoBERTa- and Longformer-shaped) and a word-level tokenizer for task tests.

Built from configs with random weights, saved with safetensors, so task recipes run end to end in
seconds on CPU without a network. The saved checkpoint is a bare encoder (``BertModel`` ...), like a
hub checkpoint: the task head is missing and gets initialised (and trained in full) on load.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

ENCODER_ARCHS = ("bert", "roberta", "longformer")
_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def tiny_tokenizer_for(texts: Iterable[str], folder: str | Path, max_length: int = 512):
    """A lower-casing WordPiece ``BertTokenizerFast`` whose vocabulary is every word / sign of ``texts``."""
    from transformers import BertTokenizerFast

    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join([*_SPECIALS, *words]) + "\n", encoding="utf-8")
    return BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True, model_max_length=max_length)


def tiny_encoder_config(arch: str, vocab_size: int, *, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2,
                        max_length: int = 128, pad_token_id: int = 0, **overrides: Any):
    """A small encoder config; ``max_length`` tokens fit its position table (RoBERTa-style offsets included)."""
    from transformers import AutoConfig

    if arch not in ENCODER_ARCHS:
        raise ValueError(f"unknown tiny encoder {arch!r}; choose one of {ENCODER_ARCHS}")
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, intermediate_size=2 * hidden_size, pad_token_id=pad_token_id,
                  max_position_embeddings=max_length + (pad_token_id + 1 if arch != "bert" else 0),
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, type_vocab_size=2)
    if arch == "longformer":
        common.update(attention_window=[16] * num_layers, sep_token_id=3, bos_token_id=2, eos_token_id=3)
    common.update(overrides)
    return AutoConfig.for_model(arch, **common)


def save_tiny_encoder(folder: str | Path, texts: Iterable[str], arch: str = "bert", seed: int = 0,
                      max_length: int = 128, **sizes: Any) -> Path:
    """Save a tiny random ``arch`` encoder and a matching tokenizer to ``folder``; returns the folder."""
    import torch
    from transformers import AutoModel

    folder = Path(folder)
    tokenizer = tiny_tokenizer_for(list(texts), folder, max_length=max_length)
    config = tiny_encoder_config(arch, len(tokenizer), max_length=max_length, pad_token_id=tokenizer.pad_token_id,
                                 **sizes)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder
