"""Dataset adapters: how the records of a benchmark become the fields a task head trains on.

Each task type reads one plain record format (the "task format"); an adapter converts a
benchmark's own records (from its hub id or a local copy in the same format) into it:

======================== ====================================================================
task type                task format (one record)
======================== ====================================================================
sequence_classification  ``text`` (the long document), ``text_pair`` (short second text or ""),
                         ``label`` (class id or name) or ``labels`` (list, multi-label)
multiple_choice          ``context``, ``question`` (either may be ""), ``choices`` (list), ``label``
extractive_qa            ``id``, ``question``, ``context``, ``answers`` {``text``: [...],
                         ``answer_start``: [...]} (SQuAD; empty lists = no answer)
generative               ``instruction``, ``input`` (the document, may be ""), ``output``, and
                         ``answer`` (index into the adapter's answer choices, -1 when free text)
======================== ====================================================================

``task.dataset: null`` reads files already in the task format. The adapters themselves live in
:mod:`petl.tasks.legal` and :mod:`petl.tasks.clinical`; docs/tasks.md lists them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from petl.errors import PetlError
from petl.train.schema_types import RecipeError

Converter = Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]


class TaskDataError(PetlError, ValueError):
    """Task data that cannot be read as asked; the message names fields, indices and files, never values."""


@dataclass(frozen=True)
class DatasetAdapter:
    """One benchmark's reading rules.

    name: registry key used in ``task.dataset`` (e.g. ``lexglue/ecthr_a``).
    converters: task type -> function(raw record, options) -> task-format record.
    hub_id, config_name: where the data lives on the Hugging Face Hub (None: local files only).
    label_names / num_labels: the label set (names may instead come from ``label_feature``'s
        ClassLabel when the data is read from the hub).
    multi_label, none_class: multi-label task; LexGLUE's extra "no label" class when scoring.
    metrics: task type -> the benchmark's metrics, headline first.
    answer_choices: for generative QA: the answers a generation is matched against (accuracy).
    loader: custom reader(source, split, options, max_samples) for formats ``datasets`` cannot
        read (XML folders, joined CSV tables) or sets that carry their own split column.
    options: allowed ``task.options`` keys and their defaults.
    credentialed: data needs a data-use agreement; only local copies are read.
    """

    name: str
    description: str
    converters: dict[str, Converter]
    hub_id: Optional[str] = None
    config_name: Optional[str] = None
    label_names: tuple[str, ...] = ()
    num_labels: Optional[int] = None
    label_feature: Optional[str] = None
    multi_label: bool = False
    none_class: bool = False
    metrics: dict[str, tuple[str, ...]] = field(default_factory=dict)
    answer_choices: tuple[str, ...] = ()
    loader: Optional[Callable[..., Any]] = None
    options: dict[str, Any] = field(default_factory=dict)
    credentialed: bool = False

    def resolve_options(self, given: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            allowed = ", ".join(sorted(self.options)) or "none"
            raise RecipeError(f"recipe key 'task.options.{unknown[0]}' is unknown for dataset {self.name!r}; "
                              f"allowed: {allowed}")
        return {**self.options, **given}


def _require(record: dict[str, Any], *keys: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        # names the fields only: a record's values may be protected health information
        raise TaskDataError(f"record has no field {missing[0]!r} (fields: {sorted(record)}); convert the data to "
                         "the task format in docs/tasks.md or set task.dataset")


def _plain_classification(record: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    _require(record, "text")
    out = {"text": str(record["text"] or ""), "text_pair": str(record.get("text_pair") or "")}
    if "labels" in record and isinstance(record["labels"], (list, tuple)):
        out["labels"] = list(record["labels"])
    else:
        _require(record, "label")
        out["label"] = record["label"]
    return out


def _plain_multiple_choice(record: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    _require(record, "choices", "label")
    return {"context": str(record.get("context") or ""), "question": str(record.get("question") or ""),
            "choices": [str(c) for c in record["choices"]], "label": int(record["label"])}


def _plain_qa(record: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    _require(record, "question", "context", "answers")
    answers = record["answers"] or {"text": [], "answer_start": []}
    return {"id": str(record.get("id", "")), "question": str(record["question"]), "context": str(record["context"]),
            "answers": {"text": list(answers["text"]), "answer_start": [int(a) for a in answers["answer_start"]]}}


def _plain_generative(record: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    _require(record, "instruction", "output")
    return {"instruction": str(record["instruction"]), "input": str(record.get("input") or ""),
            "output": str(record["output"]), "answer": int(record.get("answer", -1))}


#: readers of the plain task formats (task.dataset: null)
PLAIN: dict[str, DatasetAdapter] = {
    task: DatasetAdapter(name=f"plain/{task}", description=f"local files already in the {task} task format",
                         converters={task: fn})
    for task, fn in (("sequence_classification", _plain_classification),
                     ("multiple_choice", _plain_multiple_choice),
                     ("extractive_qa", _plain_qa), ("generative", _plain_generative))
}


def adapters() -> dict[str, DatasetAdapter]:
    """All named dataset adapters, by registry key."""
    from petl.tasks.clinical import CLINICAL
    from petl.tasks.legal import LEGAL

    found: dict[str, DatasetAdapter] = {}
    for adapter in (*LEGAL, *CLINICAL):
        if adapter.name in found:
            raise RuntimeError(f"dataset adapter {adapter.name!r} is registered twice")
        found[adapter.name] = adapter
    return found


def check_dataset(name: str, task_type: str) -> DatasetAdapter:
    """The adapter ``name`` for ``task_type``, or a one-line RecipeError naming what is allowed."""
    known = adapters()
    if name not in known:
        raise RecipeError(f"recipe key 'task.dataset' has value {name!r}; choose one of: {', '.join(known)} "
                          "(or null for files in the task format)")
    adapter = known[name]
    if task_type not in adapter.converters:
        raise RecipeError(f"recipe key 'task.dataset' = {name!r} does not provide task.type {task_type!r}; "
                          f"it provides: {', '.join(adapter.converters)}")
    return adapter


def get_adapter(name: Optional[str], task_type: str) -> DatasetAdapter:
    """The named adapter, or the plain task-format reader when ``name`` is None."""
    return PLAIN[task_type] if name is None else check_dataset(name, task_type)
