"""petl's embedded base model: a small Llama trained from scratch on Shakespeare, shipped as data.

The quickstart and the tests need a real, trained causal LM that loads without a network. This
module only says where its files are; the model itself is an ordinary transformers checkpoint
(``LlamaForCausalLM`` + a byte-level BPE tokenizer), built by ``tools/train_embedded_model.py``
and described in ``petl/assets/shakespeare_llama/README.md``.

Recipes name it with the alias :data:`EMBEDDED_MODEL_NAME`; the model loader turns the alias into
:func:`embedded_model_path`, which works for both ``pip install .`` and ``pip install -e .``
because the files are package data next to this module.

Example::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from petl.embedded import embedded_model_path
    model = AutoModelForCausalLM.from_pretrained(embedded_model_path(), dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

__all__ = ["EMBEDDED_MODEL_NAME", "EMBEDDED_NATIVE_CONTEXT", "embedded_model_path",
           "heldout_text_path", "is_embedded", "resolve_model_name", "train_text_path"]

#: Alias usable wherever a hub id or a local model folder is accepted (recipes, CLI, Python).
EMBEDDED_MODEL_NAME = "petl/shakespeare-llama"
#: Context length the embedded model was trained at (``max_position_embeddings``).
EMBEDDED_NATIVE_CONTEXT = 256

_ASSET_DIR = "shakespeare_llama"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _asset_dir() -> Path:
    """The installed asset folder as a real filesystem path.

    ``importlib.resources.files`` resolves the package location for regular and editable
    installs; petl is never imported from a zip, so the Traversable is a plain directory.
    """
    return Path(str(resources.files("petl.assets").joinpath(_ASSET_DIR)))


def _asset_file(name: str) -> Path:
    path = _asset_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"embedded model file {path} is missing; reinstall petl-toolkit "
                                "(`pip install .`) so its package data is installed")
    return path


def embedded_model_path() -> Path:
    """Folder of the embedded model, loadable with ``AutoModelForCausalLM.from_pretrained``."""
    for name in _REQUIRED_FILES:
        _asset_file(name)
    return _asset_dir()


def heldout_text_path() -> Path:
    """Held-out plays (Hamlet, Twelfth Night, The Tempest) never seen in training; ~135k tokens."""
    return _asset_file("heldout.txt")


def train_text_path() -> Path:
    """Four training plays (~164k tokens), each longer than 1024 tokens, for CPU fine-tuning."""
    return _asset_file("train_sample.txt")


def is_embedded(name_or_path: str | os.PathLike | None) -> bool:
    """True for the alias :data:`EMBEDDED_MODEL_NAME` or a path to the embedded model folder."""
    if name_or_path is None:
        return False
    if str(name_or_path) == EMBEDDED_MODEL_NAME:
        return True
    try:
        return Path(name_or_path).expanduser().resolve() == _asset_dir().resolve()
    except (OSError, RuntimeError, ValueError):
        return False


def resolve_model_name(name_or_path: str | os.PathLike) -> str:
    """Map the alias to the embedded model folder; return anything else unchanged (as ``str``)."""
    return str(embedded_model_path()) if is_embedded(name_or_path) else str(name_or_path)
