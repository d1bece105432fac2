"""Passkey retrieval: can the model repeat a 1-5 digit key hidden in a long filler text?

The protocol follows LongLoRA's passkey_retrivial.py (itself from landmark-attention and
LongLLaMA): a task sentence, filler, the key line, more filler, then the question; the model answers
greedily with exactly as many tokens as the answer has, and is right iff those ids equal the answer
ids. petl differs in two documented ways: lengths are *token* targets (the filler is sized so the
tokenized prompt is as long as possible without exceeding the target; LongLoRA sizes it in
characters and reports the average token count), and the key depth can be fixed on a grid as well as
drawn uniformly per test. The filler sentences are petl's own wording of the usual grass/sky/sun
text.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from petl.eval._runtime import inference_mode, input_device, progress_bar

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
        "it. I will quiz you about the important information there.")
FILLER = ("The grass is green. The sky is blue. The sun is warm. Here we go again. "
          "Out and back once more.")
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
#: Keys are drawn uniformly from [KEY_MIN, KEY_MAX], as in LongLoRA.
KEY_MIN, KEY_MAX = 1, 50000


@dataclass
class PasskeyPrompt:
    """One test prompt. ``input_ids`` include the tokenizer's default special tokens (BOS)."""

    text: str
    input_ids: list[int]
    answer_ids: list[int]
    key: int
    depth: float
    filler_chars: int


