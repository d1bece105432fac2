"""Training-time attention patterns for long-context fine-tuning (S2-Attn, SF-Attn).

Importing this package registers ``petl_s2`` and ``petl_sf`` with transformers (attention
function and mask function), so ``from_pretrained(..., attn_implementation="petl_s2")`` works;
:func:`use_attention` switches an already loaded model (or PeftModel) and sets parameters. The
patterns apply only in ``train()`` mode: ``eval()`` and cached decoding run SDPA.
"""
from petl.attention.dispatch import ENV_BACKEND, sparse_attention
from petl.attention.patterns import PatternConfig
from petl.attention.switch import IMPLEMENTATIONS, active_pattern, register, use_attention

register()

__all__ = ["ENV_BACKEND", "IMPLEMENTATIONS", "PatternConfig", "active_pattern", "register", "sparse_attention",
           "use_attention"]
