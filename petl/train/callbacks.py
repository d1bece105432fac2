"""Trainer callbacks: a JSONL step log and the loss-curve picture written to the output folder."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import TrainerCallback


class JsonlStepLogger(TrainerCallback):
    """Append every Trainer log record (loss, lr, grad norm, ...) to ``path`` as one JSON line.

    On resume the file is first cut back to the checkpoint's step, so the log of a killed and
    resumed run reads exactly like the log of an uninterrupted one.
    """

    def __init__(self, path: str | Path, resume_step: int = 0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept) if resume_step else "")

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs) -> None:
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def read_step_log(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL step log (training-loss records carry a ``loss`` key)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(step_log: str | Path, out_png: str | Path, title: str = "training loss") -> Path | None:
    """Draw loss against step from the JSONL log; returns the PNG path (None when no loss logged)."""
    records = [r for r in read_step_log(step_log) if "loss" in r]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
