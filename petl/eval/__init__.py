"""Long-context evaluation: perplexity by context length and passkey retrieval.

``perplexity`` supports the standard strided sliding window and LongLoRA's eval.py protocol;
``passkey`` is LongLoRA's passkey retrieval test with token-exact prompt lengths. Both run the model
in eval mode, without gradients, with full attention, and restore its state afterwards.
See docs/evaluation.md.
"""
from petl.eval.gsm8k import extract_final_number, gsm8k_accuracy
from petl.eval.passkey import PasskeyPrompt, passkey, passkey_prompt
from petl.eval.perplexity import perplexity
from petl.eval.tokens import load_eval_tokens
from petl.eval.windows import (
    longlora_windows,
    num_longlora_windows,
    num_sliding_windows,
    sliding_windows,
)

__all__ = [
    "PasskeyPrompt",
    "extract_final_number",
    "gsm8k_accuracy",
    "load_eval_tokens",
    "longlora_windows",
    "num_longlora_windows",
    "num_sliding_windows",
    "passkey",
    "passkey_prompt",
    "perplexity",
    "sliding_windows",
]
