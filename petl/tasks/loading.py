"""Read a task recipe's training or evaluation data: adapter -> task format -> label ids -> de-identified.

The order matters for clinical data: de-identification runs on the task-format text before any
tokenizer sees it, and no function here echoes a record's content (errors name fields and indices).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

import datasets

from petl.tasks.registry import DatasetAdapter, TaskDataError, get_adapter
from petl.train.schema_types import RecipeError

#: DataSection.source's default; a task recipe that leaves it unchanged reads the adapter's hub id
DEFAULT_SOURCE = "petl:shakespeare-train"
_TEXT_FIELDS = {"sequence_classification": ("text", "text_pair"), "multiple_choice": ("context", "question", "choices"),
                "extractive_qa": ("context", "question"), "generative": ("instruction", "input", "output")}


@dataclass
class LabelSpace:
    """The label set of a classification run (saved next to the adapter as ``petl_task.json``)."""

    names: list[str]
    multi_label: bool = False
    none_class: bool = False
    answer_choices: list[str] = field(default_factory=list)

    @property
    def num_labels(self) -> int:
        return len(self.names)


def resolve_source(recipe: Any, adapter: DatasetAdapter, which: str) -> tuple[str, str]:
    """(source, split) to read for ``which`` in ("train", "eval")."""
    task, data = recipe.task, recipe.data
    source = data.source
    if source == DEFAULT_SOURCE:
        if adapter.hub_id is None:
            hint = " (credentialed: download it under its data-use agreement)" if adapter.credentialed else ""
            raise RecipeError(f"dataset {adapter.name!r} has no hub copy{hint}; set data.source to your local "
                              "file or folder (formats in docs/tasks.md)")
        source = adapter.hub_id
    if which == "train":
        return source, data.split
    if task.eval_source:
        return task.eval_source, task.eval_split or data.split
    local = os.path.exists(os.path.expanduser(source)) and adapter.loader is None
    if local and "[" not in (task.eval_split or ""):
        raise RecipeError(f"data.source {source!r} is a local file, so task.eval_split {task.eval_split!r} would "
                          "score the training records; set task.eval_source=FILE, or slice both splits "
                          "(data.split=train[:80%] task.eval_split=train[80%:])")
    return source, task.eval_split


def read_raw(recipe: Any, adapter: DatasetAdapter, source: str, split: str, max_samples: Optional[int]):
    """The benchmark's own records (before conversion)."""
    options = adapter.resolve_options(recipe.task.options)
    if adapter.loader is not None:
        return adapter.loader(source, split, options=options, max_samples=max_samples)
    from petl.data import load_text_dataset

    config = recipe.data.config_name or adapter.config_name
    data_files = recipe.data.data_files if source == recipe.data.source else None
    return load_text_dataset(source, split=split, text_field=None, name=config, data_files=data_files,
                             max_samples=max_samples, trust_remote_code=recipe.model.trust_remote_code)


def _feature_names(raw: datasets.Dataset, column: Optional[str]) -> list[str]:
    for name in ([column] if column else ["label", "labels"]):
        feature = raw.features.get(name) if name else None
        feature = getattr(feature, "feature", feature)  # Sequence(ClassLabel) / List(ClassLabel)
        if isinstance(feature, datasets.ClassLabel):
            return list(feature.names)
    return []


def resolve_labels(recipe: Any, adapter: DatasetAdapter, raw: datasets.Dataset, converted: datasets.Dataset,
                   ) -> LabelSpace:
    """Label names from the recipe, the adapter, the data's ClassLabel feature, or the data itself."""
    task = recipe.task
    multi = task.multi_label
    if multi is None:
        multi = adapter.multi_label or "labels" in converted.column_names
    names = list(task.label_names) or list(adapter.label_names) or _feature_names(raw, adapter.label_feature)
    if not names and recipe.task.type == "sequence_classification":
        column = converted["labels"] if multi else converted["label"]
        values = [v for row in column for v in (row if multi else [row])]
        strings = sorted({v for v in values if isinstance(v, str)})
        count = task.num_labels or adapter.num_labels or (max((int(v) for v in values), default=-1) + 1)
        names = strings or [str(i) for i in range(count)]
    if task.num_labels and len(names) != task.num_labels:
        raise RecipeError(f"recipe key 'task.num_labels' is {task.num_labels} but the data set has {len(names)} "
                          f"labels; drop task.num_labels or list task.label_names")
    none_class = task.none_class if task.none_class is not None else adapter.none_class
    return LabelSpace(names=names, multi_label=bool(multi), none_class=bool(none_class),
                      answer_choices=list(adapter.answer_choices))


