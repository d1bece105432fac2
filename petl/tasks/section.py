"""The recipe's ``task`` section: what is trained on top of the base model.

``causal_lm`` (the default) is next-token training through ``petl.train.runner``; the other task
types (classification, multiple choice, extractive QA, generative SFT with task metrics, audio
classification) are run by their own runners, chosen in :func:`petl.train.runner.run_recipe`.
The fields below configure the legal / clinical task runner (:mod:`petl.tasks.runner`); they are
ignored by ``causal_lm`` and ``audio_classification``. See docs/tasks.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from petl.train.schema_types import RecipeError

TaskType = Literal["causal_lm", "sequence_classification", "multiple_choice", "extractive_qa",
                   "generative", "audio_classification"]
LongDocument = Literal["truncate", "chunk", "extend"]
Aggregate = Literal["max", "mean", "logsumexp"]
SectionSplit = Literal["none", "paragraph", "legal", "clinical"]

#: task types run by petl.tasks.runner
TEXT_TASKS = ("sequence_classification", "multiple_choice", "extractive_qa", "generative")
#: metric names each text task can report (the first ones are the default headline metrics)
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "sequence_classification": ("micro_f1", "macro_f1", "accuracy"),
    "multiple_choice": ("micro_f1", "macro_f1", "accuracy"),
    "extractive_qa": ("exact_match", "f1"),
    "generative": ("rouge1", "rouge2", "rougeL", "rougeLsum", "accuracy", "exact_match", "f1"),
}
#: long-document strategies each text task supports
_STRATEGIES = {"sequence_classification": ("truncate", "chunk", "extend"), "multiple_choice": ("truncate",),
               "extractive_qa": ("truncate", "chunk"), "generative": ("truncate", "extend")}


def _fail(key: str, value: Any, allowed: str) -> None:
    raise RecipeError(f"recipe key 'task.{key}' has value {value!r}; {allowed}")


@dataclass
class TaskSection:
    """What the recipe trains, on which benchmark, and how long documents are handled.

    type: ``causal_lm`` (language modelling / context extension), ``sequence_classification``
        (single- or multi-label), ``multiple_choice``, ``extractive_qa``, ``generative``
        (SFT with the prompt masked, scored with task metrics) or ``audio_classification``.
    dataset: dataset adapter that turns the records of ``data.source`` into the task's fields, e.g.
        ``lexglue/ecthr_a``, ``billsum``, ``cuad``, ``pubmedqa``, ``mimic/icd`` (all listed in
        docs/tasks.md). Null reads ``data.source`` in the task's plain
        format (text/label, context/question/choices/label, SQuAD, instruction/input/output).
        When ``data.source`` is left at its default the adapter's hub id is used.
    eval_split: split of ``data.source`` that is scored after training (slices such as
        ``train[80%:]`` work for local files too); null skips evaluation.
    eval_source: a different file, folder or hub id to score (read with the same adapter);
        overrides ``eval_split``'s source.
    max_eval_samples: score only the first N evaluation records.
    num_labels, label_names: label set; null / empty take them from the adapter or the data
        (``label_names`` also maps string labels of local files to ids).
    multi_label: several labels per document (sigmoid + binary cross-entropy); null = adapter's.
    threshold: sigmoid threshold for a predicted label in multi-label tasks (LexGLUE: 0.5).
    none_class: score multi-label F1 with LexGLUE's extra "no label" class (ECtHR, UNFAIR-ToS);
        null = adapter's convention.
    max_length: tokens per model input (the chunk length when chunking); null = the model's limit
        (``model.context_length`` with ``extend``).
    long_document: ``truncate`` keeps ``max_length`` tokens; ``chunk`` (encoders) splits the
        document into chunks whose logits are pooled (classification) or into overlapping windows
        (extractive QA); ``extend`` feeds whole documents to a RoPE decoder whose context is
        extended by ``model.context_length`` and trained with ``attention.pattern`` s2/sf.
    truncation_side: ``right`` keeps a document's start, ``left`` its end.
    chunk_overlap: tokens shared by consecutive chunks / QA windows.
    max_chunks: at most this many chunks per document (the first ones).
    aggregate: pooling of chunk logits: ``max``, ``mean`` or ``logsumexp``.
    section_split: chunk boundaries follow document structure: ``legal`` (articles, sections,
        clauses, numbered paragraphs), ``clinical`` (note section headers), ``paragraph`` (blank
        lines) or ``none`` (fixed windows).
    max_answer_tokens: longest answer span (extractive QA).
    negative_window_ratio: fraction of answer-less QA windows kept for training (CUAD: most
        windows hold no clause; 1.0 keeps all).
    max_new_tokens: generation budget when scoring generative tasks.
    metrics: metrics reported (empty = the benchmark's own set); see ``TASK_METRICS``.
    eval_batch_size: batch size when scoring.
    phi: the data holds protected health information: no raw text sample is ever printed,
        logged or written (no sample preview, no generated texts in predictions files).
    deidentify: replace dates, phone numbers, e-mails, record numbers, ages over 89 and listed
        names with placeholders before tokenisation (see :mod:`petl.tasks.deid`).
    deid_names_file: text file with one name per line to remove (needs ``deidentify``).
    options: dataset adapter options (e.g. MIMIC's ``top_codes``); unknown keys are rejected
        by the adapter.
    """

    type: TaskType = "causal_lm"
    dataset: Optional[str] = None
    eval_split: Optional[str] = "validation"
    eval_source: Optional[str] = None
    max_eval_samples: Optional[int] = None
    num_labels: Optional[int] = None
    label_names: list[str] = field(default_factory=list)
    multi_label: Optional[bool] = None
    threshold: float = 0.5
    none_class: Optional[bool] = None
    max_length: Optional[int] = None
    long_document: LongDocument = "truncate"
    truncation_side: Literal["right", "left"] = "right"
    chunk_overlap: int = 0
    max_chunks: int = 8
    aggregate: Aggregate = "max"
    section_split: SectionSplit = "none"
    max_answer_tokens: int = 64
    negative_window_ratio: float = 1.0
    max_new_tokens: int = 128
    metrics: list[str] = field(default_factory=list)
    eval_batch_size: int = 8
    phi: bool = False
    deidentify: bool = False
    deid_names_file: Optional[str] = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("max_eval_samples", "num_labels", "max_length"):
            value = getattr(self, key)
            if value is not None and value < 1:
                _fail(key, value, "must be a positive integer or null")
        if self.max_length is not None and self.max_length < 8:
            _fail("max_length", self.max_length, "must be at least 8 tokens")
        if not 0.0 < self.threshold < 1.0:
            _fail("threshold", self.threshold, "must be in (0, 1)")
        if self.max_chunks < 1:
            _fail("max_chunks", self.max_chunks, "must be a positive integer")
        if self.chunk_overlap < 0 or (self.max_length and self.chunk_overlap >= self.max_length // 2):
            _fail("chunk_overlap", self.chunk_overlap, "must be >= 0 and below half of task.max_length")
        if not 0.0 < self.negative_window_ratio <= 1.0:
            _fail("negative_window_ratio", self.negative_window_ratio, "must be in (0, 1]")
        for key in ("max_answer_tokens", "max_new_tokens", "eval_batch_size"):
            if getattr(self, key) < 1:
                _fail(key, getattr(self, key), "must be a positive integer")
        if self.deid_names_file and not self.deidentify:
            _fail("deid_names_file", self.deid_names_file, "set task.deidentify=true to use a names file")
        if self.num_labels is not None and self.label_names and len(self.label_names) != self.num_labels:
            _fail("label_names", self.label_names, f"must list task.num_labels={self.num_labels} names")
        if self.type not in TEXT_TASKS:
            return
        strategies = _STRATEGIES[self.type]
        if self.long_document not in strategies:
            _fail("long_document", self.long_document,
                  f"{self.type} supports {', '.join(strategies)}")
        allowed = TASK_METRICS[self.type]
        for name in self.metrics:
            if name not in allowed:
                _fail("metrics", name, f"{self.type} reports {', '.join(allowed)}")
        if self.dataset is not None:
            from petl.tasks.registry import check_dataset

            check_dataset(self.dataset, self.type)
