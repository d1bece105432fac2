"""`petl distill` end to end on a tiny Llama: shipped recipes, outputs, reload, resume, errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import TrainerCallback

from petl.cli.main import main
from petl.distill import outputs as layout
from petl.train.recipe_io import list_recipes, load_recipe, recipe_header_command

LAWCAT_RECIPES = sorted(n for n in list_recipes() if n.startswith("lawcat/"))


def shrink(model_dir, data_file, out_dir, **extra) -> list[str]:
    """Overrides that make any lawcat recipe run in seconds on the tiny model."""
    overrides = {
        "model.name": model_dir, "model.dtype": "float32", "train.precision": "fp32",
        "data.source": data_file, "data.data_files": "null", "data.max_samples": "null", "data.block_size": 48,
        "data.eval_source": data_file, "train.batch_size": 2, "train.grad_accum": 1, "train.logging_steps": 1,
        "train.save_steps": 2,
        "distill.stage1.steps": 3, "distill.stage2.steps": 3, "distill.passkey_samples": 0,
        "distill.backend": "chunked", "distill.chunk_size": 16, "distill.feature_dim": "null",
        "eval.perplexity_lengths": "[32]", "eval.max_windows": 2, "eval.passkey_lengths": "[]",
        "output.dir": out_dir,
    }
    overrides.update(extra)
    return [f"{k}={v}" for k, v in overrides.items()]


def distill(*args: str):
    result = CliRunner().invoke(main, ["distill", *map(str, args)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def merged_state(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / layout.MERGED_DIR / "model.safetensors"))


def loss_records(out: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (out / layout.STEP_LOG).read_text().splitlines()]
    return [(r["stage"], r["step"], round(r["loss"], 5)) for r in rows if "loss" in r]


def test_lawcat_recipes_validate_and_state_their_command():
    assert {"lawcat/shakespeare", "lawcat/mistral-7b-passkey", "lawcat/llama-3.2-1b"} <= set(LAWCAT_RECIPES)
    from petl.distill.runner import check_distill_recipe

    for name in LAWCAT_RECIPES:
        recipe = load_recipe(name)
        assert recipe_header_command(list_recipes()[name]) == f"petl distill {name}"
        check_distill_recipe(recipe)
        assert recipe.distill.stage1.steps > 0 and recipe.distill.stage2.steps > 0
    paper = load_recipe("lawcat/mistral-7b-passkey")
    assert paper.data.block_size == 1024 and paper.distill.stage1.lr == pytest.approx(1e-2)
    assert paper.distill.stage1.loss_scale == 1000 and paper.distill.stage2.lora_r == 8
    assert paper.distill.lawcat_config().conv_size == 4 and paper.distill.window_size == 0


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, text_file, tmp_path_factory):
    """The shortened shakespeare recipe run once without interruption (reference for resumes)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    distill("lawcat/shakespeare", *shrink(tiny_model_dir, text_file, out))
    return out


