"""Audio classification corpora: ESC-50, UrbanSound8K, Speech Commands v2, Fluent Speech Commands and
plain folders, from a local copy (the official layout) or a hub id, plus their evaluation protocols.

A corpus is a list of :class:`AudioExample` (the audio is a path or a hub record; nothing is decoded
here) with label names and either folds (ESC-50: 5, UrbanSound8K: 10) or named splits (train /
validation / test). :func:`plan_splits` turns it into the runs of a protocol: ``official`` (the
data set's own split) or ``rotation`` (k-fold rotation: for run r the folds are rotated by r - 1,
the last is the test fold, the ``val_folds`` before it validate, the rest train; PETL-AST's ESC-50
protocol is 3 / 1 / 1).
"""
from __future__ import annotations

import csv
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from petl.audio.io import AudioSource

DATASETS = ("esc50", "urbansound8k", "speech_commands", "fluent_speech_commands", "folder")
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")
_SPLIT_NAMES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                "val": "validation", "dev": "validation", "test": "test", "testing": "test"}


@dataclass(frozen=True)
class AudioExample:
    """One labelled clip. ``group`` is its fold number or its split name."""

    audio: AudioSource
    label: int
    group: Union[int, str]


@dataclass
class AudioCorpus:
    name: str
    examples: list[AudioExample]
    label_names: list[str]

    @property
    def folds(self) -> list[int]:
        return sorted({e.group for e in self.examples if isinstance(e.group, int)})

    @property
    def splits(self) -> set[str]:
        return {e.group for e in self.examples if isinstance(e.group, str)}


@dataclass
class FoldSplit:
    """Train / validation / test examples of one run; ``name`` is ``fold-<r>`` or None (official split)."""

    name: Optional[str]
    train: list[AudioExample]
    validation: list[AudioExample] = field(default_factory=list)
    test: list[AudioExample] = field(default_factory=list)


class DatasetError(ValueError):
    """A data set could not be found or read; the message says what is missing."""


# ----------------------------------------------------------------------------- local layouts

def _find(root: Path, relative: str) -> Path:
    for base in (root, *(p for p in sorted(root.iterdir()) if p.is_dir())):
        if (base / relative).is_file():
            return base
    raise DatasetError(f"{root} has no {relative}; point audio.source at the data set's folder")


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _esc50(root: Path) -> AudioCorpus:
    base = _find(root, "meta/esc50.csv")
    rows = _csv(base / "meta/esc50.csv")
    names = {int(r["target"]): r["category"] for r in rows}
    examples = [AudioExample(str(base / "audio" / r["filename"]), int(r["target"]), int(r["fold"])) for r in rows]
    return AudioCorpus("esc50", examples, [names[i] for i in sorted(names)])


def _urbansound8k(root: Path) -> AudioCorpus:
    base = _find(root, "metadata/UrbanSound8K.csv")
    rows = _csv(base / "metadata/UrbanSound8K.csv")
    names = {int(r["classID"]): r["class"] for r in rows}
    examples = [AudioExample(str(base / "audio" / f"fold{r['fold']}" / r["slice_file_name"]), int(r["classID"]),
                             int(r["fold"])) for r in rows]
    return AudioCorpus("urbansound8k", examples, [names[i] for i in sorted(names)])


def _speech_commands(root: Path) -> AudioCorpus:
    base = _find(root, "testing_list.txt")
    listed = {split: set((base / f"{split}_list.txt").read_text().split()) for split in ("validation", "testing")}
    words = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("_"))
    examples = []
    for label, word in enumerate(words):
        for wav in sorted((base / word).glob("*.wav")):
            rel = f"{word}/{wav.name}"
            split = "validation" if rel in listed["validation"] else "test" if rel in listed["testing"] else "train"
            examples.append(AudioExample(str(wav), label, split))
    return AudioCorpus("speech_commands", examples, words)


def _fluent_speech_commands(root: Path) -> AudioCorpus:
    base = _find(root, "data/train_data.csv")
    tables = {split: _csv(base / f"data/{name}_data.csv")
              for split, name in (("train", "train"), ("validation", "valid"), ("test", "test"))}
    intent = lambda r: f"{r['action']}|{r['object']}|{r['location']}"  # noqa: E731
    names = sorted({intent(r) for rows in tables.values() for r in rows})
    index = {n: i for i, n in enumerate(names)}
    examples = [AudioExample(str(base / r["path"]), index[intent(r)], split)
                for split, rows in tables.items() for r in rows]
    return AudioCorpus("fluent_speech_commands", examples, names)


def _folder(root: Path) -> AudioCorpus:
    """``<root>/<split or fold<k>>/<label>/*.wav``: splits train/validation/test, or folds fold1..foldK."""
    groups: dict[Union[int, str], Path] = {}
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        name = child.name.lower()
        if name in _SPLIT_NAMES:
            groups[_SPLIT_NAMES[name]] = child
        elif name.startswith("fold") and name[4:].isdigit():
            groups[int(name[4:])] = child
    if not groups:
        raise DatasetError(f"{root} holds no train/validation/test or fold<k> folders; lay the clips out as "
                           "<root>/<split>/<label>/<clip>.wav")
    names = sorted({p.name for g in groups.values() for p in g.iterdir() if p.is_dir()})
    index = {n: i for i, n in enumerate(names)}
    examples = [AudioExample(str(f), index[label.name], group) for group, folder in groups.items()
                for label in sorted(p for p in folder.iterdir() if p.is_dir())
                for f in sorted(label.iterdir()) if f.suffix.lower() in AUDIO_SUFFIXES]
    return AudioCorpus(root.name, examples, names)


