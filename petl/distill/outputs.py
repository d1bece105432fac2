"""The output folder of ``petl distill`` and how to load the distilled model back.

Layout (``OUT`` is the recipe's ``output.dir``)::

    OUT/recipe.yaml           the resolved recipe
    OUT/steps.jsonl           one JSON line per logged step of both stages ("stage" key:
                              "attention_transfer" with distill_mse/layer_<i>, or "lora")
    OUT/eval_before.json      the teacher's evaluation (eval section), computed once
    OUT/stage1/checkpoints/   stage-1 checkpoints: LAWCAT weights + optimiser state only
    OUT/stage2/checkpoints/   stage-2 checkpoints: LoRA adapter + optimiser state
    OUT/lawcat/               the converted model after stage 1 (save_lawcat + tokenizer)
    OUT/adapter/              the stage-2 LoRA (peft format) + tokenizer
    OUT/merged/               LoRA merged into the converted model (save_lawcat + tokenizer)
    OUT/metrics.json          written last: the run is finished when it exists
    OUT/loss_curve.png        both stages' losses

``lawcat/``, ``adapter/`` and ``merged/`` are written into a ``.partial`` folder, marked
complete and renamed into place, so a folder with those names is always whole; ``--resume``
uses ``lawcat/`` to know that stage 1 is done.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

STEP_LOG = "steps.jsonl"
STAGE1_DIR = "stage1"
STAGE2_DIR = "stage2"
LAWCAT_DIR = "lawcat"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
METRICS = "metrics.json"
EVAL_BEFORE = "eval_before.json"
DONE_MARKER = "petl_distill_complete.json"
STAGE_NAMES = {1: "attention_transfer", 2: "lora"}

#: entries whose presence means a folder already holds a distillation run
RUN_ENTRIES = (METRICS, STEP_LOG, STAGE1_DIR, STAGE2_DIR, LAWCAT_DIR, ADAPTER_DIR, MERGED_DIR)


def is_complete(folder: str | os.PathLike) -> bool:
    """True when ``folder`` was written by :func:`write_complete` to the end."""
    return (Path(folder) / DONE_MARKER).is_file()


def read_marker(folder: str | os.PathLike) -> dict[str, Any]:
    """The JSON record :func:`write_complete` stored with ``folder`` (empty if none)."""
    path = Path(folder) / DONE_MARKER
    return json.loads(path.read_text()) if path.is_file() else {}


def write_complete(folder: str | os.PathLike, write: Callable[[Path], None],
                   record: dict[str, Any] | None = None) -> Path:
    """Run ``write(tmp)`` into ``folder.partial``, add the marker, then rename it to ``folder``.

    A kill at any moment leaves either no ``folder`` or a complete one (plus a stale
    ``.partial`` that the next call removes).
    """
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    (tmp / DONE_MARKER).write_text(json.dumps({"time": time.time(), **(record or {})}, indent=2, default=str))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def load_distilled(run_dir: str | os.PathLike, **from_pretrained_kwargs):
    """Load the model a ``petl distill`` run produced, and its tokenizer.

    Picks ``merged/`` when present (one ``load_lawcat``), else ``lawcat/`` plus the LoRA in
    ``adapter/`` (``PeftModel.from_pretrained(load_lawcat(lawcat/), adapter/)``), else the
    stage-1 model alone.

    Args:
        run_dir (str): the run's output folder.
        **from_pretrained_kwargs: passed to ``from_pretrained`` (``dtype``, ``device_map``,
            ``attn_implementation``...).

    Returns:
        ``(model, tokenizer)``, the model in eval mode.
    """
    from transformers import AutoTokenizer

    from petl.linear import load_lawcat

    run = Path(run_dir)
    if is_complete(run / MERGED_DIR):
        model = load_lawcat(run / MERGED_DIR, **from_pretrained_kwargs)
        folder = run / MERGED_DIR
    elif is_complete(run / LAWCAT_DIR):
        model = load_lawcat(run / LAWCAT_DIR, **from_pretrained_kwargs)
        folder = run / LAWCAT_DIR
        if is_complete(run / ADAPTER_DIR):
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(run / ADAPTER_DIR))
    else:
        raise FileNotFoundError(f"{run} holds no finished distillation (no complete {LAWCAT_DIR}/ or "
                                f"{MERGED_DIR}/); run `petl distill RECIPE --resume` to finish it")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model.eval(), tokenizer
