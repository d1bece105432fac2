"""Best-checkpoint selection on validation: a Trainer callback that keeps the best adapter on disk.

PETL-AST's code kept a live ``state_dict()`` reference as its "best" model, so it tested the last
epoch (adapters.md §2.5, trap 5), and selected UrbanSound8K epochs on the test fold (trap 6). Here
every validation result is compared, the best adapter is written atomically to ``best/`` (small:
only adapter and head weights), and the test split is scored once, after training, on that adapter.
Writing to disk (not memory) lets a resumed run still know its best epoch.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from transformers import TrainerCallback

BEST_INFO = "best.json"


class BestAdapterCallback(TrainerCallback):
    """Save the adapter whenever ``eval_<metric>`` improves (ties keep the earlier step).

    Attributes:
        best_value, best_step: the best validation score so far and its step.
        last_value, last_step: the latest validation score and its step.
        history: ``[(step, value), ...]`` of every validation.
    """

    def __init__(self, folder: str | Path, metric: str = "accuracy", resume: bool = False) -> None:
        self.folder = Path(folder)
        self.key = f"eval_{metric}"
        self.best_value: Optional[float] = None
        self.best_step: Optional[int] = None
        self.last_value: Optional[float] = None
        self.last_step: Optional[int] = None
        self.history: list[tuple[int, float]] = []
        info = self.folder / BEST_INFO
        if resume and info.is_file():
            saved = json.loads(info.read_text())
            self.best_value, self.best_step = saved["value"], saved["step"]
            self.history = [tuple(h) for h in saved.get("history", [])]
        elif self.folder.exists():
            shutil.rmtree(self.folder)

    def on_evaluate(self, args, state, control, metrics: dict[str, Any] | None = None, model=None, **kwargs):
        if not metrics or self.key not in metrics:
            return
        # Every process tracks the (gathered, identical) scores so all of them restore the same
        # adapter later; only the main process writes.
        value, step = float(metrics[self.key]), state.global_step
        self.last_value, self.last_step = value, step
        self.history.append((step, value))
        improved = self.best_value is None or value > self.best_value
        if improved:
            self.best_value, self.best_step = value, step
        if state.is_world_process_zero:
            self._save(model) if improved else self._write_info()

    def _save(self, model) -> None:
        staging = self.folder.with_name(self.folder.name + ".staging")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(str(staging))
        shutil.rmtree(self.folder, ignore_errors=True)
        os.replace(staging, self.folder)
        self._write_info()

    def _write_info(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / BEST_INFO).write_text(json.dumps({"value": self.best_value, "step": self.best_step,
                                                         "history": self.history}))


def restore_adapter(model, folder: str | Path, adapter_name: str = "default") -> None:
    """Load the adapter weights saved in ``folder`` into the PeftModel ``model`` (in place)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(folder) / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no saved adapter at {path}; the run has no best-on-validation adapter")
    set_peft_model_state_dict(model, load_file(str(path)), adapter_name=adapter_name)
