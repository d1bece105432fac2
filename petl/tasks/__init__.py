"""Task heads, long-document strategies, dataset adapters and metrics for legal and clinical fine-tuning.

Imported by the recipe schema (``petl.tasks.section``), so this package stays light: everything
else loads on first use. See docs/tasks.md.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "run_task_recipe": "petl.tasks.runner",
    "evaluate_run": "petl.tasks.runner",
    "evaluate_task": "petl.tasks.predict",
    "load_task_split": "petl.tasks.loading",
    "adapters": "petl.tasks.registry",
    "Deidentifier": "petl.tasks.deid",
    "section_spans": "petl.tasks.splitting",
    "encode_document": "petl.tasks.chunking",
    "aggregate_chunk_logits": "petl.tasks.aggregate",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'petl.tasks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
