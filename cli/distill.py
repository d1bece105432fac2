"""``petl distill RECIPE [key.sub=value ...] [--resume] [--stop-after-stage1]``."""
from __future__ import annotations

import click

from petl.errors import one_line_errors


@click.command("distill")
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@click.option("--resume", is_flag=True,
              help="Continue a killed run: the stage that was running, from its newest complete checkpoint.")
@click.option("--stop-after-stage1", is_flag=True,
              help="Stop once the attention-transfer model is saved; --resume later runs stage 2.")
@click.option("--dry-run", is_flag=True, help="Validate the recipe and print it resolved; load nothing.")
@one_line_errors
def distill(recipe: str, overrides: tuple[str, ...], resume: bool, stop_after_stage1: bool, dry_run: bool) -> None:
    """LAWCAT: linearise a pretrained transformer with RECIPE (e.g. `lawcat/shakespeare`).

    Stage 1 trains the LAWCAT layers to reproduce each softmax attention output of the frozen
    teacher (per-layer MSE); stage 2 trains LoRA on q, k, v, o with next-token loss. OVERRIDES
    change recipe fields, e.g. `distill.stage1.steps=50 distill.stage2.lora_r=16`. The output
    folder holds the converted model (lawcat/), the LoRA (adapter/), the merged model
    (merged/), steps.jsonl and metrics.json; see docs/lawcat.md for reloading.
    """
    from petl.train.recipe_io import load_recipe, recipe_to_yaml

    loaded = load_recipe(recipe, overrides)
    from petl.distill.runner import check_distill_recipe

    check_distill_recipe(loaded)
    if dry_run:
        click.echo(recipe_to_yaml(loaded), nl=False)
        return
    from petl.distill.runner import run_distill

    run_distill(loaded, resume=resume, stop_after=1 if stop_after_stage1 else None)
