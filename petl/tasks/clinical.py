"""Clinical benchmarks: PubMedQA and MedQA (public, by hub id), and credentialed corpora read from
the user's local copies: MIMIC-III / MIMIC-IV notes (ICD coding), MedNLI and n2c2 2018 cohort
selection. Their file formats are documented in docs/tasks.md and in each loader below.

Credentialed data never has a hub id here: the user downloads it under their data-use agreement
and points ``data.source`` at it. Recipes for it set ``task.phi: true`` (see :mod:`petl.tasks.phi`).
"""
from __future__ import annotations

import collections
import xml.etree.ElementTree as ElementTree
import zlib
from pathlib import Path
from typing import Any

from petl.tasks.registry import DatasetAdapter, TaskDataError

PUBMEDQA_ANSWERS = ("yes", "no", "maybe")
MEDNLI_LABELS = ("entailment", "neutral", "contradiction")
N2C2_2018_CRITERIA = ("ABDOMINAL", "ADVANCED-CAD", "ALCOHOL-ABUSE", "ASP-FOR-MI", "CREATININE", "DIETSUPP-2MOS",
                      "DRUG-ABUSE", "ENGLISH", "HBA1C", "KETO-1YR", "MAJOR-DIABETES", "MAKES-DECISIONS", "MI-6MOS")
_LETTERS = "ABCDEFGHIJ"
CLASSIFICATION_METRICS = ("micro_f1", "macro_f1", "accuracy")


def _pubmedqa_context(record: dict[str, Any]) -> str:
    ctx = record["context"]
    # abstract sections keep their labels (BACKGROUND:, METHODS:) so clinical section splitting sees them
    return "\n".join(f"{label}: {text}" if label else text
                     for label, text in zip(ctx.get("labels") or [""] * len(ctx["contexts"]), ctx["contexts"]))