def passkey_prompt(tokenizer: Any, length: int, key: int, depth: float) -> PasskeyPrompt:
    """The longest passkey prompt whose token count does not exceed ``length``.

    Args:
        tokenizer: a transformers tokenizer.
        length (int): target prompt length in tokens (an upper bound).
        key (int): the pass key.
        depth (float): fraction of the filler characters placed before the key line, in [0, 1].
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    unit_chars = len(FILLER) + 1
    filler = ""

    def text_for(chars: int) -> str:
        nonlocal filler
        if len(filler) < chars:  # grow the repeated filler lazily
            filler = " ".join([FILLER] * (chars // unit_chars + 2))
        before = int(round(depth * chars))
        # Like LongLoRA, both filler parts are prefixes of the same repeated text.
        return "\n".join([TASK, filler[:before], KEY_LINE.format(key=key),
                          filler[:chars - before], QUESTION])

    cache: dict[int, list[int]] = {}

    def count(chars: int) -> int:
        if chars not in cache:
            cache[chars] = list(tokenizer(text_for(chars), verbose=False)["input_ids"])
        return len(cache[chars])

    if count(0) > length:
        raise ValueError(f"passkey length {length} is shorter than the prompt without filler "
                         f"({count(0)} tokens); use lengths >= {count(0)}")
    chars = _largest_fitting(count, length, _chars_per_token(tokenizer))
    text, input_ids = text_for(chars), cache[chars]
    return PasskeyPrompt(text, input_ids, answer_token_ids(tokenizer, text, key), key, depth, chars)


def answer_token_ids(tokenizer: Any, prompt: str, key: int) -> list[int]:
    """Ids of `` {key}`` as the model should continue ``prompt`` (tokenized in context)."""
    bare = tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
    full = tokenizer(f"{prompt} {key}", add_special_tokens=False, verbose=False)["input_ids"]
    if list(full[:len(bare)]) == list(bare) and len(full) > len(bare):
        return list(full[len(bare):])
    # The tokenizer merged across the boundary: fall back to the key on its own (LongLoRA's way).
    return list(tokenizer(f" {key}", add_special_tokens=False, verbose=False)["input_ids"])


def passkey(model: torch.nn.Module, tokenizer: Any, *, lengths: Sequence[int],
            depths: Sequence[float] | None = None, num_tests: int = 10, seed: int = 0,
            progress: bool = True, full_attention: bool = True) -> dict[str, Any]:
    """Passkey retrieval accuracy per prompt length and per (length, depth).

    Args:
        model (nn.Module): a causal LM with ``generate`` (transformers model or peft PeftModel).
        tokenizer: its tokenizer.
        lengths (list[int]): prompt lengths in tokens (upper bounds, met within a few tokens).
        depths (list[float], Optional): key positions as fractions of the filler; each length is
            tested ``num_tests`` times at every depth. None draws a uniform depth per test, as
            LongLoRA does (reported under the depth key ``"random"``). Default: None.
        num_tests (int): tests per (length, depth). Default: 10.
        seed (int): test ``i`` uses ``numpy.random.default_rng([seed, i])`` for its key (and random
            depth), so the same test index has the same key at every length and depth. Default: 0.
        progress (bool): show a tqdm bar. Default: True.
        full_attention (bool): switch a training-time attention pattern to SDPA. Default: True.

    Returns:
        ``{"accuracy": {length: acc}, "accuracy_by_depth": {length: {depth: acc}},
        "prompt_tokens": {length: mean prompt tokens}, "records": [per-test dicts], "seed",
        "num_tests", "depths"}``.
    """
    _validate(lengths, depths, num_tests)
    depth_keys: list[float | str] = list(depths) if depths is not None else ["random"]
    device = input_device(model)
    records = []
    bar = progress_bar(len(lengths) * len(depth_keys) * num_tests, "passkey", progress)
    try:
        with inference_mode(model, full=full_attention):
            for length in lengths:
                for dkey in depth_keys:
                    for i in range(num_tests):
                        key, depth = _draw(seed, i, dkey)
                        prompt = passkey_prompt(tokenizer, length, key, depth)
                        out = _greedy(model, tokenizer, prompt, device)
                        records.append({"length": length, "depth": dkey, "test": i, "key": key,
                                        "key_depth": depth, "prompt_tokens": len(prompt.input_ids),
                                        "output_ids": out, "correct": out == prompt.answer_ids})
                        bar.update(1)
    finally:
        bar.close()
    return _summarise(records, lengths, depth_keys, seed, num_tests)


def _draw(seed: int, test: int, depth: float | str) -> tuple[int, float]:
    rng = np.random.default_rng([seed, test])
    key = int(rng.integers(KEY_MIN, KEY_MAX + 1))
    random_depth = float(rng.random())
    return key, random_depth if depth == "random" else float(depth)


def _greedy(model: torch.nn.Module, tokenizer: Any, prompt: PasskeyPrompt,
            device: torch.device) -> list[int]:
    ids = torch.tensor([prompt.input_ids], dtype=torch.long, device=device)  # [1, T]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                         max_new_tokens=len(prompt.answer_ids), do_sample=False, num_beams=1,
                         pad_token_id=pad)
    return out[0, ids.shape[1]:].tolist()


def _summarise(records: list[dict[str, Any]], lengths: Sequence[int], depth_keys: list,
               seed: int, num_tests: int) -> dict[str, Any]:
    acc, by_depth, tokens = {}, {}, {}
    for length in lengths:
        rows = [r for r in records if r["length"] == length]
        acc[length] = sum(r["correct"] for r in rows) / len(rows)
        tokens[length] = sum(r["prompt_tokens"] for r in rows) / len(rows)
        by_depth[length] = {}
        for d in depth_keys:
            drows = [r for r in rows if r["depth"] == d]
            by_depth[length][d] = sum(r["correct"] for r in drows) / len(drows)
    return {"accuracy": acc, "accuracy_by_depth": by_depth, "prompt_tokens": tokens,
            "records": records, "seed": seed, "num_tests": num_tests,
            "depths": depth_keys if depth_keys != ["random"] else "random"}


def _largest_fitting(count: Callable[[int], int], target: int, chars_per_token: float) -> int:
    """Largest filler size ``c`` found with ``count(c) <= target < count(c + 1)``.

    Token count grows almost linearly with the filler, so a few secant steps land near the target;
    a bracket search then settles the last characters. ``count`` is monotone up to BPE merges at
    the cut, so the result is within a token or two of the target and never above it (every
    accepted ``c`` was measured).
    """
    c = int((target - count(0)) * chars_per_token)
    for _ in range(4):  # secant steps on the measured slope
        gap = target - count(c)
        if 0 <= gap <= 2:
            break
        c = max(0, c + int(gap * chars_per_token))
    step = max(4, int(2 * chars_per_token))
    if count(c) <= target:
        lo, hi = c, c + step
        while count(hi) <= target:
            lo, hi, step = hi, hi + step, step * 2
    else:
        hi, lo = c, max(c - step, 0)
        while lo > 0 and count(lo) > target:
            hi, lo, step = lo, max(lo - step, 0), step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) <= target else (lo, mid)
    return lo


def _chars_per_token(tokenizer: Any) -> float:
    """Characters of filler per token, measured on the filler itself."""
    sample = " ".join([FILLER] * 8)
    n = len(tokenizer(sample, add_special_tokens=False, verbose=False)["input_ids"])
    return len(sample) / max(n, 1)


def _validate(lengths: Sequence[int], depths: Sequence[float] | None, num_tests: int) -> None:
    if not lengths or any(int(n) != n or n < 1 for n in lengths):
        raise ValueError(f"lengths must be a non-empty list of positive ints, got {list(lengths)}")
    if depths is not None and (not depths or any(not 0.0 <= d <= 1.0 for d in depths)):
        raise ValueError(f"depths must be fractions in [0, 1] (or None for random), got {depths}")
    if num_tests < 1:
        raise ValueError(f"num_tests must be >= 1, got {num_tests}")