@pytest.mark.parametrize("recipe_name", LAWCAT_RECIPES)
def test_every_lawcat_recipe_runs_shortened_and_reloads(recipe_name, request, tiny_model_dir, text_file, tmp_path):
    from peft import PeftModel

    from petl.linear import LawcatAttention, load_lawcat

    if recipe_name == "lawcat/shakespeare":
        out = request.getfixturevalue("uninterrupted")
    else:
        out = tmp_path / "run"
        distill(recipe_name, *shrink(tiny_model_dir, text_file, out))
    for folder in (layout.LAWCAT_DIR, layout.ADAPTER_DIR, layout.MERGED_DIR):
        assert layout.is_complete(out / folder), folder
    records = [json.loads(line) for line in (out / layout.STEP_LOG).read_text().splitlines()]
    stage1 = [r for r in records if r["stage"] == "attention_transfer" and "loss" in r]
    assert [r["step"] for r in stage1] == [1, 2, 3]
    for r in stage1:  # the logged loss is 1000 x the mean of the per-layer MSEs (2 layers)
        mses = [r["distill_mse/layer_0"], r["distill_mse/layer_1"]]
        assert r["loss"] == pytest.approx(1000 * sum(mses) / 2, rel=1e-4)
    assert [r["step"] for r in records if r["stage"] == "lora" and "loss" in r] == [1, 2, 3]
    metrics = json.loads((out / layout.METRICS).read_text())
    assert set(metrics["before"]["perplexity"]) == set(metrics["after"]["perplexity"]) == {"32"}
    assert (out / "loss_curve.png").is_file()

    ids = torch.randint(4, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    merged, _ = layout.load_distilled(out)
    assert sum(isinstance(m, LawcatAttention) for m in merged.modules()) == 2
    unmerged = PeftModel.from_pretrained(load_lawcat(out / layout.LAWCAT_DIR), str(out / layout.ADAPTER_DIR)).eval()
    with torch.no_grad():
        a, b = merged(ids).logits, unmerged(ids).logits
        teacher = load_lawcat(out / layout.LAWCAT_DIR).eval()(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(a, teacher, atol=1e-4)  # stage 2 changed the model


class Interrupt(TrainerCallback):
    """Kill the run (an exception, as a crash would) after step ``at`` of stage ``stage``."""

    class Killed(RuntimeError):
        pass

    def __init__(self, stage: int, at: int) -> None:
        self.stage, self.at = stage, at

    def on_step_end(self, args, state, control, **kwargs):
        if f"stage{self.stage}" in Path(args.output_dir).parts and state.global_step == self.at:
            raise self.Killed(f"killed at stage {self.stage} step {self.at}")


def test_stage1_then_resume_into_stage2_matches_uninterrupted(uninterrupted, tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "run"
    args = shrink(tiny_model_dir, text_file, out, **{"eval.perplexity_lengths": "[]"})
    distill("lawcat/shakespeare", *args, "--stop-after-stage1")
    assert layout.is_complete(out / layout.LAWCAT_DIR) and not (out / layout.ADAPTER_DIR).exists()
    distill("lawcat/shakespeare", *args, "--resume")
    assert loss_records(out) == loss_records(uninterrupted)
    want, got = merged_state(uninterrupted), merged_state(out)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_killed_in_each_stage_resumes_from_its_checkpoint(uninterrupted, tiny_model_dir, text_file, tmp_path):
    from petl.distill.checkpoint import LAWCAT_WEIGHTS
    from petl.distill.runner import run_distill

    out = tmp_path / "run"
    args = shrink(tiny_model_dir, text_file, out)
    recipe = load_recipe("lawcat/shakespeare", args)
    with pytest.raises(Interrupt.Killed):  # killed after step 3 of stage 1 (checkpoint at 2)
        run_distill(recipe, callbacks=[Interrupt(1, 3)])
    stage1 = out / "stage1" / "checkpoints"
    assert (stage1 / "checkpoint-2").is_dir() and not (stage1 / "checkpoint-3").exists()
    files = {p.name for p in (stage1 / "checkpoint-2").iterdir()}
    assert LAWCAT_WEIGHTS in files and "model.safetensors" not in files  # not a copy of the teacher
    again = CliRunner().invoke(main, ["distill", "lawcat/shakespeare", *args])
    assert again.exit_code == 2 and "already holds a run" in again.output
    with pytest.raises(Interrupt.Killed):  # resumed, then killed after step 3 of stage 2
        run_distill(recipe, resume=True, callbacks=[Interrupt(2, 3)])
    assert layout.is_complete(out / layout.LAWCAT_DIR) and not (out / layout.ADAPTER_DIR).exists()
    assert (out / "stage2" / "checkpoints" / "checkpoint-2").is_dir()
    result = distill("lawcat/shakespeare", *args, "--resume")
    assert "stage 1 already done" in result.output and "stage 2: resuming from" in result.output
    assert loss_records(out) == loss_records(uninterrupted)
    want, got = merged_state(uninterrupted), merged_state(out)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert json.loads((out / layout.METRICS).read_text())["after"]["perplexity"]


@pytest.mark.parametrize("override, message", [
    ("attention.pattern=s2", "set attention.pattern=full"),
    ("data.restart_positions=true", "'data.restart_positions' must be false"),
    ("distill.stage2.lora_r=0", "'distill.stage2.lora_r' has value 0"),
    ("distill.backend=cuda", "'distill.backend' has value 'cuda', which is not allowed"),
    ("distill.stage1.steps=0", None),
])
def test_bad_distill_recipes_fail_with_one_line(override, message):
    result = CliRunner().invoke(main, ["distill", "lawcat/shakespeare", override, "distill.stage2.steps=0",
                                       "--dry-run"])
    if message is None:  # both stages at 0 steps
        message = "stage1.steps and stage2.steps are both 0"
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_passkey_training_samples_hold_the_key_and_fit_the_block(tiny_model_dir):
    from petl.distill.passkey_data import passkey_training_examples
    from petl.eval.passkey import _draw
    from petl.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    rows = passkey_training_examples(tok, 4, 256, seed=0)
    eval_keys = {_draw(0, i, "random")[0] for i in range(4)}
    for row in rows:
        assert 246 <= len(row["input_ids"]) <= 256 and row["labels"] == row["input_ids"]
        text = tok.decode(row["input_ids"], skip_special_tokens=True)
        key = text.rsplit("The pass key is", 1)[1].strip()
        assert key.isdigit() and f"The pass key is {key}. Remember it." in text
        assert int(key) not in eval_keys
