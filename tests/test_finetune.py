"""`petl finetune` end to end on a tiny model: every shipped recipe, outputs, resume, merge."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from petl.cli.main import main
from petl.train.checkpointing import COMPLETE_MARKER, last_complete_checkpoint, prune_checkpoints
from petl.train.recipe_io import list_recipes, load_recipe


def shrink(model_dir, data_file, out_dir, sft_file=None, recipe_name="quickstart", **extra) -> list[str]:
    """Overrides that make any shipped causal-LM recipe run in seconds on the tiny model.

    (LAWCAT, audio and legal/clinical recipes have their own shortened runs in their test files.)
    """
    recipe = load_recipe(recipe_name)
    source = sft_file if recipe.data.format == "sft" else data_file
    overrides = {
        "model.name": model_dir, "model.dtype": "float32", "model.context_length": 128,
        "train.precision": "fp32", "train.max_steps": 2, "train.batch_size": 1, "train.grad_accum": 1,
        "train.save_steps": 0, "train.warmup_steps": 0, "train.logging_steps": 1, "data.source": source, "data.data_files": "null", "data.block_size": 128,
        "data.eval_source": data_file, "eval.perplexity_lengths": "[64,128]", "eval.max_windows": 2,
        "eval.passkey_lengths": "[]", "output.dir": out_dir,
    }
    if recipe.data.format == "sft":  # the fixture's records use LongAlpaca's column names
        overrides.update({"data.instruction_field": "instruction", "data.output_field": "output",
                          "data.max_samples": "null"})
    overrides.update(extra)
    return [f"{k}={v}" for k, v in overrides.items()]


FINETUNE_RECIPES = sorted(n for n in list_recipes() if not n.startswith(("lawcat/", "audio/", "legal/", "clinical/")))


@pytest.mark.parametrize("recipe_name", FINETUNE_RECIPES)
def test_every_shipped_recipe_runs_shortened_through_the_cli(recipe_name, tiny_model_dir, text_file, sft_file, tmp_path):
    out = tmp_path / "run"
    args = ["finetune", recipe_name, *shrink(tiny_model_dir, text_file, out, sft_file, recipe_name)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "recipe.yaml").is_file() and (out / "loss_curve.png").is_file()
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["train_loss"] > 0
    assert set(metrics["after"]["perplexity"]) == {"64", "128"} or set(metrics["after"]["perplexity"]) == {64, 128}
    assert load_recipe(str(out / "recipe.yaml")).train.max_steps == 2


def test_lora_plus_trains_embeddings_and_norms_and_saves_them(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["finetune", "quickstart", *shrink(tiny_model_dir, text_file, out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    keys = load_file(str(out / "adapter" / "adapter_model.safetensors")).keys()
    assert any("embed_tokens" in k for k in keys)
    assert any("input_layernorm" in k for k in keys) and any(k.endswith("model.norm.weight") for k in keys)
    assert any("lora_A" in k for k in keys)


def test_output_folder_is_not_overwritten_without_consent(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "run"
    args = ["finetune", "quickstart", *shrink(tiny_model_dir, text_file, out, **{"eval.perplexity_lengths": "[]"})]
    assert CliRunner().invoke(main, args).exit_code == 0
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "already holds a run" in again.output


def test_merge_gives_a_plain_model_with_the_same_logits(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "run"
    args = ["finetune", "quickstart", *shrink(tiny_model_dir, text_file, out, **{"eval.perplexity_lengths": "[]"})]
    assert CliRunner().invoke(main, args, catch_exceptions=False).exit_code == 0
    merged_dir = tmp_path / "merged"
    result = CliRunner().invoke(main, ["merge", "--model", str(tiny_model_dir), "--adapter", str(out / "adapter"),
                                       "--out", str(merged_dir)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    from transformers import AutoModelForCausalLM

    from petl.models import load_model

    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    assert merged.config.rope_parameters["rope_type"] == "linear" and merged.config.rope_parameters["factor"] == 2
    peft_model, _ = load_model(str(tiny_model_dir), adapter=str(out / "adapter"), device="cpu", dtype="float32")
    ids = torch.randint(3, 300, (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert (got - expected).abs().max().item() < 1e-4
    assert not torch.allclose(expected, AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))(input_ids=ids).logits)


def test_incomplete_checkpoints_are_never_resumed_from(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / COMPLETE_MARKER).write_text("{}")
    (tmp_path / ".staging" / "checkpoint-8").mkdir(parents=True)
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-4"
    assert [p.name for p in prune_checkpoints(tmp_path, keep=1)] == ["checkpoint-2"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "petl.cli.main", *args]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "steps.jsonl").read_text().splitlines()) if "loss" in r}


@pytest.mark.slow
def test_killed_run_resumes_with_the_same_losses(tiny_model_dir, text_file, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    common = {"train.max_steps": 30, "train.save_steps": 3, "train.save_total_limit": 2,
              "eval.perplexity_lengths": "[]", "eval.before_training": "false", "train.lr": "1e-3",
              "train.batch_size": 2}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_cli("finetune", "quickstart", *shrink(tiny_model_dir, text_file, straight, **common)),
                   env=env, check=True, capture_output=True)
    proc = subprocess.Popen(_cli("finetune", "quickstart", *shrink(tiny_model_dir, text_file, killed, **common)),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if last_complete_checkpoint(killed / "checkpoints") is not None:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed; make it longer"
    assert not (killed / "metrics.json").exists()
    resumed = subprocess.run(_cli("finetune", "quickstart", *shrink(tiny_model_dir, text_file, killed, **common),
                                  "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    expected, got = _losses(straight), _losses(killed)
    assert sorted(got) == sorted(expected) == list(range(1, 31))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-5), step
