"""Supervised fine-tuning (SFT) examples: prompt tokens masked out of the loss, response tokens trained.

Each record (instruction, optional input, output) becomes::

    input_ids = [BOS] + tokens(prompt) + tokens(output) + [EOS]      # text templates
    labels    = [-100] * (1 + len(tokens(prompt))) + tokens(output) + [EOS]

Prompt and response are tokenized separately (``add_special_tokens=False``) and concatenated, so the
mask boundary is exact. LongLoRA tokenizes the joined string and masks as many tokens as the prompt
alone has, which can be off by one where a tokenizer merges across the boundary. BOS is added only
if the tokenizer has one (Llama does, Qwen2 does not); EOS is required, so the model learns to stop.
For ``template="chat"`` the chat template supplies all special tokens itself; see `build_sft_dataset`.
"""
from __future__ import annotations

import logging
from typing import Literal

import datasets
import numpy as np

from petl.data._utils import IGNORE_INDEX, check_positive_int, progress_bars, require_column
from petl.data.templates import check_template, format_sft_prompt, user_message

logger = logging.getLogger(__name__)

_BATCH = 1000


def build_sft_dataset(
    dataset: datasets.Dataset,
    tokenizer,
    *,
    max_length: int,
    template: str = "longalpaca",
    instruction_field: str = "instruction",
    input_field: str = "input",
    output_field: str = "output",
    truncate: Literal["left", "right", "error"] = "left",
    system_prompt: str | None = None,
    num_proc: int | None = None,
    progress: bool = True,
) -> datasets.Dataset:
    """Tokenize instruction records into ``input_ids`` / ``labels`` with the prompt masked (-100).

    Args:
        dataset (Dataset): records with string columns `instruction_field` and `output_field`, and
            optionally `input_field` (a missing column or a None/"" value means no input).
        tokenizer (PreTrainedTokenizerBase): the model's tokenizer; needs an EOS token for the text
            templates and a ``chat_template`` for ``template="chat"``.
        max_length (int): the most tokens an example may have (the training context length).
        template (str, Optional): ``"longalpaca"`` (LongLoRA's Llama-2 ``[INST]`` format),
            ``"alpaca"``, ``"raw"`` or ``"chat"``; the exact strings are in `petl.data.templates`.
            Default: ``"longalpaca"``.
        instruction_field, input_field, output_field (str, Optional): column names.
            Defaults: ``"instruction"``, ``"input"``, ``"output"``.
        truncate (str, Optional): what to do with an example longer than `max_length`:
            ``"left"`` keeps its last tokens (the end of a long document, the question and the
            answer), keeping a leading BOS in front; ``"right"`` keeps its first `max_length`
            tokens, as LongLoRA does (examples whose response is cut away entirely are dropped, with
            a warning, because they would add no loss); ``"error"`` raises, naming the record.
            Default: ``"left"``.
        system_prompt (str, Optional): system message for ``template="chat"``. Default: None.
        num_proc (int, Optional): tokenization worker processes. Default: None (one process).
        progress (bool, Optional): show datasets' progress bar. Default: True.

    Returns:
        Dataset with columns ``input_ids`` and ``labels`` (``-100`` on prompt tokens), one row per
        record kept, in the input order; rows have different lengths (pad them with
        `DataCollatorForCausalLM`).

    Example:
        >>> sft = build_sft_dataset(load_text_dataset("LongAlpaca-12k.json", text_field=None),
        ...                         tok, max_length=16384)
    """
    check_positive_int(max_length, "max_length")
    check_template(template)
    if truncate not in ("left", "right", "error"):
        raise ValueError(f"truncate must be 'left', 'right' or 'error', got {truncate!r}.")
    if isinstance(dataset, datasets.IterableDataset):
        raise TypeError("build_sft_dataset needs a map-style Dataset; load it with streaming=False.")
    require_column(dataset, instruction_field, arg="instruction_field")
    require_column(dataset, output_field, arg="output_field")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("template='chat' needs a tokenizer with a chat_template; set tokenizer.chat_template "
                         "or use template='longalpaca' / 'alpaca'.")
    if template != "chat" and tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token (SFT responses end with it).")
    fields = (instruction_field, input_field if input_field in dataset.column_names else None, output_field)
    kwargs = {"tokenizer": tokenizer, "fields": fields, "template": template, "max_length": max_length,
              "truncate": truncate, "system_prompt": system_prompt}
    with progress_bars(progress):
        out = dataset.map(_tokenize_batch, batched=True, batch_size=_BATCH, with_indices=True,
                          remove_columns=dataset.column_names, num_proc=num_proc, fn_kwargs=kwargs,
                          features=datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                                      "labels": datasets.Sequence(datasets.Value("int32"))}),
                          desc=f"Tokenizing SFT records ({template})")
    dropped = len(dataset) - len(out)
    if dropped:
        logger.warning("build_sft_dataset: dropped %d of %d records with no response token left within "
                       "max_length=%d (truncate=%r).", dropped, len(dataset), max_length, truncate)
    return out