def _pubmedqa_cls(record: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    return {"text": _pubmedqa_context(record), "text_pair": str(record["question"]),
            "label": str(record["final_decision"]).lower()}


def _pubmedqa_gen(record: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    decision = str(record["final_decision"]).lower()
    return {"instruction": f"{options['instruction']}\nQuestion: {record['question']}",
            "input": _pubmedqa_context(record), "output": decision, "answer": PUBMEDQA_ANSWERS.index(decision)}


def _medqa_options(record: dict[str, Any]) -> list[tuple[str, str]]:
    options = record["options"]
    if isinstance(options, dict):
        return sorted((str(k), str(v)) for k, v in options.items() if v is not None)
    if options and isinstance(options[0], dict):  # [{"key": "A", "value": "..."}] (bigbio layout)
        return [(str(o["key"]), str(o["value"])) for o in options]
    return [(_LETTERS[i], str(v)) for i, v in enumerate(options)]


def _medqa_mc(record: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    keys, texts = zip(*_medqa_options(record))
    return {"context": "", "question": str(record["question"]), "choices": list(texts),
            "label": keys.index(str(record["answer_idx"]))}


def _medqa_gen(record: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    pairs = _medqa_options(record)
    listing = "\n".join(f"{k}. {v}" for k, v in pairs)
    answer = str(record["answer_idx"])
    return {"instruction": f"{options['instruction']}\n{record['question']}\n{listing}", "input": "",
            "output": answer, "answer": [k for k, _ in pairs].index(answer)}


def _mednli(record: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    return {"text": str(record["sentence1"]), "text_pair": str(record["sentence2"]),
            "label": str(record["gold_label"])}


def _passthrough_multi(record: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    return {"text": str(record["text"]), "text_pair": "", "labels": [int(x) for x in record["labels"]]}


def _column(names: list[str], *candidates: str) -> str | None:
    lower = {n.lower(): n for n in names}
    return next((lower[c.lower()] for c in candidates if c.lower() in lower), None)


def hash_split(key: Any) -> str:
    """Deterministic 80/10/10 split of admissions: crc32(id) % 10 -> 0-7 train, 8 validation, 9 test."""
    bucket = zlib.crc32(str(key).encode()) % 10
    return "train" if bucket < 8 else ("validation" if bucket == 8 else "test")


def _split_name(split: str) -> str:
    base = split.split("[", 1)[0]
    if base not in ("train", "validation", "test", "all"):
        raise TaskDataError(f"split {split!r} is unknown for MIMIC ICD coding; use train, validation, test or all")
    return base


def load_mimic_icd(source: str, split: str, *, options: dict[str, Any], max_samples: int | None = None, **_: Any):
    """MIMIC-III ``NOTEEVENTS.csv`` / MIMIC-IV ``discharge.csv`` + diagnoses -> ICD-coding documents.

    One document per hospital admission: its discharge notes (``options.categories``) joined in file
    order; labels: its ICD codes among the label set (``options.codes``, else the ``top_codes`` most
    frequent codes of all admissions with notes). Admissions are split 80/10/10 by
    :func:`hash_split`. A pre-joined JSON-lines file with ``text`` and ``labels`` (code strings) is
    read as is (no diagnoses file needed).
    """
    import datasets

    from petl.data import load_text_dataset

    notes = load_text_dataset(source, split="train", text_field=None)
    names = notes.column_names
    text_col = _column(names, "TEXT", "text")
    adm_col = _column(names, "HADM_ID", "hadm_id")
    if text_col is None or adm_col is None and "labels" not in names:
        raise TaskDataError(f"{source!r} has columns {names}; MIMIC notes need TEXT/text and HADM_ID/hadm_id "
                         "(or a pre-joined file with text and labels)")
    category_col = _column(names, "CATEGORY", "note_type")
    wanted = {c.lower() for c in options["categories"]}
    docs: dict[Any, list[str]] = collections.defaultdict(list)
    codes: dict[Any, list[str]] = {}
    for i, row in enumerate(notes):
        if category_col and wanted and str(row[category_col] or "").strip().lower() not in wanted:
            continue
        key = row[adm_col] if adm_col else i
        docs[key].append(row[text_col] or "")
        if "labels" in names:
            codes[key] = [str(c) for c in row["labels"]]
    if not docs:
        raise TaskDataError(f"no note of {source!r} has a category in task.options.categories "
                            f"{list(options['categories'])}; MIMIC-III calls discharge notes 'Discharge summary', "
                            "MIMIC-IV 'DS'")
    if "labels" not in names:
        codes = _read_diagnoses(options["diagnoses"], set(docs))
    label_set = list(options["codes"] or _top_codes(codes, docs, options["top_codes"]))
    index = {c: i for i, c in enumerate(label_set)}
    which = _split_name(split)
    rows = [{"text": "\n\n".join(docs[k]), "labels": sorted({index[c] for c in codes.get(k, []) if c in index})}
            for k in docs if which == "all" or hash_split(k) == which]
    features = datasets.Features({"text": datasets.Value("string"),
                                  "labels": datasets.Sequence(datasets.ClassLabel(names=label_set))})
    return datasets.Dataset.from_list(rows[:max_samples] if max_samples else rows, features=features)


def _read_diagnoses(path: str | None, admissions: set) -> dict[Any, list[str]]:
    from petl.data import load_text_dataset

    if not path:
        raise TaskDataError("MIMIC ICD coding needs the diagnoses table: set task.options.diagnoses to "
                         "DIAGNOSES_ICD.csv (MIMIC-III) or diagnoses_icd.csv (MIMIC-IV)")
    table = load_text_dataset(path, split="train", text_field=None)
    names = table.column_names
    adm_col, code_col = _column(names, "HADM_ID", "hadm_id"), _column(names, "ICD9_CODE", "icd_code")
    version_col = _column(names, "icd_version")
    if adm_col is None or code_col is None:
        raise TaskDataError(f"diagnoses table {path!r} has columns {names}; it needs HADM_ID and ICD9_CODE "
                         "(MIMIC-III) or hadm_id and icd_code (MIMIC-IV)")
    out: dict[Any, list[str]] = collections.defaultdict(list)
    for row in table:
        if row[adm_col] in admissions and row[code_col] is not None:
            code = str(row[code_col]).strip()
            out[row[adm_col]].append(f"ICD{row[version_col]}:{code}" if version_col else code)
    return out


def _top_codes(codes: dict[Any, list[str]], docs: dict[Any, list[str]], k: int) -> list[str]:
    counts = collections.Counter(c for key in docs for c in set(codes.get(key, [])))
    return [code for code, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def load_n2c2_cohort(source: str, split: str, *, options: dict[str, Any], max_samples: int | None = None, **_: Any):
    """n2c2 2018 Track 1 (cohort selection): a folder of ``<PatientMatching>`` XML files.

    Each file holds ``<TEXT>`` (a patient's longitudinal notes) and ``<TAGS>`` with one element per
    criterion, ``met="met"`` or ``"not met"``; a met criterion is a label. ``split`` is not used:
    point ``data.source`` at the training folder and ``task.eval_source`` at the test folder.
    """
    import datasets

    folder = Path(source)
    files = sorted(folder.glob("*.xml")) if folder.is_dir() else []
    if not files:
        raise TaskDataError(f"no n2c2 XML files in {source!r}; point data.source at the folder of "
                                "<PatientMatching> .xml files (e.g. train/)")
    rows = []
    for path in files[:max_samples] if max_samples else files:
        root = ElementTree.parse(path).getroot()
        tags = root.find("TAGS")
        met = {t.tag for t in (tags if tags is not None else []) if t.get("met", "").lower() == "met"}
        rows.append({"text": (root.findtext("TEXT") or "").strip(),
                     "labels": [i for i, c in enumerate(N2C2_2018_CRITERIA) if c in met]})
    return datasets.Dataset.from_list(rows)


CLINICAL: tuple[DatasetAdapter, ...] = (
    DatasetAdapter(name="pubmedqa", description="PubMedQA (PQA-L): yes/no/maybe answer to a research question "
                   "from its abstract", converters={"sequence_classification": _pubmedqa_cls,
                                                    "generative": _pubmedqa_gen},
                   hub_id="qiaojin/PubMedQA", config_name="pqa_labeled", label_names=PUBMEDQA_ANSWERS, num_labels=3,
                   answer_choices=PUBMEDQA_ANSWERS,
                   metrics={"sequence_classification": ("accuracy", "macro_f1"),
                            "generative": ("accuracy", "macro_f1")},
                   options={"instruction": "Answer the research question with yes, no or maybe."}),
    DatasetAdapter(name="medqa", description="MedQA (USMLE, 4 options): medical licensing exam questions",
                   converters={"multiple_choice": _medqa_mc, "generative": _medqa_gen},
                   hub_id="GBaker/MedQA-USMLE-4-options", answer_choices=tuple(_LETTERS[:4]),
                   metrics={"multiple_choice": ("accuracy",), "generative": ("accuracy",)},
                   options={"instruction": "Answer the medical question with the letter of the correct option."}),
    DatasetAdapter(name="mimic/icd", description="MIMIC-III / MIMIC-IV discharge notes -> ICD codes (multi-label; "
                   "credentialed, local files)", converters={"sequence_classification": _passthrough_multi},
                   multi_label=True, label_feature="labels", loader=load_mimic_icd, credentialed=True,
                   metrics={"sequence_classification": CLASSIFICATION_METRICS},
                   options={"diagnoses": None, "top_codes": 50, "codes": None,
                            "categories": ["Discharge summary", "DS"]}),
    DatasetAdapter(name="mednli", description="MedNLI: natural language inference on MIMIC-III sentence pairs "
                   "(credentialed, local JSON lines)", converters={"sequence_classification": _mednli},
                   label_names=MEDNLI_LABELS, num_labels=3, credentialed=True,
                   metrics={"sequence_classification": ("accuracy", "macro_f1")}),
    DatasetAdapter(name="n2c2/2018_cohort", description="n2c2 2018 Track 1: 13 cohort-selection criteria met by a "
                   "patient's notes (multi-label; credentialed, local XML)",
                   converters={"sequence_classification": _passthrough_multi}, label_names=N2C2_2018_CRITERIA,
                   num_labels=13, multi_label=True, loader=load_n2c2_cohort, credentialed=True,
                   metrics={"sequence_classification": CLASSIFICATION_METRICS}),
)
