"""Shared fixtures: a tiny saved model with a tokenizer, and small text / SFT data files."""
from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: sentences the tiny documents are made of (kept varied so packing cuts across documents)
_WORDS = ("the quick brown fox jumps over the lazy dog while a stitch in time saves nine and all that "
          "glitters is not gold so the early bird catches the worm").split()


def make_documents(n_docs: int = 12, words_per_doc: int = 180, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(words_per_doc)) + "." for _ in range(n_docs)]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama (native context 64) saved with safetensors and a byte-level BPE tokenizer."""
    from petl.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama", max_position_embeddings=64)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in make_documents()))
    return path


@pytest.fixture(scope="session")
def sft_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "longalpaca.json"
    docs = make_documents(8, 60)
    records = [{"instruction": f"Summarise this text: {doc}", "output": "a fox, a dog and a bird."} for doc in docs]
    path.write_text(json.dumps(records))
    return path