def _label_ids(record: dict[str, Any], index: dict[str, int], num_labels: int, multi: bool) -> dict[str, Any]:
    values = record["labels"] if multi else [record["label"]]
    ids = []
    for value in values:
        i = index.get(value) if isinstance(value, str) else int(value)
        if i is None or not 0 <= i < num_labels:
            raise TaskDataError(f"label {value!r} is not one of the {num_labels} labels of this run; "
                             "list every label in task.label_names")
        ids.append(i)
    return {"labels": ids if multi else ids[0]}


def encode_labels(dataset: datasets.Dataset, labels: LabelSpace) -> datasets.Dataset:
    """Replace ``label`` / ``labels`` with integer ids in a ``labels`` column."""
    index = {name: i for i, name in enumerate(labels.names)}
    drop = [c for c in ("label",) if c in dataset.column_names]
    if labels.multi_label and "labels" not in dataset.column_names:
        raise TaskDataError("task.multi_label is true but the records carry a single 'label'; give 'labels' lists")
    return dataset.map(_label_ids, fn_kwargs={"index": index, "num_labels": labels.num_labels,
                                              "multi": labels.multi_label},
                       remove_columns=drop, desc="Encoding labels")


def deidentify_dataset(dataset: datasets.Dataset, task_type: str, names_file: Optional[str]) -> datasets.Dataset:
    """Run :class:`~petl.tasks.deid.Deidentifier` over the task format's text fields."""
    from petl.tasks.deid import Deidentifier, load_names

    deid = Deidentifier(names=load_names(names_file) if names_file else ())

    def clean(record: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key in _TEXT_FIELDS[task_type]:
            value = record[key]
            out[key] = [deid(v) for v in value] if isinstance(value, list) else deid(value)
        if task_type == "extractive_qa":
            answers = record["answers"]
            spans = [(s, s + len(t)) for s, t in zip(answers["answer_start"], answers["text"])]
            context, new = deid.deidentify_span_text(record["context"], spans)
            out["context"] = context
            out["answers"] = {"text": [context[a:b] for a, b in new], "answer_start": [a for a, _ in new]}
        return out

    return dataset.map(clean, desc="De-identifying")


def load_task_split(recipe: Any, which: str, labels: Optional[LabelSpace] = None,
                    ) -> tuple[datasets.Dataset, Optional[LabelSpace]]:
    """Records of the training (``which="train"``) or evaluation split in the task format.

    Classification labels become ids (``labels``); the label space is resolved from the training
    split and must be passed in for the evaluation split. Returns (dataset, label space or None).
    """
    task = recipe.task
    adapter = get_adapter(task.dataset, task.type)
    source, split = resolve_source(recipe, adapter, which)
    limit = recipe.data.max_samples if which == "train" else task.max_eval_samples
    raw = read_raw(recipe, adapter, source, split, limit)
    options = adapter.resolve_options(task.options)
    converter = adapter.converters[task.type]
    converted = raw.map(converter, fn_kwargs={"options": options}, remove_columns=raw.column_names,
                        desc=f"Reading {adapter.name}")
    if task.type == "sequence_classification":
        labels = labels or resolve_labels(recipe, adapter, raw, converted)
        converted = encode_labels(converted, labels)
    elif labels is None:
        labels = LabelSpace(names=[], answer_choices=list(adapter.answer_choices))
    if task.deidentify:
        converted = deidentify_dataset(converted, task.type, task.deid_names_file)
    if len(converted) == 0:
        raise RecipeError(f"the {which} split of {source!r} ({split}) holds no records; check data.source / "
                          "task.eval_split")
    return converted, labels

