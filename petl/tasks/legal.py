"""Legal benchmarks: LexGLUE (ECtHR A/B, SCOTUS, EUR-LEX, LEDGAR, UNFAIR-ToS, CaseHOLD), BillSum,
CUAD, and petl's shipped US-Constitution topic set.

Each adapter reads the benchmark's records as its hub copy stores them (a local JSON/CSV/parquet
copy with the same fields works too) and converts them to a task format (see
:mod:`petl.tasks.registry`). Label conventions follow LexGLUE's reference code: ECtHR and UNFAIR-ToS
are scored with an extra "no label" class, EUR-LEX without.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from petl.tasks.registry import DatasetAdapter, TaskDataError

LEXGLUE = "coastalcph/lex_glue"

ECTHR_ARTICLES = ("Article 2", "Article 3", "Article 5", "Article 6", "Article 8", "Article 9", "Article 10",
                  "Article 11", "Article 14", "Article 1 of Protocol 1")
SCOTUS_ISSUE_AREAS = ("Criminal Procedure", "Civil Rights", "First Amendment", "Due Process", "Privacy",
                      "Attorneys", "Unions", "Economic Activity", "Judicial Power", "Federalism",
                      "Interstate Relations", "Federal Taxation", "Miscellaneous", "Private Action")
UNFAIR_TOS_TYPES = ("Limitation of liability", "Unilateral termination", "Unilateral change", "Content removal",
                    "Contract by using", "Choice of law", "Jurisdiction", "Arbitration")
CONSTITUTION_TOPICS = ("legislature", "executive", "judiciary", "rights", "voting", "states")
CLASSIFICATION_METRICS = ("micro_f1", "macro_f1", "accuracy")


def _join(text: Any) -> str:
    """ECtHR stores a judgment's facts as a list of paragraphs; keep them as blank-line paragraphs."""
    return "\n\n".join(str(t) for t in text) if isinstance(text, (list, tuple)) else str(text or "")


def _multi(record: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    return {"text": _join(record["text"]), "text_pair": "", "labels": [int(x) for x in record["labels"]]}


def _single(record: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    return {"text": _join(record["text"]), "text_pair": "", "label": int(record["label"])}


def _casehold_mc(record: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    # the context cites a case and leaves a <HOLDING> placeholder; each ending is a candidate holding
    return {"context": str(record["context"]), "question": "", "choices": [str(e) for e in record["endings"]],
            "label": int(record["label"])}


def _billsum(record: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    return {"instruction": options["instruction"], "input": str(record["text"]), "output": str(record["summary"]),
            "answer": -1}


def _cuad(record: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    answers = record.get("answers") or {"text": [], "answer_start": []}
    return {"id": str(record["id"]), "question": str(record["question"]), "context": str(record["context"]),
            "answers": {"text": list(answers["text"]), "answer_start": [int(a) for a in answers["answer_start"]]}}


def _constitution(record: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    return {"text": str(record["text"]), "text_pair": "", "label": str(record["label"])}


def constitution_path() -> Path:
    """The shipped US-Constitution topic set (JSON lines: unit, text, label, fold)."""
    return Path(__file__).parent / "data" / "us_constitution.jsonl"


_FOLD_SPLIT = re.compile(r"^fold\s*(!?=)\s*(\d+)$")


def select_folds(split: str) -> tuple[str, int]:
    """``train`` = folds 1 and 2, ``test`` = fold 0, ``fold=K`` / ``fold!=K`` for cross-validation."""
    split = split.strip()
    if split in ("train", "test"):
        return ("!=", 0) if split == "train" else ("=", 0)
    match = _FOLD_SPLIT.match(split)
    if not match:
        raise TaskDataError(f"split {split!r} is unknown for petl/us_constitution; use train, test, fold=K or fold!=K "
                         "(K in 0..2)")
    return match.group(1), int(match.group(2))


def load_constitution(source: str, split: str, *, options: dict[str, Any], max_samples: int | None = None,
                      **_: Any):
    """Read the shipped set (``source`` ``petl:us-constitution``) or a copy of it, keeping one split."""
    import datasets

    path = constitution_path() if source in ("petl:us-constitution", "") else Path(source)
    if not path.is_file():
        raise TaskDataError(f"no US-Constitution JSON-lines file at {str(path)!r}; "
                                "use data.source=petl:us-constitution")
    op, fold = select_folds(split)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if (r["fold"] == fold) == (op == "=")]
    return datasets.Dataset.from_list(rows[:max_samples] if max_samples else rows)


def _lexglue(config: str, description: str, task: str, converter, **kwargs: Any) -> DatasetAdapter:
    metrics = {task: CLASSIFICATION_METRICS}
    return DatasetAdapter(name=f"lexglue/{config}", description=description, converters={task: converter},
                          hub_id=LEXGLUE, config_name=config, metrics=metrics, **kwargs)


LEGAL: tuple[DatasetAdapter, ...] = (
    _lexglue("ecthr_a", "ECtHR Task A: articles of the Convention found violated, from the facts of a judgment "
             "(multi-label, 10 articles)", "sequence_classification", _multi, label_names=ECTHR_ARTICLES,
             num_labels=10, multi_label=True, none_class=True),
    _lexglue("ecthr_b", "ECtHR Task B: articles of the Convention allegedly violated (multi-label, 10 articles)",
             "sequence_classification", _multi, label_names=ECTHR_ARTICLES, num_labels=10, multi_label=True,
             none_class=True),
    _lexglue("scotus", "SCOTUS: issue area of a US Supreme Court opinion (14 classes)", "sequence_classification",
             _single, label_names=SCOTUS_ISSUE_AREAS, num_labels=14, label_feature="label"),
    _lexglue("eurlex", "EUR-LEX: EuroVoc concepts of an EU law (multi-label, 100 concepts)",
             "sequence_classification", _multi, num_labels=100, multi_label=True, label_feature="labels"),
    _lexglue("ledgar", "LEDGAR: type of a contract provision (100 classes)", "sequence_classification", _single,
             num_labels=100, label_feature="label"),
    _lexglue("unfair_tos", "UNFAIR-ToS: unfair clause types in terms of service (multi-label, 8 types)",
             "sequence_classification", _multi, label_names=UNFAIR_TOS_TYPES, num_labels=8, multi_label=True,
             none_class=True),
    _lexglue("case_hold", "CaseHOLD: the holding a cited case stands for (multiple choice, 5 holdings)",
             "multiple_choice", _casehold_mc),
    DatasetAdapter(name="billsum", description="BillSum: summaries of US Congressional and California bills",
                   converters={"generative": _billsum}, hub_id="FiscalNote/billsum",
                   metrics={"generative": ("rouge1", "rouge2", "rougeL", "rougeLsum")},
                   options={"instruction": "Summarize the following bill."}),
    DatasetAdapter(name="cuad", description="CUAD: clauses of 41 types in commercial contracts (extractive QA, "
                   "SQuAD 2.0 format)", converters={"extractive_qa": _cuad}, hub_id="theatticusproject/cuad-qa",
                   metrics={"extractive_qa": ("exact_match", "f1")}),
    DatasetAdapter(name="petl/us_constitution", description="Sections and amendments of the US Constitution "
                   "(public domain) labelled with one of six topics; shipped with petl; splits train/test and "
                   "fold=K / fold!=K", converters={"sequence_classification": _constitution},
                   hub_id="petl:us-constitution", label_names=CONSTITUTION_TOPICS, num_labels=6,
                   metrics={"sequence_classification": CLASSIFICATION_METRICS}, loader=load_constitution),
)
