"""Every shipped audio recipe through the real CLI (shortened, on a tiny AST and synthetic clips), and
the runner's protocol: best-on-validation selection, per-fold metrics, resume, errors."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from petl.cli.main import main
from petl.train.recipe_io import list_recipes, load_recipe
from petl.train.schema_types import RecipeError

AUDIO_RECIPES = sorted(n for n in list_recipes() if n.startswith("audio/"))
LAYOUT = {"esc50": "esc50", "us8k": "urbansound8k", "gsc": "speech_commands", "fsc": "fluent_speech_commands",
          "keywords": "folder"}
PAPER_SETS = ("esc50", "us8k", "gsc", "fsc")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from petl.audio.synthetic import save_tiny_ast, write_dataset

    root = tmp_path_factory.mktemp("audio_recipes")
    data = {layout: write_dataset(root / layout, layout, num_classes=2, per_group=1, seconds=0.4)
            for layout in (*LAYOUT.values(), "folder")}
    return {"model": save_tiny_ast(root / "tiny_ast", hidden_size=16, num_heads=2, max_length=1024), "data": data,
            "root": root}


def _finetune(*args: str):
    result = CliRunner().invoke(main, ["finetune", *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_audio_recipes_cover_every_method_and_dataset():
    shipped = {n.split("/")[1] for n in AUDIO_RECIPES}
    for prefix in PAPER_SETS:
        for method in ("conformer", "bottleneck-pfeiffer", "bottleneck-houlsby", "lora", "prefix", "prompt-deep",
                       "bitfit", "linear"):
            assert f"{prefix}-{method}" in shipped


@pytest.mark.parametrize("name", AUDIO_RECIPES)
def test_shipped_audio_recipe_runs_shortened(name, assets, tmp_path):
    recipe = load_recipe(name)  # the shipped values validate, and keep the paper's optimiser settings
    assert recipe.task.type == "audio_classification" and recipe.train.weight_decay == 0.1
    assert recipe.audio.adam_epsilon == 1e-6 and recipe.train.lr_scheduler == "cosine"
    layout = LAYOUT[name.split("/")[1].split("-")[0]]
    if layout == "folder":  # the keyword recipe's model is the tiny AST its benchmark pretrains
        assert recipe.model.name == "runs/keywords/pretrained-ast"
    overrides = [f"model.name={assets['model']}", f"audio.source={assets['data'][layout]}", "audio.epochs=1",
                 "audio.max_frames=48", "train.batch_size=4", f"output.dir={tmp_path / 'run'}"]
    if recipe.audio.protocol == "rotation":
        overrides.append("audio.folds=[1]")
    _finetune(name, *overrides)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    run = metrics["runs"][0]
    assert 0.0 <= run["test_accuracy"] <= 1.0 and run["validation_accuracy"] is not None
    assert run["trainable_parameters"] > 0 and run["max_frames"] == 48
    fold = tmp_path / "run" / (run["run"] or "")
    assert (fold / "adapter" / "adapter_model.safetensors").is_file() and (fold / "steps.jsonl").is_file()


def test_best_validation_epoch_is_the_one_tested(assets, tmp_path):
    """Selection uses validation only; the reported test accuracy is that of the restored best adapter."""
    from peft import PeftModel

    from petl.audio.backbone import load_ast_classifier
    from petl.audio.clips import ClipDataset, collate_clips
    from petl.audio.datasets import load_corpus
    from petl.audio.features import AstFeaturizer

    out = tmp_path / "best"
    _finetune(str(_recipe_file(tmp_path, assets)), f"output.dir={out}")
    run = json.loads((out / "metrics.json").read_text())["runs"][0]
    history = run["validation_history"]
    assert [step for step, _ in history] == [2, 4, 6, 8]  # once per epoch, on the validation split
    best_step, best_value = max(history, key=lambda h: (h[1], -h[0]))
    assert run["selected_step"] == best_step and run["validation_accuracy"] == best_value
    corpus = load_corpus("folder", str(assets["data"]["folder"]))
    model = load_ast_classifier(str(assets["model"]), corpus.label_names, max_frames=48)
    model = PeftModel.from_pretrained(model, str(out / "adapter")).eval()
    test = ClipDataset([e for e in corpus.examples if e.group == "test"], AstFeaturizer(max_frames=48))
    batch = collate_clips([test[i] for i in range(len(test))])
    with torch.no_grad():
        predicted = model(input_values=batch["input_values"]).logits.argmax(-1)
    assert float((predicted == batch["labels"]).float().mean()) == pytest.approx(run["test_accuracy"])
    best_saved = json.loads((out / "best" / "best.json").read_text())
    assert best_saved["step"] == best_step


def _recipe_file(tmp_path, assets, **audio):
    import yaml

    spec = {"name": "tones", "task": {"type": "audio_classification"}, "model": {"name": str(assets["model"])},
            "adapter": {"type": "audio", "options": {"method": "bottleneck", "reduction_rate": 4}},
            "audio": {"dataset": "folder", "source": str(assets["data"]["folder"]), "max_frames": 48,
                      "epochs": 4, "cache_features": True, **audio},
            "train": {"batch_size": 1, "lr": 0.05, "seed": 3}}
    path = tmp_path / "tones.yaml"
    path.write_text("# Run: petl finetune tones.yaml\n" + yaml.safe_dump(spec))
    return path


def test_rotation_resume_reuses_finished_folds(assets, tmp_path):
    out = tmp_path / "esc"
    common = ["audio/esc50-linear", f"model.name={assets['model']}", f"audio.source={assets['data']['esc50']}",
              "audio.epochs=1", "audio.max_frames=32", f"output.dir={out}"]
    _finetune(*common, "audio.folds=[2]")
    first = (out / "fold-2" / "metrics.json").read_text()
    result = _finetune(*common, "audio.folds=[2,3]", "--resume")
    assert "fold-2: finished earlier" in result.output
    assert (out / "fold-2" / "metrics.json").read_text() == first
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["run"] for r in metrics["runs"]] == ["fold-2", "fold-3"]
    accs = [r["test_accuracy"] for r in metrics["runs"]]
    assert metrics["test_accuracy"]["mean"] == pytest.approx(sum(accs) / 2)
    again = CliRunner().invoke(main, ["finetune", *common, "audio.folds=[2]"])
    assert again.exit_code == 2 and "already holds a run" in again.output


@pytest.mark.parametrize(("overrides", "message"), [
    (["adapter.type=lora"], "use adapter.type 'audio'"),
    (["adapter.options={method: prompt, pooling: cls}"], "set the pooling with audio.pooling"),
    (["adapter.options={method: magic}"], "adapter.options: AudioAdapterConfig.method='magic'"),
    (["audio.protocol=rotation", "audio.val_folds=0"], "best_val needs validation folds"),
    (["audio.max_frames=8"], "must be >= 16"),
    (["task.options={x: 1}"], "not used by audio_classification"),
])
def test_bad_audio_recipes_fail_in_one_line(assets, tmp_path, overrides, message):
    result = CliRunner().invoke(main, ["finetune", str(_recipe_file(tmp_path, assets)), *overrides,
                                       f"output.dir={tmp_path / 'x'}"])
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_official_split_without_validation_needs_last_selection(assets, tmp_path):
    import shutil

    data = tmp_path / "noval"
    shutil.copytree(assets["data"]["folder"], data)
    shutil.rmtree(data / "validation")
    recipe = str(_recipe_file(tmp_path, assets, source=str(data)))
    result = CliRunner().invoke(main, ["finetune", recipe, f"output.dir={tmp_path / 'a'}"])
    assert result.exit_code == 2 and "audio.selection=last" in result.output
    _finetune(recipe, "audio.selection=last", "audio.epochs=1", f"output.dir={tmp_path / 'b'}")
    run = json.loads((tmp_path / "b" / "metrics.json").read_text())["runs"][0]
    assert run["selection"] == "last" and run["validation_accuracy"] is None


def test_recipe_schema_rejects_unknown_audio_keys():
    with pytest.raises(RecipeError, match="recipe key 'audio.sample_rte' is unknown"):
        load_recipe("audio/esc50-conformer", ["audio.sample_rte=8000"])