def _texts(record: dict, fields: tuple, template: str, tokenizer, system_prompt: str | None,
           index: int) -> tuple[str, str]:
    """(prompt, response) strings of one record."""
    instruction_field, input_field, output_field = fields
    instruction, output = record[instruction_field], record[output_field]
    for name, value in ((instruction_field, instruction), (output_field, output)):
        if not isinstance(value, str):
            raise TypeError(f"record {index}: field {name!r} is {type(value).__name__}, not str; "
                            "drop or fill such records first (e.g. dataset.filter).")
    extra = record[input_field] if input_field is not None else None
    if template != "chat":
        return format_sft_prompt(instruction, extra, template=template), output
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    messages.append({"role": "user", "content": user_message(instruction, extra)})
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": output}], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the tokenizer's chat template renders the conversation without the generation prompt "
                         "as its prefix, so prompt and response cannot be separated; use a text template.")
    return prompt, full[len(prompt):]


def _tokenize_batch(batch: dict, indices: list[int], *, tokenizer, fields: tuple, template: str,
                    max_length: int, truncate: str, system_prompt: str | None) -> dict:
    names = list(batch)
    records = [{k: batch[k][i] for k in names} for i in range(len(indices))]
    pairs = [_texts(r, fields, template, tokenizer, system_prompt, idx) for r, idx in zip(records, indices)]
    prompts = _encode([p for p, _ in pairs], tokenizer)
    responses = _encode([r for _, r in pairs], tokenizer)
    text_template = template != "chat"
    bos = [tokenizer.bos_token_id] if text_template and tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if text_template else []
    out: dict[str, list] = {"input_ids": [], "labels": []}
    for idx, prompt, response in zip(indices, prompts, responses):
        ids = np.asarray(bos + list(prompt) + list(response) + eos, dtype=np.int32)
        labels = ids.copy()
        labels[: len(bos) + len(prompt)] = IGNORE_INDEX
        if len(ids) > max_length:
            ids, labels = _truncate(ids, labels, max_length, truncate, tokenizer.bos_token_id, idx)
        if (labels != IGNORE_INDEX).any():
            out["input_ids"].append(ids)
            out["labels"].append(labels)
    return out


def _encode(texts: list[str], tokenizer) -> list[list[int]]:
    """Token ids without the tokenizer's own special tokens (templates and this module place them)."""
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


def _truncate(ids: np.ndarray, labels: np.ndarray, max_length: int, mode: str, bos_id: int | None,
              index: int) -> tuple[np.ndarray, np.ndarray]:
    """Shorten one example to max_length tokens. ids, labels: [L] -> [max_length]."""
    if mode == "error":
        raise ValueError(f"record {index} has {len(ids)} tokens > max_length={max_length}; raise max_length "
                         "or pass truncate='left' / 'right'.")
    if mode == "right":
        return ids[:max_length], labels[:max_length]
    keep_bos = bos_id is not None and ids[0] == bos_id and max_length > 1
    head = 1 if keep_bos else 0
    tail = slice(len(ids) - (max_length - head), len(ids))
    return (np.concatenate([ids[:head], ids[tail]]), np.concatenate([labels[:head], labels[tail]]))
