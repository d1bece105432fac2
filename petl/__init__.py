"""petl: parameter-efficient fine-tuning for long-context and domain adaptation.

Importing petl registers its attention patterns with transformers (AttentionInterface and
AttentionMaskInterface) and its adapter methods with peft, so that ``get_peft_model``,
``PeftModel.from_pretrained`` and ``attn_implementation="petl_s2"`` work afterwards.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0.dev0"

# name -> module that defines it; resolved on first access so `import petl` stays light where
# possible, while the registering modules below are imported eagerly.
_LAZY = {
    "load_recipe": "petl.train.recipe_io",
    "run_recipe": "petl.train.runner",
    "Recipe": "petl.train.recipe",
    "RecipeError": "petl.train.schema_types",
    "extend_context": "petl.attention.rope",
    "load_model": "petl.models",
    "merge_adapter": "petl.merge",
    "lora_config": "petl.adapters.lora",
    "use_attention": "petl.attention",
    "H2OCache": "petl.cache",
    "enable_h2o": "petl.cache",
    "LawcatConfig": "petl.linear",
    "convert_to_lawcat": "petl.linear",
    "save_lawcat": "petl.linear",
    "load_lawcat": "petl.linear",
    "LawcatCache": "petl.linear",
    "run_distill": "petl.distill.runner",
    "load_distilled": "petl.distill.outputs",
    "fuse_lora": "petl.kernels.fuse",
    "unfuse_lora": "petl.kernels.fuse",
}

__all__ = sorted(_LAZY) + ["__version__"]

# Registration with transformers (attention + mask functions) and peft (adapter methods) must
# happen on `import petl`, so these modules are imported eagerly.
import petl.attention  # noqa: E402,F401
from petl.adapters.audio import AudioAdapterConfig  # noqa: E402
from petl.adapters.soka import SokaConfig  # noqa: E402

__all__ = sorted(__all__ + ["AudioAdapterConfig", "SokaConfig"])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'petl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
