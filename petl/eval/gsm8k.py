"""GSM8K accuracy: greedy generation, then exact match of the final number.

Why this protocol: PiSSA and SoKA (issue 6) report GSM8K as the share of test problems whose final
numeric answer, extracted from a greedy completion of the alpaca-templated question, equals the
reference. GSM8K references end with ``#### <number>``; models fine-tuned on MetaMathQA write
``The answer is: <number>`` instead, so the extractor takes the number after ``####`` when present
and otherwise the last number in the text. Numbers are normalised (``$``/``,`` stripped, ``-0``,
``3.50`` and ``3.`` compared as ``0``, ``3.5`` and ``3``) before comparison.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import torch

from petl.eval._runtime import input_device, progress_bar

__all__ = ["extract_final_number", "gsm8k_accuracy", "normalize_number"]

#: A signed decimal number, optionally with thousands separators and a leading $.
_NUMBER = re.compile(r"-?\$?-?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")
_ANSWER_MARK = re.compile(r"####\s*(.*)", re.DOTALL)


def normalize_number(token: str) -> str | None:
    """Canonical string of a number: ``"$1,234.50"`` -> ``"1234.5"``, ``"-0.0"`` -> ``"0"``."""
    cleaned = token.replace(",", "").replace("$", "").strip()
    negative = cleaned.startswith("-")
    cleaned = cleaned.lstrip("-").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if negative:
        value = -value
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


def extract_final_number(text: str) -> str | None:
    """The final numeric answer in ``text`` (normalised), or None when it has no number.

    The first number after ``####`` (GSM8K's convention) when the marker is present, else the last
    number anywhere in the text.

    Example:
        >>> extract_final_number("She pays 3 * $4 = $12.\\n#### 12")
        '12'
        >>> extract_final_number("The answer is: -1,250.50")
        '-1250.5'
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_final_number expects a string, got {type(text).__name__}")
    marked = _ANSWER_MARK.search(text)
    if marked is not None:
        found = _NUMBER.findall(marked.group(1))
        if found:
            return normalize_number(found[0])
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def _fields(record: Mapping[str, Any]) -> tuple[str, str]:
    for q, a in (("question", "answer"), ("query", "response"), ("instruction", "output")):
        if q in record and a in record:
            return str(record[q]), str(record[a])
    raise ValueError(f"GSM8K record needs 'question' and 'answer' fields, got {sorted(record)}; "
                     "pass openai/gsm8k rows or a jsonl with those keys")


def gsm8k_accuracy(model: torch.nn.Module, tokenizer: Any, records: Iterable[Mapping[str, Any]],
                   *, template: str = "alpaca", max_new_tokens: int = 256, batch_size: int = 8,
                   progress: bool = True) -> dict[str, Any]:
    """Exact-match accuracy of the final number of greedy completions on GSM8K-style records.

    Args:
        model (nn.Module): a transformers causal LM or peft model with ``generate``; run in eval
            mode without gradients and put back in its previous mode afterwards.
        tokenizer: its tokenizer; prompts are left-padded (``[B, T]``) so generation continues
            each prompt right after its last token.
        records: mappings with ``question`` and ``answer`` (the reference may be a full GSM8K
            solution ending in ``#### n`` or just the number).
        template (str): prompt template of :func:`petl.data.format_sft_prompt` (the one the
            model was fine-tuned with). Default: ``"alpaca"``.
        max_new_tokens (int): generation budget per problem. Default: 256.
        batch_size (int): prompts per ``generate`` call. Default: 8.
        progress (bool): show a tqdm bar. Default: True.

    Returns:
        ``{"accuracy", "correct", "total", "no_answer", "predictions": [{"question", "reference",
        "predicted", "completion", "correct"}, ...]}``.
    """
    from petl.data import format_sft_prompt

    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, "
                         f"{batch_size}")
    items = [_fields(r) for r in records]
    if not items:
        raise ValueError("no GSM8K records to score; check --data / --limit")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("tokenizer has neither pad_token_id nor eos_token_id; set one to batch")
    device = input_device(model)
    was_training = model.training
    old_side = getattr(tokenizer, "padding_side", "right")
    predictions: list[dict[str, Any]] = []
    model.eval()
    try:
        tokenizer.padding_side = "left"
        bar = progress_bar(total=len(items), desc="gsm8k", enabled=progress)
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            prompts = [format_sft_prompt(q, template=template) for q, _ in chunk]
            enc = _encode(tokenizer, prompts, pad_id)
            with torch.no_grad():
                out = model.generate(input_ids=enc["input_ids"].to(device),
                                     attention_mask=enc["attention_mask"].to(device),
                                     max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=pad_id)
            new = out[:, enc["input_ids"].shape[1]:]                         # [B, new]
            for (question, answer), ids in zip(chunk, new):
                completion = tokenizer.decode(ids, skip_special_tokens=True)
                predicted = extract_final_number(completion)
                reference = extract_final_number(answer)
                predictions.append({"question": question, "reference": reference,
                                    "predicted": predicted, "completion": completion,
                                    "correct": predicted is not None and predicted == reference})
            bar.update(len(chunk))
        bar.close()
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    correct = sum(p["correct"] for p in predictions)
    return {"accuracy": correct / len(predictions), "correct": correct, "total": len(predictions),
            "no_answer": sum(p["predicted"] is None for p in predictions),
            "predictions": predictions}


def _encode(tokenizer: Any, prompts: Sequence[str], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids`` / ``attention_mask`` ``[B, T]`` for the prompts."""
    rows = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}
