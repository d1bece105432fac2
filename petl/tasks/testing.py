"""Tiny encoders (BERT-, RoBERTa- and Longformer-shaped) and a word-level tokenizer for task tests.

Built from configs with random weights, saved with safetensors, so task recipes run end to end in
seconds on CPU without a network. The saved checkpoint is a bare encoder (``BertModel`` ...), like a
hub checkpoint: the task head is missing and gets initialised (and trained in full) on load.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

ENCODER_ARCHS = ("bert", "roberta", "longformer")
_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def tiny_tokenizer_for(texts: Iterable[str], max_length: int = 512):
    """A lower-casing WordPiece ``BertTokenizerFast`` whose vocabulary is every word / sign of ``texts``."""
    from transformers import BertTokenizerFast

    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())} - set(_SPECIALS))
    vocab = {token: i for i, token in enumerate([*_SPECIALS, *words])}
    return BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=max_length)


def tiny_encoder_config(arch: str, vocab_size: int, *, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2,
                        max_length: int = 128, pad_token_id: int = 0, **overrides: Any):
    """A small encoder config; ``max_length`` tokens fit its position table (RoBERTa-style offsets included)."""
    from transformers import AutoConfig

    if arch not in ENCODER_ARCHS:
        raise ValueError(f"unknown tiny encoder {arch!r}; choose one of {ENCODER_ARCHS}")
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, intermediate_size=2 * hidden_size, pad_token_id=pad_token_id,
                  max_position_embeddings=max_length + (pad_token_id + 1 if arch != "bert" else 0),
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, type_vocab_size=2)
    if arch == "longformer":
        common.update(attention_window=[16] * num_layers, sep_token_id=3, bos_token_id=2, eos_token_id=3)
    common.update(overrides)
    return AutoConfig.for_model(arch, **common)


def save_tiny_encoder(folder: str | Path, texts: Iterable[str], arch: str = "bert", seed: int = 0,
                      max_length: int = 128, **sizes: Any) -> Path:
    """Save a tiny random ``arch`` encoder and a matching tokenizer to ``folder``; returns the folder."""
    import torch
    from transformers import AutoModel

    folder = Path(folder)
    tokenizer = tiny_tokenizer_for(list(texts), max_length=max_length)
    config = tiny_encoder_config(arch, len(tokenizer), max_length=max_length, pad_token_id=tokenizer.pad_token_id,
                                 **sizes)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


_WORDS = ("the court held that the applicant was detained without review and the state shall pay damages "
          "within thirty days after notice the patient reports chest pain and shortness of breath treated "
          "with aspirin and discharged home in stable condition").split()


def _sentence(rng, n: int = 12) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n)).capitalize() + "."


def _document(rng, style: str, sections: int = 4, marker: str = "") -> str:
    heads = {"legal": [f"Section {i + 1}." for i in range(sections)],
             "clinical": ["History of Present Illness:", "Past Medical History:", "Brief Hospital Course:",
                          "Discharge Medications:"][:sections]}[style]
    parts = [f"{h} {_sentence(rng)} {_sentence(rng)}" for h in heads]
    if marker:
        parts.insert(0, f"Note: patient {marker} seen.")
    return "\n".join(parts)


def benchmark_records(n: int = 6, seed: int = 0, marker: str = "") -> dict[str, list[dict[str, Any]]]:
    """Tiny records in each benchmark's own (hub) format, keyed by adapter name (MIMIC/n2c2 excluded).

    ``marker`` is written into every clinical text, so tests can check it never leaks from a ``phi`` run.
    """
    import random

    rng = random.Random(seed)
    legal = [_document(rng, "legal") for _ in range(n)]
    clinical = [_document(rng, "clinical", marker=marker) for _ in range(n)]
    out: dict[str, list[dict[str, Any]]] = {}
    out["lexglue/ecthr_a"] = out["lexglue/ecthr_b"] = [
        {"text": doc.split("\n"), "labels": sorted(rng.sample(range(10), i % 3))} for i, doc in enumerate(legal)]
    out["lexglue/scotus"] = [{"text": doc, "label": i % 14} for i, doc in enumerate(legal)]
    out["lexglue/eurlex"] = [{"text": doc, "labels": [i % 100, (i * 7) % 100]} for i, doc in enumerate(legal)]
    out["lexglue/ledgar"] = [{"text": doc, "label": (i * 3) % 100} for i, doc in enumerate(legal)]
    out["lexglue/unfair_tos"] = [{"text": _sentence(rng), "labels": [i % 8] if i % 2 else []} for i in range(n)]
    out["lexglue/case_hold"] = [{"context": _sentence(rng, 30) + " (<HOLDING>)",
                                 "endings": [_sentence(rng, 6) for _ in range(5)], "label": i % 5} for i in range(n)]
    out["billsum"] = [{"text": doc, "summary": _sentence(rng, 8), "title": "A bill"} for doc in legal]
    out["cuad"] = []
    for i, doc in enumerate(legal):
        answer = doc.split(". ")[1][:20] if i % 2 == 0 else None
        out["cuad"].append({"id": f"c{i}", "title": "contract", "context": doc,
                            "question": "Highlight the parts related to Governing Law.",
                            "answers": {"text": [answer] if answer else [],
                                        "answer_start": [doc.index(answer)] if answer else []}})
    decisions = ("yes", "no", "maybe")
    out["pubmedqa"] = [{"pubid": i, "question": "Does aspirin help?", "long_answer": _sentence(rng),
                        "context": {"contexts": [_sentence(rng), _sentence(rng)], "labels": ["BACKGROUND", "RESULTS"],
                                    "meshes": []}, "final_decision": decisions[i % 3]} for i in range(n)]
    out["medqa"] = [{"question": _sentence(rng, 20) + f" {marker}".rstrip(), "answer": "x", "meta_info": "step1",
                     "options": {k: _sentence(rng, 3) for k in "ABCD"}, "answer_idx": "ABCD"[i % 4]} for i in range(n)]
    out["mednli"] = [{"sentence1": clinical[i].split("\n")[0], "sentence2": _sentence(rng, 6),
                      "gold_label": ("entailment", "neutral", "contradiction")[i % 3]} for i in range(n)]
    out["clinical_notes"] = [{"text": doc} for doc in clinical]
    return out


def write_benchmark_files(folder: str | Path, n: int = 6, seed: int = 0, marker: str = "") -> dict[str, Path]:
    """Write :func:`benchmark_records` as JSON lines, plus MIMIC CSV tables and an n2c2 XML folder.

    Returns adapter name -> path (``mimic/icd`` -> NOTEEVENTS.csv with ``mimic/diagnoses`` beside it).
    MIMIC admission ids are chosen so every hash split (train / validation / test) holds some.
    """
    import csv
    import json

    from petl.tasks.clinical import N2C2_2018_CRITERIA, hash_split

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    records = benchmark_records(n, seed, marker)
    paths: dict[str, Path] = {}
    for name, rows in records.items():
        path = folder / (name.replace("/", "_") + ".jsonl")
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[name] = path
    notes = [r["text"] for r in records["clinical_notes"]]
    ids, want = [], {"train": 2 * n, "validation": n, "test": n}
    for key in range(100000, 200000):
        if want[hash_split(key)] > 0 and len(ids) < 4 * n:
            want[hash_split(key)] -= 1
            ids.append(key)
    with open(folder / "NOTEEVENTS.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ROW_ID", "SUBJECT_ID", "HADM_ID", "CATEGORY", "TEXT"])
        for i, hadm in enumerate(ids):
            writer.writerow([i, 7000 + i, hadm, "Discharge summary", notes[i % len(notes)]])
            writer.writerow([100 + i, 7000 + i, hadm, "Radiology", "CHEST X-RAY: no acute process."])
    with open(folder / "DIAGNOSES_ICD.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ROW_ID", "SUBJECT_ID", "HADM_ID", "SEQ_NUM", "ICD9_CODE"])
        for i, hadm in enumerate(ids):
            for j, code in enumerate(["4019", "4280", "42731", "5849"][: 1 + i % 4]):
                writer.writerow([10 * i + j, 7000 + i, hadm, j + 1, code])
    paths["mimic/icd"], paths["mimic/diagnoses"] = folder / "NOTEEVENTS.csv", folder / "DIAGNOSES_ICD.csv"
    xml_dir = folder / "n2c2_train"
    xml_dir.mkdir(exist_ok=True)
    for i, note in enumerate(notes):
        tags = "".join(f'<{c} met="{"met" if (i + j) % 3 == 0 else "not met"}" />\n'
                       for j, c in enumerate(N2C2_2018_CRITERIA))
        (xml_dir / f"{100 + i}.xml").write_text(f'<?xml version="1.0" encoding="UTF-8" ?>\n<PatientMatching>\n'
                                                f"<TEXT><![CDATA[{note}\n]]></TEXT>\n<TAGS>\n{tags}</TAGS>\n"
                                                "</PatientMatching>\n")
    paths["n2c2/2018_cohort"] = xml_dir
    return paths


def fixture_vocabulary_texts() -> list[str]:
    """Texts covering every word the fixtures, the shipped US-Constitution set and the prompts use."""
    from petl.tasks.legal import constitution_path

    return [" ".join(_WORDS), constitution_path().read_text(), "Highlight the parts related to Governing Law. "
            "Does aspirin help? BACKGROUND RESULTS History of Present Illness: Past Medical History: "
            "Brief Hospital Course: Discharge Medications: note patient seen CHEST X-RAY: no acute process."]
