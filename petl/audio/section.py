"""The recipe's ``audio`` section (audio-spectrogram adapters); used when task.type is audio_classification."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class AudioSection:
    """Audio pipeline settings; see docs/audio.md."""

    options: dict[str, Any] = field(default_factory=dict)
