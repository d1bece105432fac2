"""Merging an adapter into its base model so plain transformers can load the result."""
from __future__ import annotations

from pathlib import Path


def merge_adapter(model, tokenizer, out_dir: str | Path) -> Path:
    """Merge a ``PeftModel``'s active adapter into a copy-free plain model and save it (safetensors).

    The merged folder loads with ``AutoModelForCausalLM.from_pretrained`` alone: its config keeps
    the RoPE scaling the adapter was trained with, and modules trained in full (LoRA+ embeddings
    and norms) are written in place of the originals.
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise ValueError("merge needs a model with a peft adapter; load it with petl.models.load_model(..., adapter=DIR)")
    merged = model.merge_and_unload()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The training-time attention pattern is not part of the merged model: it runs with full attention.
    if getattr(merged.config, "_attn_implementation", None) not in (None, "sdpa", "eager"):
        merged.set_attn_implementation("sdpa")
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return out_dir


def base_model_of(adapter: str | Path) -> str:
    """The base model an adapter folder was trained on (petl_model.json, else peft's config)."""
    import json

    folder = Path(adapter)
    for name, key in (("petl_model.json", "base_model"), ("adapter_config.json", "base_model_name_or_path")):
        path = folder / name
        if path.is_file():
            value = json.loads(path.read_text()).get(key)
            if value:
                return value
    raise ValueError(f"cannot tell the base model of {str(folder)!r}; pass --model NAME_OR_PATH")
