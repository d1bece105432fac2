"""Turn held-out text (or LongLoRA's pre-tokenized files) into token tensors for perplexity.

Accepted sources, chosen by file suffix:

* ``.bin``: LongLoRA's evaluation format, a flat ``uint16`` memmap of Llama token ids (PG19
  validation/test, proof-pile ``test_sampled_data.bin``); read as-is, no tokenizer needed.
* ``.npy``: a 1-D integer array saved with ``numpy.save``.
* ``.jsonl``: one JSON object per line with a ``"text"`` field; each line is a document.
* anything else: UTF-8 text, tokenized as one document.
* a ``str`` that is not an existing path and contains a newline or no known suffix: the text itself.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

_TOKEN_SUFFIXES = (".bin", ".npy")
_TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".md")


def load_eval_tokens(path_or_text: str | os.PathLike, tokenizer: Any = None, *,
                     add_bos: bool | None = None) -> torch.Tensor | list[torch.Tensor]:
    """Token ids of an evaluation text: a 1-D LongTensor ``[N]``, or a list of them for ``.jsonl``.

    Args:
        path_or_text (str | PathLike): a file (see module docstring) or the text itself.
        tokenizer: a transformers tokenizer; required unless the file holds token ids.
        add_bos (bool, Optional): True prepends ``tokenizer.bos_token_id`` to every document,
            False adds no special token, None uses the tokenizer's default
            (``add_special_tokens=True``, a single BOS for Llama-family tokenizers). Default: None.
    """
    path = _as_path(path_or_text)
    if path is None:
        return encode_text(str(path_or_text), tokenizer, add_bos=add_bos)
    suffix = path.suffix.lower()
    if suffix == ".bin":
        return torch.from_numpy(np.memmap(path, dtype=np.uint16, mode="r").astype(np.int64))
    if suffix == ".npy":
        arr = np.load(path)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{path}: expected a 1-D integer array, got {arr.dtype} {arr.shape}")
        return torch.from_numpy(arr.astype(np.int64))
    if suffix == ".jsonl":
        docs = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict) or "text" not in record:
                    raise ValueError(f"{path}:{lineno}: each line needs a \"text\" field")
                docs.append(encode_text(record["text"], tokenizer, add_bos=add_bos))
        if not docs:
            raise ValueError(f"{path}: no documents found")
        return docs
    return encode_text(path.read_text(encoding="utf-8"), tokenizer, add_bos=add_bos)


def encode_text(text: str, tokenizer: Any, *, add_bos: bool | None = None) -> torch.Tensor:
    """Tokenize one document to a 1-D LongTensor ``[N]`` (see :func:`load_eval_tokens`)."""
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to tokenize text; pass tokenizer=AutoTokenizer...")
    if not text:
        raise ValueError("cannot evaluate an empty text")
    # verbose=False: evaluation texts are longer than model_max_length on purpose.
    ids = list(tokenizer(text, add_special_tokens=add_bos is None, verbose=False)["input_ids"])
    if add_bos:
        if tokenizer.bos_token_id is None:
            raise ValueError("add_bos=True but the tokenizer has no bos_token; pass add_bos=False")
        ids = [tokenizer.bos_token_id] + ids
    return torch.tensor(ids, dtype=torch.long)


def _as_path(path_or_text: str | os.PathLike) -> Path | None:
    """The file meant by ``path_or_text``, or None when it is literal text."""
    if isinstance(path_or_text, os.PathLike):
        path = Path(path_or_text)
    elif "\n" in path_or_text or len(path_or_text) > 4096:
        return None
    else:
        path = Path(path_or_text)
        if not path.is_file() and path.suffix.lower() not in _TOKEN_SUFFIXES + _TEXT_SUFFIXES:
            return None
    if not path.is_file():
        raise FileNotFoundError(f"evaluation file not found: {path}")
    return path
