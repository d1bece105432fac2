"""petl.data: load text, pack it for causal-LM training, build masked SFT examples, and collate batches.

Plain functions with keyword arguments, built on `datasets`; see docs/data.md.
"""
from petl.data._utils import IGNORE_INDEX
from petl.data.collator import DataCollatorForCausalLM
from petl.data.loading import load_text_dataset
from petl.data.packing import pack_for_causal_lm
from petl.data.sft import build_sft_dataset
from petl.data.templates import LLAMA2_SYSTEM_PROMPT, TEMPLATES, format_sft_prompt

__all__ = [
    "IGNORE_INDEX",
    "LLAMA2_SYSTEM_PROMPT",
    "TEMPLATES",
    "DataCollatorForCausalLM",
    "build_sft_dataset",
    "format_sft_prompt",
    "load_text_dataset",
    "pack_for_causal_lm",
]
