"""``petl finetune RECIPE [key.sub=value ...] [--resume]``."""
from __future__ import annotations

import click

from petl.errors import one_line_errors


@click.command("finetune", context_settings={"ignore_unknown_options": False})
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@click.option("--resume", is_flag=True, help="Continue a killed run from its newest complete checkpoint.")
@click.option("--dry-run", is_flag=True, help="Validate the recipe and print it resolved; load nothing.")
@one_line_errors
def finetune(recipe: str, overrides: tuple[str, ...], resume: bool, dry_run: bool) -> None:
    """Fine-tune with RECIPE (a shipped name such as `quickstart`, or a YAML path).

    OVERRIDES change recipe fields, e.g. `train.max_steps=20 eval.perplexity_lengths=[256,1024]`.
    Several processes: `accelerate launch -m petl.cli.main finetune RECIPE ...`.
    """
    from petl.train.recipe_io import load_recipe, recipe_to_yaml

    loaded = load_recipe(recipe, overrides)
    if dry_run:
        click.echo(recipe_to_yaml(loaded), nl=False)
        return
    from petl.train.runner import run_recipe

    run_recipe(loaded, resume=resume)
