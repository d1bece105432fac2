"""Recipe schema, overrides and the `petl recipes` commands."""
from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from petl.cli.main import main
from petl.train.recipe_io import (apply_overrides, find_recipe, list_recipes, load_recipe, parse_override,
                                  recipe_from_dict, recipe_header_command, recipe_to_yaml)
from petl.train.schema_types import RecipeError


def test_every_shipped_recipe_validates_and_states_its_command():
    recipes = list_recipes()
    assert "quickstart" in recipes and any(n.startswith("context/") for n in recipes)
    for name, path in recipes.items():
        recipe = load_recipe(name)
        assert recipe.name, name
        verb = "distill" if name.startswith("lawcat/") else "finetune"
        assert recipe_header_command(path) == f"petl {verb} {name}", f"{name}: first lines must say `# Run: ...`"


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "recipe key 'train.lrr' is unknown"),
    ("attention.pattern=s3", "recipe key 'attention.pattern' has value 's3', which is not allowed; choose one of: full, s2, sf"),
    ("train.max_steps=abc", "recipe key 'train.max_steps' has value 'abc'; expected an integer"),
    ("train.max_steps=-3", "recipe key 'train.max_steps' has value -3; must be a positive integer"),
    ("attention.group_ratio=1.5", "recipe key 'attention.group_ratio' has value 1.5; must be in (0, 1]"),
    ("train.gradient_checkpointing=maybe", "recipe key 'train.gradient_checkpointing' has value 'maybe'; expected true or false"),
    ("eval.perplexity_lengths=[256,x]", "recipe key 'eval.perplexity_lengths[1]' has value 'x'; expected an integer"),
    ("bogus.key=1", "recipe key 'bogus' is unknown"),
    ("model.name.sub=1", "'name' is a value, not a section"),
    ("justtext", "is not of the form key.sub=value"),
])
def test_bad_values_fail_with_one_line_naming_key_value_and_allowed(override, message):
    with pytest.raises(RecipeError) as info:
        load_recipe("quickstart", [override])
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_overrides_are_typed_nested_and_accept_lists():
    recipe = load_recipe("quickstart", ["train.lr=1e-4", "eval.perplexity_lengths=[128, 512]",
                                        "adapter.trainable_modules=embed_tokens,norm", "train.gradient_checkpointing=true",
                                        "model.context_length=null", "adapter.options={use_rslora: true}"])
    assert recipe.train.lr == pytest.approx(1e-4) and isinstance(recipe.train.lr, float)
    assert recipe.eval.perplexity_lengths == [128, 512]
    assert recipe.adapter.trainable_modules == ["embed_tokens", "norm"]
    assert recipe.train.gradient_checkpointing is True
    assert recipe.model.context_length is None
    assert recipe.adapter.options == {"use_rslora": True}


def test_parse_override_keeps_text_for_the_schema():
    assert parse_override("a.b=c=d") == (["a", "b"], "c=d")
    assert apply_overrides({"a": {"x": 1}}, ["a.y=2"]) == {"a": {"x": 1, "y": "2"}}


def test_resolved_recipe_round_trips_through_yaml():
    recipe = load_recipe("context/sinklora-llama2-7b-8k", ["train.max_steps=7"])
    again = recipe_from_dict(yaml.safe_load(recipe_to_yaml(recipe)))
    assert again == recipe and again.train.max_steps == 7 and again.attention.pattern == "sf"


def test_unknown_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="no recipe named 'nope'"):
        find_recipe("nope")
    with pytest.raises(RecipeError, match="does not exist"):
        find_recipe(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(bad))
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="must hold a mapping"):
        load_recipe(str(listy))


def test_qlora_with_soka_is_rejected():
    with pytest.raises(RecipeError, match="cannot be combined"):
        load_recipe("quickstart", ["model.quantization=4bit", "adapter.type=soka"])


def test_cli_recipes_ls_show_cp(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["recipes", "ls"])
    assert result.exit_code == 0 and "quickstart" in result.output and "petl finetune quickstart" in result.output
    result = runner.invoke(main, ["recipes", "show", "quickstart"])
    assert result.exit_code == 0 and result.output.startswith("# Run: petl finetune quickstart")
    result = runner.invoke(main, ["recipes", "show", "quickstart", "train.max_steps=3"])
    assert result.exit_code == 0 and yaml.safe_load(result.output)["train"]["max_steps"] == 3
    result = runner.invoke(main, ["recipes", "cp", "quickstart", str(tmp_path)])
    assert result.exit_code == 0 and (tmp_path / "quickstart.yaml").is_file()
    assert load_recipe(str(tmp_path / "quickstart.yaml")) == load_recipe("quickstart")
    result = runner.invoke(main, ["recipes", "cp", "quickstart", str(tmp_path)])
    assert result.exit_code == 2 and "already exists" in result.output


def test_cli_reports_bad_recipe_in_one_line():
    result = CliRunner().invoke(main, ["finetune", "quickstart", "train.lr=fast", "--dry-run"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["Error: recipe key 'train.lr' has value 'fast'; expected a number"]