LOCAL_LOADERS: dict[str, Callable[[Path], AudioCorpus]] = {
    "esc50": _esc50, "urbansound8k": _urbansound8k, "speech_commands": _speech_commands,
    "fluent_speech_commands": _fluent_speech_commands, "folder": _folder}


# ----------------------------------------------------------------------------- hub

def _hub_label(kind: str, row: dict[str, Any], features: Any) -> tuple[Any, Optional[str]]:
    """(label key, label name) of a hub row for each data set's published column names."""
    if kind == "esc50":
        return int(row["target"]), row.get("category")
    if kind == "urbansound8k":
        return int(row["classID"]), row.get("class")
    if kind == "fluent_speech_commands" and "action" in row:
        name = f"{row['action']}|{row['object']}|{row['location']}"
        return name, name
    label = row["label"]
    names = getattr(features.get("label"), "names", None)
    return label, names[label] if names and isinstance(label, int) else str(label)


def load_hub_corpus(kind: str, hub_id: str, config_name: Optional[str] = None, audio_column: str = "audio",
                    trust_remote_code: bool = False) -> AudioCorpus:
    """Read a hub data set with its audio left undecoded (decoded later by soundfile)."""
    import datasets

    try:
        dataset = datasets.load_dataset(hub_id, config_name, trust_remote_code=trust_remote_code) \
            if trust_remote_code else datasets.load_dataset(hub_id, config_name)
    except Exception as exc:  # noqa: BLE001 - surface hub / network problems as one line
        raise DatasetError(f"cannot load audio data set {hub_id!r} from the hub ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}); pass a local folder as audio.source")
    labels: dict[Any, str] = {}
    rows = []
    for split, part in dataset.items():
        if audio_column not in part.column_names:
            raise DatasetError(f"hub data set {hub_id!r} has no column {audio_column!r}")
        part = part.cast_column(audio_column, datasets.Audio(decode=False))
        for row in part:
            key, name = _hub_label(kind, row, part.features)
            labels.setdefault(key, name if name is not None else str(key))
            group = int(row["fold"]) if "fold" in row else _SPLIT_NAMES.get(split.lower(), split)
            rows.append((row[audio_column], key, group))
    keys = sorted(labels)
    index = {k: i for i, k in enumerate(keys)}
    return AudioCorpus(kind, [AudioExample(a, index[k], g) for a, k, g in rows], [labels[k] for k in keys])


def load_corpus(kind: str, source: str, config_name: Optional[str] = None,
                trust_remote_code: bool = False) -> AudioCorpus:
    """A corpus of data set ``kind`` from a local folder (official layout) or a hub id."""
    if kind not in LOCAL_LOADERS:
        raise DatasetError(f"unknown audio data set {kind!r}; choose one of {', '.join(DATASETS)}")
    if not source:
        raise DatasetError("audio.source is empty; give the data set's local folder or its hub id")
    path = Path(source).expanduser()
    corpus = LOCAL_LOADERS[kind](path) if path.is_dir() else load_hub_corpus(kind, source, config_name,
                                                                             trust_remote_code=trust_remote_code)
    if not corpus.examples:
        raise DatasetError(f"{source!r} holds no audio clips for data set {kind}")
    return corpus


# ----------------------------------------------------------------------------- protocols

def plan_splits(corpus: AudioCorpus, protocol: str, val_folds: int = 1,
                runs: Optional[list[int]] = None) -> list[FoldSplit]:
    """The runs of ``protocol`` on ``corpus`` (see the module docstring)."""
    if protocol == "official":
        if not {"train", "test"} <= corpus.splits:
            found = sorted(corpus.splits) or "folds"
            raise DatasetError(f"{corpus.name} has no official train/test split (found {found}); "
                               "use audio.protocol=rotation")
        by = {s: [e for e in corpus.examples if e.group == s] for s in ("train", "validation", "test")}
        return [FoldSplit(None, by["train"], by["validation"], by["test"])]
    if protocol != "rotation":
        raise DatasetError(f"unknown audio.protocol {protocol!r}; use official or rotation")
    folds = corpus.folds
    if len(folds) < val_folds + 2:
        raise DatasetError(f"{corpus.name} has folds {folds}; rotation needs at least val_folds + 2 = "
                           f"{val_folds + 2} (or use audio.protocol=official)")
    chosen = runs or list(range(1, len(folds) + 1))
    bad = [r for r in chosen if not 1 <= r <= len(folds)]
    if bad:
        raise DatasetError(f"audio.folds {bad} out of range; runs are numbered 1..{len(folds)}")
    out = []
    for r in chosen:
        order = folds[r - 1:] + folds[:r - 1]
        test, val, train = order[-1:], order[len(order) - 1 - val_folds:-1], order[:len(order) - 1 - val_folds]
        pick = lambda ids: [e for e in corpus.examples if e.group in ids]  # noqa: E731
        out.append(FoldSplit(f"fold-{r}", pick(train), pick(val), pick(test)))
    return out


def per_class(examples: list[AudioExample], n: int) -> list[AudioExample]:
    """The first ``n`` examples of every class, in corpus order (PETL-AST's few-shot subsets)."""
    counts: dict[int, int] = {}
    kept = []
    for example in examples:
        if counts.get(example.label, 0) < n:
            counts[example.label] = counts.get(example.label, 0) + 1
            kept.append(example)
    return kept


def subsample(examples: list[AudioExample], n: Optional[int], seed: int) -> list[AudioExample]:
    """At most ``n`` examples, drawn without replacement with ``seed`` (order kept)."""
    if n is None or n >= len(examples):
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]
