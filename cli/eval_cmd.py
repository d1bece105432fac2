"""``petl eval``: perplexity by context length and passkey retrieval from the command line.

Both commands load the model through :func:`petl.models.load_model` (hub id or local directory,
optional peft adapter, safetensors weights only), run the matching :mod:`petl.eval` function, print
a small table and optionally write every number to a JSON file. Heavy imports happen inside the
commands so ``petl eval --help`` stays fast; bad input ends with a one-line ``Error:`` (exit 2).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from petl.errors import one_line_errors

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _int_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers like 1024,2048, got {value!r}")
    if not out or any(v < 2 for v in out):
        raise click.BadParameter(f"expected integers >= 2 like 1024,2048, got {value!r}")
    return out


def _depth_list(ctx: click.Context, param: click.Parameter,
                value: str | None) -> list[float] | None:
    if value is None or value.strip().lower() == "random":
        return None
    try:
        out = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected fractions like 0,0.25,0.5,0.75,1 or 'random', "
                                 f"got {value!r}")
    if not out or any(not 0.0 <= d <= 1.0 for d in out):
        raise click.BadParameter(f"depths must lie in [0, 1], got {value!r}")
    return out


def model_options(fn: Callable) -> Callable:
    """Options shared by every eval command: which model to load and how."""
    options = [
        click.option("--model", "model_name", required=True,
                     help="Hub id, local directory, or petl/shakespeare-llama."),
        click.option("--adapter", type=click.Path(exists=True, file_okay=False), default=None,
                     help="peft adapter directory to apply on top of the model."),
        click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
                     help="Weights dtype."),
        click.option("--device", default=None, help="torch device (default: CUDA if available)."),
        click.option("--context-length", type=click.IntRange(min=2), default=None,
                     help="Extend RoPE to this many tokens at load time (LongLoRA's --context_size;"
                          " an adapter from `petl finetune` already records its own)."),
        click.option("--rope-method", type=click.Choice(["linear", "ntk", "yarn"]),
                     default="linear", show_default=True,
                     help="RoPE scaling method used with --context-length."),
        click.option("--trust-remote-code", is_flag=True, default=False,
                     help="Allow model code from the hub repository."),
        click.option("--json-out", type=click.Path(dir_okay=False), default=None,
                     help="Write all results (and the settings) to this JSON file."),
        click.option("--progress/--no-progress", default=True, show_default=True,
                     help="Show progress bars."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.group("eval")
def eval_group() -> None:
    """Evaluate perplexity by context length and passkey retrieval."""


@eval_group.command("perplexity")
@model_options
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Held-out text (.txt), documents (.jsonl with 'text'), or token ids (.npy, or "
                   "LongLoRA's uint16 .bin).")
@click.option("--lengths", required=True, callback=_int_list,
              help="Comma-separated context lengths in tokens, e.g. 1024,2048,4096.")
@click.option("--mode", type=click.Choice(["sliding", "longlora"]), default="sliding",
              show_default=True, help="sliding: strided windows scoring new tokens; longlora: "
                                      "LongLoRA eval.py protocol.")
@click.option("--stride", type=click.IntRange(min=1), default=None,
              help="Window advance (default: length/2 for sliding, 256 for longlora).")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--max-windows", type=click.IntRange(min=1), default=None,
              help="Evaluate only the first N windows per length.")
@one_line_errors
def perplexity_cmd(model_name: str, adapter: str | None, dtype: str, device: str | None,
                   context_length: int | None, rope_method: str, trust_remote_code: bool,
                   json_out: str | None,
                   progress: bool, data: str, lengths: list[int], mode: str, stride: int | None,
                   batch_size: int, max_windows: int | None) -> None:
    """Perplexity of a model at each context length on a held-out text."""
    from petl.eval import load_eval_tokens, perplexity

    rope_scaling = None if context_length is None else {"target_length": context_length,
                                                        "method": rope_method}
    model, tokenizer = _load(model_name, adapter, dtype, device, rope_scaling, trust_remote_code)
    tokens = load_eval_tokens(Path(data), tokenizer)
    results = perplexity(model, tokens, lengths=lengths, mode=mode, stride=stride,
                         batch_size=batch_size, max_windows=max_windows, progress=progress)
    rows = [[str(n), r["mode"], str(r["stride"]), str(r["windows"]), str(r["tokens"]),
             f"{r['nll']:.4f}", f"{r['ppl']:.3f}"] for n, r in results.items()]
    click.echo(_table(["length", "mode", "stride", "windows", "tokens", "nll", "ppl"], rows))
    _write_json(json_out, {"command": "perplexity", "model": model_name, "adapter": adapter,
                           "data": data, "results": results})


@eval_group.command("passkey")
@model_options
@click.option("--lengths", required=True, callback=_int_list,
              help="Comma-separated prompt lengths in tokens, e.g. 2048,4096,8192.")
@click.option("--depths", callback=_depth_list, default=None,
              help="Key depths as fractions of the filler, e.g. 0,0.25,0.5,0.75,1 "
                   "(default: a uniform random depth per test, as LongLoRA).")
@click.option("--num-tests", type=click.IntRange(min=1), default=10, show_default=True,
              help="Tests per (length, depth).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Test i draws its key (and random depth) from numpy default_rng([seed, i]).")
@one_line_errors
def passkey_cmd(model_name: str, adapter: str | None, dtype: str, device: str | None,
                context_length: int | None, rope_method: str, trust_remote_code: bool,
                json_out: str | None,
                progress: bool, lengths: list[int], depths: list[float] | None, num_tests: int,
                seed: int) -> None:
    """Passkey retrieval accuracy at each prompt length (and key depth)."""
    from petl.eval import passkey

    rope_scaling = None if context_length is None else {"target_length": context_length,
                                                        "method": rope_method}
    model, tokenizer = _load(model_name, adapter, dtype, device, rope_scaling, trust_remote_code)
    results = passkey(model, tokenizer, lengths=lengths, depths=depths, num_tests=num_tests,
                      seed=seed, progress=progress)
    depth_keys = list(next(iter(results["accuracy_by_depth"].values())))
    header = ["length", "tokens", "accuracy"]
    if depths is not None:
        header += [f"d={d:g}" for d in depth_keys]
    rows = []
    for n in lengths:
        row = [str(n), f"{results['prompt_tokens'][n]:.0f}", f"{results['accuracy'][n]:.2f}"]
        if depths is not None:
            row += [f"{results['accuracy_by_depth'][n][d]:.2f}" for d in depth_keys]
        rows.append(row)
    click.echo(_table(header, rows))
    _write_json(json_out, {"command": "passkey", "model": model_name, "adapter": adapter,
                           "results": results})


def _load(model_name: str, adapter: str | None, dtype: str, device: str | None,
          rope_scaling: dict | None, trust_remote_code: bool) -> tuple[Any, Any]:
    from petl.models import load_model

    return load_model(model_name, adapter=adapter, dtype=dtype,
                      trust_remote_code=trust_remote_code, device=device,
                      rope_scaling=rope_scaling)


def _table(header: list[str], rows: list[list[str]]) -> str:
    """Right-aligned plain-text table."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    click.echo(f"wrote {path}")


