"""Finding, reading, overriding and writing recipes.

Shipped recipes live in the repository's ``recipes/`` folder, installed as ``petl.recipes``
package data. A recipe is named by its path under that folder without ``.yaml``
(``context/longlora-llama2-7b-8k``), by its file stem when that is unique (``quickstart``), or
by a path to any YAML file.
"""
from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import yaml

from petl.train.recipe import Recipe
from petl.train.schema_types import RecipeError, from_dict, to_dict


def recipes_root() -> Path:
    """Folder holding the shipped recipes (works for regular and editable installs)."""
    return Path(str(resources.files("petl.recipes")))


def list_recipes() -> dict[str, Path]:
    """Shipped recipe names -> file paths, sorted by name."""
    root = recipes_root()
    found = {p.relative_to(root).with_suffix("").as_posix(): p for p in root.rglob("*.yaml")}
    return dict(sorted(found.items()))


def find_recipe(name_or_path: str) -> Path:
    """Resolve a recipe name or a YAML path to a file, with a one-line error when not found."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist; check the path or run "
                              "`petl recipes ls` for the shipped recipes")
        return path
    shipped = list_recipes()
    key = name_or_path.strip("/").removesuffix(".yaml")
    if key in shipped:
        return shipped[key]
    by_stem = [p for n, p in shipped.items() if n.rsplit("/", 1)[-1] == key]
    if len(by_stem) == 1:
        return by_stem[0]
    if len(by_stem) > 1:
        names = [n for n in shipped if n.rsplit("/", 1)[-1] == key]
        raise RecipeError(f"recipe name {key!r} is ambiguous; use one of: {', '.join(names)}")
    close = [n for n in shipped if key in n][:5]
    hint = f" (did you mean: {', '.join(close)}?)" if close else "; run `petl recipes ls` to list them"
    raise RecipeError(f"no recipe named {key!r}{hint}")


def read_recipe_dict(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"recipe file {str(path)!r} is not valid YAML{where}: "
                          f"{getattr(exc, 'problem', exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe file {str(path)!r} must hold a mapping of sections, not {type(data).__name__}")
    data.setdefault("name", path.stem)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-4"`` -> (["train", "lr"], "1e-4"); values are typed later by the schema.

    YAML flow syntax is accepted for values (``eval.perplexity_lengths=[256,1024]``,
    ``adapter.options={energy: 0.9}``); plain text stays a string so that the schema can convert it.
    """
    if "=" not in text:
        raise RecipeError(f"override {text!r} is not of the form key.sub=value (e.g. train.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {text!r} has an empty key; write it as section.key=value")
    raw = raw.strip()
    if raw[:1] in ("[", "{"):
        try:
            value: Any = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise RecipeError(f"override {text!r}: value {raw!r} is not valid YAML flow syntax") from None
    else:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``key.sub=value`` override applied (nested)."""
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"override {text!r}: '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    return from_dict(Recipe, data)


def load_recipe(name_or_path: str, overrides: Iterable[str] = ()) -> Recipe:
    """Find, read, override and validate a recipe. Raises :class:`RecipeError` with one line."""
    path = find_recipe(name_or_path)
    return recipe_from_dict(apply_overrides(read_recipe_dict(path), overrides))


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False, default_flow_style=None)


def recipe_header_command(path: Path) -> str | None:
    """The ``# Run: ...`` line every shipped recipe starts with (None if absent)."""
    for line in path.read_text().splitlines()[:5]:
        if line.lstrip("# ").lower().startswith("run:"):
            return line.split(":", 1)[1].strip()
    return None
