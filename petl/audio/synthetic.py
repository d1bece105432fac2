"""Synthetic audio data sets in the official layouts, and a tiny AST checkpoint, for tests and docs.

Class k is a tone at ``220 * 1.5**k`` Hz (a different mel band per class) with noise, so a model
can learn it in a few steps; each layout mirrors the real data set's files closely enough for
:mod:`petl.audio.datasets` to read it (CSV columns, folder names, list files).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import numpy as np

from petl.audio.io import write_audio

LAYOUTS = ("esc50", "urbansound8k", "speech_commands", "fluent_speech_commands", "folder")


def tone(label: int, seconds: float, sample_rate: int = 16000, seed: int = 0, noise: float = 0.05) -> np.ndarray:
    """A clip of class ``label``: a sine at 220 * 1.5**label Hz, random phase, plus white noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    wave = 0.4 * np.sin(2 * np.pi * 220.0 * 1.5 ** label * t + rng.uniform(0, 2 * np.pi))
    return (wave + noise * rng.standard_normal(t.size)).astype(np.float32)


def _rows(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def write_dataset(root: str | Path, layout: str, num_classes: int = 3, per_group: int = 2,
                  seconds: Optional[float] = None, sample_rate: int = 16000) -> Path:
    """Write ``per_group`` clips per class and fold (or split) in ``layout``'s official file layout.

    ESC-50 clips are written at 44.1 kHz like the real set (so reading exercises resampling).
    Returns the data set's root folder.
    """
    root = Path(root)
    seed = iter(range(10**6))
    if layout == "esc50":
        rows = []
        for fold in range(1, 6):
            for k in range(num_classes):
                for i in range(per_group):
                    name = f"{fold}-{k}{i:02d}-A-{k}.wav"
                    write_audio(root / "audio" / name, tone(k, seconds or 1.0, 44100, next(seed)), 44100)
                    rows.append([name, fold, k, f"class_{k}", "False", f"{k}{i}", "A"])
        _rows(root / "meta/esc50.csv", ["filename", "fold", "target", "category", "esc10", "src_file", "take"], rows)
    elif layout == "urbansound8k":
        rows = []
        for fold in range(1, 11):
            for k in range(num_classes):
                for i in range(per_group):
                    name = f"{fold}{k}{i}-{k}-0-0.wav"
                    write_audio(root / f"audio/fold{fold}" / name, tone(k, seconds or 1.0, sample_rate, next(seed)))
                    rows.append([name, f"{fold}{k}{i}", 0, seconds or 1.0, 1, fold, k, f"sound_{k}"])
        _rows(root / "metadata/UrbanSound8K.csv",
              ["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"], rows)
    elif layout == "speech_commands":
        lists: dict[str, list[str]] = {"validation": [], "testing": []}
        for k in range(num_classes):
            for split in ("train", "validation", "testing"):
                for i in range(per_group):
                    rel = f"word{k}/{split[:2]}{i}_nohash_0.wav"
                    write_audio(root / rel, tone(k, seconds or 1.0, sample_rate, next(seed)))
                    if split in lists:
                        lists[split].append(rel)
        write_audio(root / "_background_noise_/white_noise.wav", tone(0, 1.0, sample_rate, 0, noise=0.5))
        for split, names in lists.items():
            (root / f"{split}_list.txt").write_text("\n".join(names) + "\n")
    elif layout == "fluent_speech_commands":
        intents = [("activate", "lights", "kitchen"), ("increase", "volume", "none"), ("bring", "shoes", "none"),
                   ("deactivate", "music", "none"), ("decrease", "heat", "bedroom")][:num_classes]
        header = ["", "path", "speakerId", "transcription", "action", "object", "location"]
        for split in ("train", "valid", "test"):
            rows = []
            for k, (action, obj, loc) in enumerate(intents):
                for i in range(per_group):
                    rel = f"wavs/speakers/spk{i}/{split}-{k}-{i}.wav"
                    write_audio(root / rel, tone(k, seconds or 1.5, sample_rate, next(seed)))
                    rows.append([len(rows), rel, f"spk{i}", f"{action} {obj}", action, obj, loc])
            _rows(root / f"data/{split}_data.csv", header, rows)
    elif layout == "folder":
        for split in ("train", "validation", "test"):
            for k in range(num_classes):
                for i in range(per_group):
                    write_audio(root / split / f"label{k}" / f"{i}.flac", tone(k, seconds or 1.0, sample_rate,
                                                                               next(seed)))
    else:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    return root


def save_tiny_ast(folder: str | Path, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2,
                  max_length: int = 1024, num_labels: int = 2, seed: int = 0) -> Path:
    """Save a randomly initialised ``ASTForAudioClassification`` (128 mel bins, 16x16 patches, stride 10)
    with non-zero positional embeddings, so interpolation and the zero mode differ."""
    import torch
    from transformers import ASTConfig, ASTForAudioClassification

    config = ASTConfig(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                       intermediate_size=2 * hidden_size, max_length=max_length, num_labels=num_labels)
    torch.manual_seed(seed)
    model = ASTForAudioClassification(config)
    with torch.no_grad():
        model.audio_spectrogram_transformer.embeddings.position_embeddings.normal_(0.0, 0.02)
    model.save_pretrained(str(folder))
    return Path(folder)