@eval_group.command("task")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--split", default=None,
              help="Split to score instead of the recipe's task.eval_split (e.g. test, train[80%:]).")
@click.option("--source", default=None,
              help="File, folder or hub id to score instead of the recipe's evaluation data.")
@click.option("--max-samples", type=click.IntRange(min=1), default=None,
              help="Score only the first N records.")
@click.option("--device", default=None, help="torch device (default: CUDA if available).")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None,
              help="Write the metrics (and the settings) to this JSON file.")
@click.option("--predictions", type=click.Path(dir_okay=False), default=None,
              help="Write one JSON line per record (without text when the recipe sets task.phi).")
@one_line_errors
def task_cmd(run_dir: str, split: str | None, source: str | None, max_samples: int | None,
             device: str | None, json_out: str | None, predictions: str | None) -> None:
    """Score a legal / clinical task run (RUN_DIR of `petl finetune`) with its benchmark's metrics.

    LexGLUE micro/macro-F1, accuracy, ROUGE-1/2/L/Lsum or SQuAD exact match / F1, as the
    recipe's data set defines them (see docs/tasks.md).
    """
    from petl.tasks.runner import evaluate_run, write_predictions

    recipe, metrics, rows = evaluate_run(run_dir, split=split, source=source,
                                         max_samples=max_samples, device=device)
    where = recipe.task.eval_source or f"{recipe.task.dataset or recipe.data.source} " \
                                       f"[{recipe.task.eval_split}]"
    click.echo(f"{recipe.name}: {recipe.task.type} on {where}, {len(rows)} records")
    click.echo(_table(["metric", "value"], [[k, f"{v:.4f}"] for k, v in metrics.items()]))
    if predictions:
        write_predictions(Path(predictions), rows)
        click.echo(f"wrote {predictions}")
    _write_json(json_out, {"command": "task", "run": run_dir, "recipe": recipe.name,
                           "task": recipe.task.type, "split": recipe.task.eval_split,
                           "source": recipe.task.eval_source, "records": len(rows),
                           "metrics": metrics})


