"""Synthetic passkey-retrieval sequences for the distillation data (``distill.passkey_samples``).

LAWCAT's runs are named ``distill_passkey_...``: their 1K-token distillation data includes
passkey-format samples. Each sample here is the prompt of :func:`petl.eval.passkey_prompt`
(task, filler, key line at a random depth, filler, question) followed by the answer, at most
``length`` tokens long, trained on every token. Keys and depths come from
``numpy.random.default_rng([seed, TRAIN_STREAM, i])``, a stream disjoint from the one the
passkey evaluation draws from (``[seed, i]``), so evaluation prompts are not training prompts.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from petl.eval.passkey import KEY_MAX, KEY_MIN, passkey_prompt

#: Third seed word separating the training stream from the evaluation stream.
TRAIN_STREAM = 7919


def passkey_training_examples(tokenizer: Any, n: int, length: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """``n`` examples ``{"input_ids", "labels", "position_ids"}`` of at most ``length`` tokens.

    Args:
        tokenizer: the model's tokenizer.
        n (int): number of samples.
        length (int): maximum tokens per sample (prompt + answer), e.g. ``data.block_size``.
        seed (int): stream seed (the recipe's ``train.seed``).
    """
    out = []
    cache: dict[int, Any] = {}
    for i in range(n):
        rng = np.random.default_rng([seed, TRAIN_STREAM, i])
        key = int(rng.integers(KEY_MIN, KEY_MAX + 1))
        depth = float(rng.random())
        # answers have 1-5 digits, a handful of tokens: size the prompt for the longest one seen
        budget = length - cache.setdefault(len(str(key)), len(tokenizer(f" {key}", add_special_tokens=False,
                                                                           verbose=False)["input_ids"]) + 1)
        prompt = passkey_prompt(tokenizer, budget, key, depth)
        ids = list(prompt.input_ids) + list(prompt.answer_ids)
        ids = ids[:length]
        out.append({"input_ids": ids, "labels": list(ids), "position_ids": list(range(len(ids)))})
    return out


def passkey_training_dataset(tokenizer: Any, n: int, length: int, seed: int = 0):
    """:func:`passkey_training_examples` as a ``datasets.Dataset`` with packed blocks' columns."""
    import datasets

    rows = passkey_training_examples(tokenizer, n, length, seed)
    ids = datasets.Sequence(datasets.Value("int32"))
    features = datasets.Features({"input_ids": ids, "labels": ids, "position_ids": ids})
    return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in ("input_ids", "labels", "position_ids")},
                                      features=features)
