"""LAWCAT: linearise a pretrained transformer's attention (conv across tokens + normalised GLA).

Typical use::

    from petl.linear import LawcatConfig, convert_to_lawcat, save_lawcat, load_lawcat
    model = convert_to_lawcat(model, LawcatConfig())       # all layers
    ...  # stage 1: petl.distill.AttentionTransferTrainer; stage 2: peft LoRA on q/k/v/o
    save_lawcat(model, "out/")
    model = load_lawcat("out/")
    model.generate(input_ids, max_new_tokens=64)           # O(1) state per converted layer

See docs/lawcat.md for the maths and the choices petl makes where the paper is silent.
"""
from .attention import LawcatAttention
from .cache import LawcatCache, LawcatCacheLayer, lawcat_cache_layer
from .chunked import chunked_gla
from .config import LawcatConfig
from .convert import (
    convert_to_lawcat,
    get_lawcat_config,
    lawcat_layers,
    lawcat_parameters,
    load_lawcat,
    mark_only_lawcat_trainable,
    save_lawcat,
)
from .naive import naive_recurrent_gla, naive_recurrent_lawcat
from .ops import fla_available, gla, resolve_backend

__all__ = [
    "LawcatAttention",
    "LawcatCache",
    "LawcatCacheLayer",
    "LawcatConfig",
    "chunked_gla",
    "convert_to_lawcat",
    "fla_available",
    "get_lawcat_config",
    "gla",
    "lawcat_cache_layer",
    "lawcat_layers",
    "lawcat_parameters",
    "load_lawcat",
    "mark_only_lawcat_trainable",
    "naive_recurrent_gla",
    "naive_recurrent_lawcat",
    "resolve_backend",
    "save_lawcat",
]
