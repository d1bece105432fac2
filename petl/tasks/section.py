"""The recipe's ``task`` section: what is trained on top of the base model.

``causal_lm`` (the default) is next-token training through ``petl.train.runner``; the other task
types (classification, multiple choice, extractive QA, generative SFT with task metrics, audio
classification) are run by their own runners, chosen in :func:`petl.train.runner.run_recipe`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

TaskType = Literal["causal_lm", "sequence_classification", "multiple_choice", "extractive_qa",
                   "generative", "audio_classification"]


@dataclass
class TaskSection:
    """What the recipe trains.

    type: ``causal_lm`` (language modelling / context extension), ``sequence_classification``
        (single- or multi-label), ``multiple_choice``, ``extractive_qa``, ``generative``
        (SFT with the prompt masked, scored with task metrics) or ``audio_classification``.
    options: task-specific settings, documented by each task runner.
    """

    type: TaskType = "causal_lm"
    options: dict[str, Any] = field(default_factory=dict)
