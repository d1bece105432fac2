"""One JSONL step log for both distillation stages, and the two-panel loss curve drawn from it.

Each record is ``{"stage": "attention_transfer" | "lora", "step": N, ...Trainer logs}``; stage-1
records carry the per-layer ``distill_mse/layer_<i>`` next to the scaled ``loss``. A stage that
resumes from checkpoint ``N`` first drops its own records after step ``N`` (and keeps every other
stage's), so a killed and resumed run logs exactly like an uninterrupted one.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import TrainerCallback


def read_records(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class StageStepLogger(TrainerCallback):
    """Append every Trainer log record of one stage to ``path``, tagged with ``stage``.

    Args:
        path (str | Path): the JSONL file shared by the stages.
        stage (str): the tag written into each record.
        resume_step (int): the checkpoint step this stage resumes from (0 for a fresh start).
    """

    def __init__(self, path: str | Path, stage: str, resume_step: int = 0) -> None:
        self.path, self.stage = Path(path), stage
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_records(self.path)
                if r.get("stage") != stage or r.get("step", 0) <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs) -> None:
        if not state.is_world_process_zero or not logs:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps({"stage": self.stage, "step": state.global_step, **logs}) + "\n")


def plot_stage_losses(step_log: str | Path, out_png: str | Path, title: str) -> Path | None:
    """Loss against step, one panel per stage present in the log; None when nothing was logged."""
    records = [r for r in read_records(step_log) if "loss" in r]
    stages = list(dict.fromkeys(r["stage"] for r in records))
    if not stages:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.5), dpi=120, squeeze=False)
    for ax, stage in zip(axes[0], stages):
        rows = [r for r in records if r["stage"] == stage]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.5)
        ax.set_xlabel("step")
        ax.set_ylabel("1000 x mean layer MSE" if stage == "attention_transfer" else "next-token loss")
        ax.set_yscale("log" if stage == "attention_transfer" else "linear")
        ax.set_title(stage.replace("_", " "))
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.15, top=0.82, wspace=0.3)  # tight_layout is slow
    out_png = Path(out_png)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
