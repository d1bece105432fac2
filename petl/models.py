"""Loading base models (hub id, local directory or petl's embedded model) with optional adapters.

One function every CLI command uses, so that security defaults hold everywhere: weights are read
only from safetensors (``use_safetensors=True``), and model code from the hub runs only when the
caller sets ``trust_remote_code``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from petl.errors import PetlError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


class ModelLoadError(PetlError, RuntimeError):
    """The model, tokenizer or adapter could not be loaded; the message says why and what to do."""


def resolve_model_path(name_or_path: str) -> str:
    """Map petl's embedded-model alias to its folder; return other names unchanged."""
    if not name_or_path.startswith("petl/"):
        return name_or_path
    from petl.embedded import embedded_model_path, is_embedded

    return str(embedded_model_path()) if is_embedded(name_or_path) else name_or_path


def resolve_dtype(dtype: str | torch.dtype, device: Optional[str] = None) -> torch.dtype | str:
    """``auto`` -> bfloat16 on a bf16-capable GPU, float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        on_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        return torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is unknown; choose auto, float32, bfloat16 or float16")
    return _DTYPES[dtype]


def load_tokenizer(name_or_path: str, *, revision: Optional[str] = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load a tokenizer from {name_or_path!r} ({_first_line(exc)}); "
                             "give a hub id or a local directory with tokenizer files") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_model(name_or_path: str, *, adapter: Optional[str] = None, dtype: str | torch.dtype = "auto",
               trust_remote_code: bool = False, device: Optional[str] = None,
               rope_scaling: Optional[dict[str, Any]] = None, revision: Optional[str] = None,
               attn_implementation: str = "sdpa", quantization: str = "none",
               is_trainable: bool = False):
    """Load a causal LM and its tokenizer; apply a peft adapter when ``adapter`` is given.

    Args:
        name_or_path (str): hub id, local directory, or ``petl/shakespeare-llama``.
        adapter (str, Optional): a peft adapter directory (any method registered with peft,
            petl's included). Default: None.
        dtype: ``auto``, ``float32``, ``bfloat16``, ``float16`` or a torch dtype.
        rope_scaling (dict, Optional): ``{"target_length": int, "method": "linear"|"ntk"|"yarn"}``
            to extend the context at load time (see :func:`petl.extend_context`).
        quantization (str): ``none`` or ``4bit`` (QLoRA; needs bitsandbytes and CUDA).
    Returns:
        (model, tokenizer), the model in eval mode on ``device``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    import petl  # noqa: F401  (registers petl's attention functions and peft methods)

    path = resolve_model_path(name_or_path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = resolve_dtype(dtype, device)
    try:
        config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load a model config from {name_or_path!r} ({_first_line(exc)}); "
                             "give a hub id or a local directory holding config.json") from None
    if rope_scaling:
        from petl.attention.rope import extend_context

        extend_context(config, int(rope_scaling["target_length"]), rope_scaling.get("method", "linear"))
    elif adapter is not None:
        apply_saved_context(config, adapter)
    kwargs: dict[str, Any] = dict(config=config, revision=revision, trust_remote_code=trust_remote_code,
                                  dtype=torch_dtype, use_safetensors=True,
                                  attn_implementation=attn_implementation)
    if quantization == "4bit":
        kwargs["quantization_config"] = _four_bit_config(torch_dtype, device)
        kwargs["device_map"] = {"": device}
    try:
        if (Path(path) / "lawcat_config.json").is_file():  # a LAWCAT-linearised model (petl distill)
            from petl.linear import load_lawcat

            model = load_lawcat(path, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load model weights from {name_or_path!r} ({_first_line(exc)}); "
                             "petl reads weights only from safetensors files") from None
    if quantization != "4bit":
        model.to(device)
    if adapter is not None:
        model = apply_adapter(model, adapter, is_trainable=is_trainable)
    tokenizer = load_tokenizer(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer


def apply_saved_context(config, adapter: str) -> None:
    """Give ``config`` the RoPE scaling an adapter was trained with (``petl_model.json``).

    ``petl finetune`` records the extended context next to the adapter, so evaluating or merging
    base + adapter reproduces the trained model without repeating the extension flags.
    """
    import json

    info_file = Path(adapter) / "petl_model.json"
    if not info_file.is_file():
        return
    info = json.loads(info_file.read_text())
    if info.get("rope_parameters"):
        config.rope_parameters = dict(info["rope_parameters"])
        config.max_position_embeddings = int(info["max_position_embeddings"])


def apply_adapter(model, adapter: str, *, is_trainable: bool = False):
    """Wrap ``model`` with the peft adapter saved in ``adapter`` (a directory)."""
    from peft import PeftModel

    folder = Path(adapter)
    if not (folder / "adapter_config.json").is_file():
        raise ModelLoadError(f"{adapter!r} is not a peft adapter directory (no adapter_config.json); "
                             "pass the folder `petl finetune` wrote (its adapter/ subfolder)")
    try:
        return PeftModel.from_pretrained(model, str(folder), is_trainable=is_trainable)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"adapter {adapter!r} does not fit this base model ({_first_line(exc)}); "
                             "load it on the base model it was trained on") from None


def _four_bit_config(compute_dtype: torch.dtype, device: str):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError("model.quantization '4bit' (QLoRA) needs bitsandbytes: "
                             "pip install 'petl-toolkit[gpu]' or pip install bitsandbytes")
    if not device.startswith("cuda"):
        raise ModelLoadError("model.quantization '4bit' (QLoRA) needs a CUDA GPU; set model.quantization=none on CPU")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype if compute_dtype != torch.float32 else torch.bfloat16)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
