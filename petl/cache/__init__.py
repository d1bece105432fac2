"""H2O heavy-hitter KV cache for transformers ``model.generate``.

    from petl.cache import H2OCache, enable_h2o
    enable_h2o(model)
    model.generate(**inputs, past_key_values=H2OCache(heavy=64, recent=448), max_new_tokens=128)

Importing this package registers the ``petl_h2o`` attention and mask functions.
"""
from petl.cache.attention import ATTENTION_NAME, h2o_attention_forward
from petl.cache.budget import H2OBudget
from petl.cache.enable import disable_h2o, enable_h2o, h2o_enabled, register_h2o_attention
from petl.cache.h2o import H2OCache, generate_cache_kwargs
from petl.cache.layer import H2OLayer, select_kept

register_h2o_attention()

__all__ = [
    "ATTENTION_NAME",
    "H2OBudget",
    "H2OCache",
    "H2OLayer",
    "disable_h2o",
    "enable_h2o",
    "generate_cache_kwargs",
    "h2o_attention_forward",
    "h2o_enabled",
    "register_h2o_attention",
    "select_kept",
]
