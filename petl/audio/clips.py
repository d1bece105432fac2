"""A torch Dataset of labelled clips -> AST features, and the batch collator."""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import Dataset

from petl.audio.augment import SpecAugment
from petl.audio.datasets import AudioExample
from petl.audio.features import AstFeaturizer
from petl.audio.io import read_audio


class ClipDataset(Dataset):
    """``{"input_values": [max_frames, mel], "labels": int}`` per clip, decoded on access.

    Args:
        examples: the clips.
        featurizer: waveform -> features (its sample rate is the decode rate).
        augment: SpecAugment applied after featurisation (training only). Default: None.
        cache (bool): keep each clip's (un-augmented) features in memory after the first read;
            ~ max_frames x mel x 4 bytes per clip. Default: False.
    """

    def __init__(self, examples: list[AudioExample], featurizer: AstFeaturizer,
                 augment: Optional[SpecAugment] = None, cache: bool = False) -> None:
        self.examples = examples
        self.featurizer = featurizer
        self.augment = augment if augment is not None and augment.active else None
        self._cache: Optional[dict[int, torch.Tensor]] = {} if cache else None

    def __len__(self) -> int:
        return len(self.examples)

    def features(self, index: int) -> torch.Tensor:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        wave = read_audio(self.examples[index].audio, self.featurizer.sample_rate)
        feats = self.featurizer(wave)
        if self._cache is not None:
            self._cache[index] = feats
        return feats

    def __getitem__(self, index: int) -> dict:
        feats = self.features(index)
        if self.augment is not None:
            feats = self.augment(feats)
        return {"input_values": feats, "labels": self.examples[index].label}


def collate_clips(batch: list[dict]) -> dict[str, torch.Tensor]:
    """Stack ``input_values`` to ``[B, frames, mel]`` and labels to ``[B]``."""
    return {"input_values": torch.stack([b["input_values"] for b in batch]),
            "labels": torch.tensor([b["labels"] for b in batch], dtype=torch.long)}
