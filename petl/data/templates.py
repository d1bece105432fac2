"""Prompt templates for instruction (SFT) records: instruction, optional input, output.

A template turns a record into a *prompt* string; the *response* is the record's output followed by
the tokenizer's EOS token id. `build_sft_dataset` tokenizes the two separately, so the boundary
between masked prompt tokens and trained response tokens is exact (no merge across it).

Templates, written as Python string literals (adjacent literals join; ``{instruction}`` and
``{input}`` stand for the record's fields):

``"longalpaca"`` (LongLoRA's supervised-fine-tune.py for LongAlpaca), without input::

    "[INST]{instruction}[/INST]"

  with input (``LLAMA2_SYSTEM_PROMPT`` below)::

    "[INST] <<SYS>>\\n" LLAMA2_SYSTEM_PROMPT "\\n<</SYS>> \\n\\n {instruction} \\n{input} [/INST]"

``"alpaca"`` (Stanford Alpaca), without input::

    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\\n\\n"
    "### Instruction:\\n{instruction}\\n\\n### Response:"

  with input::

    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\\n\\n"
    "### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:"

``"raw"`` (LongLoRA's first release): ``"{instruction}"``, or ``"{instruction}\\n{input}"`` with input.

``"chat"``: the tokenizer's own chat template applied to one user message holding the ``"raw"`` text
(after an optional system message); the response is everything the template appends for the
assistant message, its end-of-turn token included (see `build_sft_dataset`).

An input counts as present when it is a non-empty string (LongLoRA's rule).
"""
from __future__ import annotations

TEMPLATES = ("longalpaca", "alpaca", "raw", "chat")

LLAMA2_SYSTEM_PROMPT = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
    "safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or "
    "illegal content. Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
)
"""Llama-2-chat's default system prompt (two spaces after "safe." as in the original)."""

_ALPACA_HEAD = "Below is an instruction that describes a task"
_ALPACA_ASK = "Write a response that appropriately completes the request.\n\n"


def check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise ValueError(f"unknown SFT template {template!r}; choose one of {list(TEMPLATES)}.")


def format_sft_prompt(instruction: str, input: str | None = None, *, template: str = "longalpaca") -> str:
    """The prompt string of one record for a text template (not ``"chat"``, which needs a tokenizer).

    Use it at inference to prompt a model fine-tuned with `build_sft_dataset` the same way.

    Example:
        >>> format_sft_prompt("Summarise the paper.", template="longalpaca")
        '[INST]Summarise the paper.[/INST]'
    """
    check_template(template)
    if template == "chat":
        raise ValueError("template='chat' is rendered by the tokenizer; call "
                         "tokenizer.apply_chat_template(...) instead of format_sft_prompt.")
    has_input = isinstance(input, str) and input != ""
    if template == "longalpaca":
        if not has_input:
            return f"[INST]{instruction}[/INST]"
        return f"[INST] <<SYS>>\n{LLAMA2_SYSTEM_PROMPT}\n<</SYS>> \n\n {instruction} \n{input} [/INST]"
    if template == "alpaca":
        if not has_input:
            return f"{_ALPACA_HEAD}. {_ALPACA_ASK}### Instruction:\n{instruction}\n\n### Response:"
        return (f"{_ALPACA_HEAD}, paired with an input that provides further context. {_ALPACA_ASK}"
                f"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
    return f"{instruction}\n{input}" if has_input else instruction  # raw


def user_message(instruction: str, input: str | None) -> str:
    """The user turn for ``template="chat"``: instruction, then the input on a new line when present."""
    return format_sft_prompt(instruction, input, template="raw")
