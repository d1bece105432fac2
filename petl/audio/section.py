"""The recipe's ``audio`` section: data set, features, augmentation and protocol of an
``audio_classification`` task (PETL-AST). The adapter itself is ``adapter: {type: audio, options}``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from petl.audio.features import AUDIOSET_MEAN, AUDIOSET_STD
from petl.train.schema_types import RecipeError

#: Input frames per data set in PETL-AST (clip lengths 5 s / 4 s / 1 s / <= 4 s at 10 ms frames).
DEFAULT_MAX_FRAMES = {"esc50": 500, "urbansound8k": 400, "speech_commands": 100, "fluent_speech_commands": 400}


def _check(cond: bool, key: str, value, allowed: str) -> None:
    if not cond:
        raise RecipeError(f"recipe key 'audio.{key}' has value {value!r}; {allowed}")


@dataclass
class AudioSection:
    """Audio pipeline and evaluation protocol (docs/audio.md).

    dataset: ``esc50``, ``urbansound8k``, ``speech_commands`` (v2), ``fluent_speech_commands`` or
        ``folder`` (``<source>/<train|validation|test or fold<k>>/<label>/<clip>``).
    source: local folder in the data set's official layout, or a hub id (audio read undecoded and
        decoded with soundfile). hub_config: the hub data set's configuration name.
    sample_rate: clips are resampled to this rate (AST: 16000 Hz).
    max_frames: input length in 10 ms frames (pad / cut); null uses PETL-AST's value for the data
        set (ESC-50 500, UrbanSound8K 400, Speech Commands 100, FSC 400; folder: the model's).
    pos_embed: ``interpolate`` resizes the pretrained positional-embedding grid to max_frames;
        ``zero`` uses all-zero embeddings, as the reference code effectively did (faithful mode).
    pooling: ``mean`` of all output tokens (the paper), ``cls``, or ``native`` (transformers'
        (CLS + distillation) / 2, the only one a merged model keeps).
    freq_mask, time_mask, num_freq_masks, num_time_masks: SpecAugment on training clips (widths in
        mel bins / frames; 0 disables). PETL-AST: 24 / 80 on ESC-50 and UrbanSound8K.
    norm_mean, norm_std: feature normalisation (AudioSet's statistics by default).
    protocol: ``official`` (the data set's train / validation / test split) or ``rotation``
        (k-fold rotation over its folds: test = 1 fold, validation = ``val_folds``, train = rest).
    val_folds: folds held out for validation in a rotation. PETL-AST's ESC-50 protocol is 1; its
        UrbanSound8K run had none and picked the epoch on the test fold; petl holds one training
        fold out instead, so selection never sees the test fold.
    folds: which rotations to run (1-based); empty runs all of them.
    selection: ``best_val`` evaluates the adapter of the epoch with the best validation accuracy
        on the test split; ``last`` evaluates the final one (needed when there is no validation).
    epochs: train this many epochs (overrides train.max_steps); null uses train.max_steps.
    eval_steps: validate every this many steps; null validates once per epoch.
    eval_batch_size: batch size for validation / test; null uses train.batch_size.
    adam_epsilon: AdamW epsilon (PETL-AST: 1e-6; train.* has no epsilon field).
    train_per_class: keep only the first N training clips of each class (few-shot experiments).
    max_train_samples, max_eval_samples: random subsets of each split (quick runs).
    cache_features: keep computed features in memory (fast epochs on small sets; ~0.5 MB per
        clip at 1024 frames).
    """

    dataset: Literal["esc50", "urbansound8k", "speech_commands", "fluent_speech_commands", "folder"] = "folder"
    source: str = ""
    hub_config: Optional[str] = None
    sample_rate: int = 16000
    max_frames: Optional[int] = None
    pos_embed: Literal["interpolate", "zero"] = "interpolate"
    pooling: Literal["mean", "cls", "native"] = "mean"
    freq_mask: int = 0
    time_mask: int = 0
    num_freq_masks: int = 1
    num_time_masks: int = 1
    norm_mean: float = AUDIOSET_MEAN
    norm_std: float = AUDIOSET_STD
    protocol: Literal["official", "rotation"] = "official"
    val_folds: int = 1
    folds: list[int] = field(default_factory=list)
    selection: Literal["best_val", "last"] = "best_val"
    epochs: Optional[int] = None
    eval_steps: Optional[int] = None
    eval_batch_size: Optional[int] = None
    adam_epsilon: float = 1e-8
    train_per_class: Optional[int] = None
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    cache_features: bool = False

    def __post_init__(self) -> None:
        _check(self.sample_rate > 0, "sample_rate", self.sample_rate, "must be a positive rate in Hz")
        if self.max_frames is not None:
            _check(self.max_frames >= 16, "max_frames", self.max_frames, "must be >= 16 (one AST patch)")
        for key in ("freq_mask", "time_mask", "num_freq_masks", "num_time_masks", "val_folds"):
            _check(getattr(self, key) >= 0, key, getattr(self, key), "must be >= 0")
        _check(self.norm_std > 0, "norm_std", self.norm_std, "must be > 0")
        _check(self.adam_epsilon > 0, "adam_epsilon", self.adam_epsilon, "must be > 0")
        _check(all(f >= 1 for f in self.folds), "folds", self.folds, "rotations are numbered from 1")
        for key in ("epochs", "eval_steps", "eval_batch_size", "train_per_class", "max_train_samples",
                    "max_eval_samples"):
            value = getattr(self, key)
            _check(value is None or value > 0, key, value, "must be a positive integer or null")
        _check(not (self.protocol == "rotation" and self.selection == "best_val" and self.val_folds == 0),
               "selection", self.selection, "best_val needs validation folds; set audio.val_folds >= 1 or "
               "audio.selection=last")

    def frames_for(self, model_max_length: int) -> int:
        """The input length: max_frames, else the data set's PETL-AST value, else the model's."""
        return self.max_frames or DEFAULT_MAX_FRAMES.get(self.dataset, model_max_length)
