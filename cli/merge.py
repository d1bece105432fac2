"""``petl merge --model BASE --adapter DIR --out DIR``."""
from __future__ import annotations

import click

from petl.errors import one_line_errors


@click.command("merge")
@click.option("--model", "model_name", default=None,
              help="Base model (hub id, folder, or petl/shakespeare-llama). Default: the adapter's base.")
@click.option("--adapter", required=True, type=click.Path(exists=True, file_okay=False), help="peft adapter folder.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for the merged model.")
@click.option("--dtype", default="float32", show_default=True, help="float32, bfloat16 or float16.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the hub (off by default).")
@one_line_errors
def merge(model_name: str | None, adapter: str, out_dir: str, dtype: str, trust_remote_code: bool) -> None:
    """Merge ADAPTER into its base model and save a model plain transformers loads."""
    from petl.merge import base_model_of, merge_adapter
    from petl.models import load_model

    name = model_name or base_model_of(adapter)
    model, tokenizer = load_model(name, adapter=adapter, dtype=dtype, trust_remote_code=trust_remote_code,
                                  device="cpu")
    path = merge_adapter(model, tokenizer, out_dir)
    click.echo(f"merged {adapter} into {name}: {path}")
