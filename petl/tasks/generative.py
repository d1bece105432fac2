"""Generative tasks with causal LMs: SFT on (instruction, document, answer) with the prompt masked,
and scoring by generation (ROUGE for summaries, accuracy for answers chosen from a fixed set).

Long documents: the document (``input``) is cut to the token budget left once the template, the
instruction and the answer are counted, so the instruction and the answer always survive
(``task.truncation_side`` picks which end of the document is kept). With ``long_document: extend``
the budget is the extended context (``model.context_length``, RoPE scaled, S2/SF attention while
training); with ``truncate`` it is ``task.max_length``. Training examples go through
:func:`petl.data.build_sft_dataset`, so the prompt/response boundary is the one petl's SFT uses,
and evaluation prompts are rendered exactly as training prompts were.
"""
from __future__ import annotations

import re
from typing import Any

import datasets
import numpy as np
import torch

from petl.data import build_sft_dataset, format_sft_prompt
from petl.data.templates import user_message
from petl.tasks.metrics import multiclass_f1, qa_metrics, rouge

_WORD = re.compile(r"[a-z0-9]+")


def cut_text(text: str, tokenizer: Any, budget: int, side: str = "right") -> str:
    """``text`` shortened to at most ``budget`` tokens, keeping its start (``right``) or end (``left``)."""
    if not text or budget <= 0:
        return ""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)["offset_mapping"]
    if len(offsets) <= budget:
        return text
    keep = offsets[:budget] if side == "right" else offsets[-budget:]
    return text[keep[0][0]:keep[-1][1]]


def _n_tokens(text: str, tokenizer: Any) -> int:
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def render_prompt(instruction: str, document: str, tokenizer: Any, template: str) -> str:
    """The prompt string training used for this record (text template or the tokenizer's chat template)."""
    if template != "chat":
        return format_sft_prompt(instruction, document or None, template=template)
    return tokenizer.apply_chat_template([{"role": "user", "content": user_message(instruction, document or None)}],
                                         tokenize=False, add_generation_prompt=True)


def _document_budget(record: dict[str, Any], tokenizer: Any, template: str, max_length: int, reserve: int) -> int:
    """Tokens left for the document once the prompt without it and ``reserve`` answer tokens are counted."""
    overhead = _n_tokens(render_prompt(record["instruction"], "x", tokenizer, template), tokenizer)
    return max(max_length - overhead - reserve - 3, max_length // 4 if record["input"] else 0)


def build_generative_train(records: datasets.Dataset, tokenizer: Any, *, max_length: int, template: str,
                           truncation_side: str = "right") -> datasets.Dataset:
    """Task-format records -> ``input_ids`` / ``labels`` (prompt masked with -100) of at most ``max_length``."""
    def fit(record: dict[str, Any]) -> dict[str, Any]:
        reserve = _n_tokens(record["output"], tokenizer) + 1
        budget = _document_budget(record, tokenizer, template, max_length, reserve)
        return {"input": cut_text(record["input"], tokenizer, budget, truncation_side)}

    fitted = records.map(fit, desc="Fitting documents into the context")
    # a summary longer than the context keeps its start (truncate="right")
    data = build_sft_dataset(fitted.select_columns(["instruction", "input", "output"]), tokenizer,
                             max_length=max_length, template=template, truncate="right", progress=False)
    if len(data) == 0:
        from petl.tasks.registry import TaskDataError

        raise TaskDataError(f"no training example keeps an answer token within task.max_length={max_length} "
                            "(the prompt template and instruction alone fill it); raise task.max_length")
    return data


def match_choice(generation: str, choices: list[str]) -> int:
    """Index of the answer choice a generation starts with (first word, case-insensitive), else -1."""
    words = _WORD.findall(generation.lower())
    lowered = [c.lower() for c in choices]
    return lowered.index(words[0]) if words and words[0] in lowered else -1


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: list[str], *, template: str, max_new_tokens: int,
             batch_size: int) -> list[str]:
    """Greedy completions of ``prompts`` (left-padded batches), special tokens dropped."""
    device = next(model.parameters()).device
    bos = [tokenizer.bos_token_id] if template != "chat" and tokenizer.bos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs = []
    for start in range(0, len(prompts), batch_size):
        rows = [bos + ids for ids in tokenizer(prompts[start:start + batch_size], add_special_tokens=False,
                                               verbose=False)["input_ids"]]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)  # [B, T]
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        outputs += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [o.strip() for o in outputs]


def evaluate_generative(model: Any, tokenizer: Any, recipe: Any, records: datasets.Dataset, labels: Any,
                        ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Generate an answer per record and score it (ROUGE, or accuracy / macro-F1 over answer choices)."""
    from petl.tasks.predict import default_max_length

    task, template = recipe.task, recipe.data.template
    max_length = default_max_length(recipe, model, tokenizer)
    prompts = []
    for record in records:
        budget = _document_budget(record, tokenizer, template, max_length, task.max_new_tokens)
        document = cut_text(record["input"], tokenizer, budget, task.truncation_side)
        prompts.append(render_prompt(record["instruction"], document, tokenizer, template))
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    use_cache, config.use_cache = config.use_cache, True
    try:
        texts = generate(model, tokenizer, prompts, template=template, max_new_tokens=task.max_new_tokens,
                         batch_size=task.eval_batch_size)
    finally:
        config.use_cache = use_cache
    references = list(records["output"])
    scores: dict[str, float] = {**rouge(texts, references), **qa_metrics(texts, [[r] for r in references])}
    preds = [{"index": i, "prediction": t, "reference": r} for i, (t, r) in enumerate(zip(texts, references))]
    choices = labels.answer_choices if labels is not None else []
    if choices:
        gold = np.asarray(records["answer"])
        picked = np.asarray([match_choice(t, choices) for t in texts])
        scores["accuracy"] = float((picked == gold).mean())
        scores["macro_f1"] = multiclass_f1(gold, picked)["macro_f1"]
        for p, g, c in zip(preds, gold, picked):
            p.update(gold=int(g), pred=int(c), correct=bool(g == c))
    return scores, preds