def _gsm8k_records(data: str, split: str, limit: int | None) -> list[dict[str, Any]]:
    """GSM8K records from a .jsonl/.json file or a hub id (``openai/gsm8k``, config ``main``)."""
    path = Path(data)
    if path.is_file():
        if path.suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8").splitlines()
            rows = [json.loads(line) for line in lines if line.strip()]
        elif path.suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
        else:
            raise click.UsageError(f"--data {data}: expected a .jsonl or .json file with "
                                   "'question' and 'answer', or a hub id like openai/gsm8k")
    elif path.exists():
        raise click.UsageError(f"--data {data} is a folder; pass a .jsonl file or a hub id")
    else:
        from datasets import load_dataset

        config = "main" if data.rstrip("/").endswith("gsm8k") else None
        rows = list(load_dataset(data, config, split=split))
    if not isinstance(rows, list) or not rows:
        raise click.UsageError(f"--data {data}: no records found")
    return rows[:limit] if limit is not None else rows


@eval_group.command("gsm8k")
@model_options
@click.option("--data", default="openai/gsm8k", show_default=True,
              help="GSM8K .jsonl/.json file (question, answer) or hub id (config main).")
@click.option("--split", default="test", show_default=True, help="Hub split to score.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Score only the first N problems.")
@click.option("--template", default="alpaca", show_default=True,
              help="Prompt template the model was fine-tuned with (petl.data.format_sft_prompt).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@one_line_errors
def gsm8k_cmd(model_name: str, adapter: str | None, dtype: str, device: str | None,
              context_length: int | None, rope_method: str, trust_remote_code: bool,
              json_out: str | None, progress: bool, data: str, split: str, limit: int | None,
              template: str, max_new_tokens: int, batch_size: int) -> None:
    """GSM8K accuracy: greedy completions, exact match of the final number."""
    from petl.eval.gsm8k import gsm8k_accuracy

    rope_scaling = None if context_length is None else {"target_length": context_length,
                                                        "method": rope_method}
    records = _gsm8k_records(data, split, limit)
    model, tokenizer = _load(model_name, adapter, dtype, device, rope_scaling, trust_remote_code)
    result = gsm8k_accuracy(model, tokenizer, records, template=template,
                            max_new_tokens=max_new_tokens, batch_size=batch_size,
                            progress=progress)
    click.echo(_table(["problems", "correct", "no_answer", "accuracy"],
                      [[str(result["total"]), str(result["correct"]), str(result["no_answer"]),
                        f"{result['accuracy']:.4f}"]]))
    _write_json(json_out, {"command": "gsm8k", "model": model_name, "adapter": adapter,
                           "data": data, "split": split, "template": template,
                           "max_new_tokens": max_new_tokens, "results": result})
