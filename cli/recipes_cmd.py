"""``petl recipes ls | show NAME | cp NAME PATH``."""
from __future__ import annotations

import shutil
from pathlib import Path

import click

from petl.errors import one_line_errors


@click.group("recipes")
def recipes() -> None:
    """List, show and copy published recipes."""


@recipes.command("ls")
def list_command() -> None:
    """List the shipped recipes with the command that runs each."""
    from petl.train.recipe_io import list_recipes, recipe_header_command

    rows = [(name, recipe_header_command(path) or "") for name, path in list_recipes().items()]
    width = max((len(n) for n, _ in rows), default=4)
    click.echo(f"{'RECIPE':<{width}}  COMMAND")
    for name, command in rows:
        click.echo(f"{name:<{width}}  {command}")


@recipes.command("show")
@click.argument("name")
@click.argument("overrides", nargs=-1)
@click.option("--resolved", is_flag=True, help="Print every field with defaults filled in, after overrides.")
@one_line_errors
def show_command(name: str, overrides: tuple[str, ...], resolved: bool) -> None:
    """Print recipe NAME (a shipped name or a YAML path), validated."""
    from petl.train.recipe_io import find_recipe, load_recipe, recipe_to_yaml

    recipe = load_recipe(name, overrides)  # validates even when printing the file as written
    click.echo(recipe_to_yaml(recipe) if resolved or overrides else find_recipe(name).read_text(), nl=False)


@recipes.command("cp")
@click.argument("name")
@click.argument("path", type=click.Path(dir_okay=True, path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite PATH if it exists.")
@one_line_errors
def copy_command(name: str, path: Path, force: bool) -> None:
    """Copy recipe NAME to PATH (a file, or a folder to copy into) for editing."""
    from petl.train.recipe_io import find_recipe

    source = find_recipe(name)
    target = path / source.name if path.is_dir() else path
    if target.exists() and not force:
        raise FileNotFoundError(f"{target} already exists; pass --force to overwrite it") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    from petl.train.recipe_io import recipe_header_command

    verb = (recipe_header_command(source) or "petl finetune").split()[1]
    click.echo(f"copied {name} to {target}; run it with: petl {verb} {target}")
