"""Atomic, resumable checkpoints for ``transformers.Trainer``.

Trainer writes ``checkpoint-N/`` file by file, so a kill during a save leaves a folder that looks
like a checkpoint but is not. :class:`AtomicCheckpointTrainer` lets Trainer write into a staging
folder and renames it into place once everything (adapter, optimizer, scheduler, RNG and trainer
state) is on disk: a ``checkpoint-N`` folder therefore exists only when complete. Each complete
checkpoint also carries a ``petl_complete.json`` marker, so folders written by other tools can be
told apart too.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Optional

from transformers import Trainer

STAGING_DIR = ".staging"
COMPLETE_MARKER = "petl_complete.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class AtomicCheckpointTrainer(Trainer):
    """A Trainer whose checkpoints appear atomically (write to staging, fsync, rename)."""

    _petl_staging = False

    def _get_output_dir(self, trial):  # noqa: D401 - Trainer hook
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING_DIR) if self._petl_staging else run_dir

    def _save_checkpoint(self, model, trial):
        final_root = super()._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        staging_root = os.path.join(final_root, STAGING_DIR)
        if self.args.should_save:
            shutil.rmtree(os.path.join(staging_root, name), ignore_errors=True)
        self._petl_staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._petl_staging = False
        if self.args.should_save:
            staged = Path(staging_root) / name
            (staged / COMPLETE_MARKER).write_text(json.dumps({"global_step": self.state.global_step,
                                                              "time": time.time()}))
            _fsync_tree(staged)
            target = Path(final_root) / name
            if target.exists():  # an older complete save of the same step (re-run): replace it
                shutil.rmtree(target)
            os.replace(staged, target)
            _fsync_dir(Path(final_root))
            if self.args.save_total_limit:
                prune_checkpoints(final_root, keep=self.args.save_total_limit)


def last_complete_checkpoint(run_dir: str | os.PathLike) -> Optional[Path]:
    """The newest ``checkpoint-N`` under ``run_dir`` that carries the completion marker."""
    root = Path(run_dir)
    if not root.is_dir():
        return None
    found = []
    for child in root.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if match and child.is_dir() and (child / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return max(found)[1] if found else None


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest complete checkpoints; returns the deleted folders.

    Done here rather than through Trainer's own rotation, whose signature changed between
    transformers 5.17 and 5.24, and which does not know about the completion marker.
    """
    complete = sorted((int(_CHECKPOINT_RE.match(p.name).group(1)), p) for p in Path(run_dir).iterdir()
                      if _CHECKPOINT_RE.match(p.name) and (p / COMPLETE_MARKER).is_file())
    doomed = [path for _, path in complete[:-keep]] if keep > 0 else []
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
