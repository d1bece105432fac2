"""``petl generate --model M --prompt TEXT [--h2o-heavy N --h2o-recent N]``: text generation.

With an ``--h2o-*`` budget the KV cache is an :class:`petl.cache.H2OCache` (heavy hitters plus a
recent window per head), so memory stays bounded however long the output; without one it is
transformers' ordinary full cache.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from petl.errors import one_line_errors


def _h2o_budget(heavy: int | None, recent: int | None, heavy_ratio: float | None,
                recent_ratio: float | None) -> dict | None:
    """The H2OCache arguments the flags ask for, or None for a full cache."""
    given = {"--h2o-heavy": heavy, "--h2o-recent": recent, "--h2o-heavy-ratio": heavy_ratio,
             "--h2o-recent-ratio": recent_ratio}
    if all(v is None for v in given.values()):
        return None
    if heavy is None and heavy_ratio is None or recent is None and recent_ratio is None:
        missing = "--h2o-heavy/--h2o-heavy-ratio" if heavy is None and heavy_ratio is None \
            else "--h2o-recent/--h2o-recent-ratio"
        raise click.UsageError(f"an H2O budget needs both halves: add {missing} "
                               "(e.g. --h2o-heavy 64 --h2o-recent 448)")
    return dict(heavy=heavy, recent=recent, heavy_ratio=heavy_ratio, recent_ratio=recent_ratio)


def _prompts(prompt: tuple[str, ...], prompt_file: str | None) -> list[str]:
    if prompt and prompt_file:
        raise click.UsageError("give --prompt or --prompt-file, not both")
    if prompt_file:
        text = Path(prompt_file).read_text(encoding="utf-8")
        if not text.strip():
            raise click.UsageError(f"--prompt-file {prompt_file} is empty; put the prompt text in it")
        return [text]
    if not prompt:
        raise click.UsageError("no prompt: pass --prompt TEXT (repeatable for a batch) or --prompt-file F")
    return list(prompt)


@click.command("generate")
@click.option("--model", "model_name", required=True, help="Hub id, local folder, or petl/shakespeare-llama.")
@click.option("--adapter", default=None, type=click.Path(exists=True, file_okay=False),
              help="peft adapter folder to apply to the model.")
@click.option("--prompt", multiple=True, help="Prompt text; repeat for a left-padded batch.")
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False), help="Read one prompt from a file.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--h2o-heavy", type=int, default=None, help="H2O: heavy-hitter KV entries per head.")
@click.option("--h2o-recent", type=int, default=None, help="H2O: recent-window KV entries per head.")
@click.option("--h2o-heavy-ratio", type=float, default=None, help="H2O: heavy entries as a fraction of the prompt.")
@click.option("--h2o-recent-ratio", type=float, default=None, help="H2O: recent entries as a fraction of the prompt.")
@click.option("--greedy/--sample", default=True, show_default=True, help="Greedy decoding or sampling.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--dtype", default="auto", show_default=True, help="auto, float32, bfloat16 or float16.")
@click.option("--device", default=None, help="cuda, cpu, ... Default: cuda when available.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the hub (off by default).")
@one_line_errors
def generate(model_name: str, adapter: str | None, prompt: tuple[str, ...], prompt_file: str | None,
             max_new_tokens: int, h2o_heavy: int | None, h2o_recent: int | None,
             h2o_heavy_ratio: float | None, h2o_recent_ratio: float | None, greedy: bool,
             temperature: float, top_p: float, seed: int, dtype: str, device: str | None,
             trust_remote_code: bool) -> None:
    """Generate a continuation of a prompt, optionally with an H2O-compressed KV cache."""
    budget = _h2o_budget(h2o_heavy, h2o_recent, h2o_heavy_ratio, h2o_recent_ratio)
    prompts = _prompts(prompt, prompt_file)

    import torch

    from petl.cache import H2OCache, enable_h2o, generate_cache_kwargs
    from petl.models import load_model

    cache = H2OCache(**budget) if budget is not None else None  # validates before loading
    model, tokenizer = load_model(model_name, adapter=adapter, dtype=dtype,
                                  trust_remote_code=trust_remote_code, device=device)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    sampling = {} if greedy else dict(temperature=temperature, top_p=top_p)
    cache_kwargs = {}
    if cache is not None:
        enable_h2o(model)
        cache_kwargs = generate_cache_kwargs(cache)
    torch.manual_seed(seed)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=not greedy,
                                pad_token_id=tokenizer.pad_token_id, **sampling, **cache_kwargs)
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            click.echo(f"### {i}")
        click.echo(text)
    if cache is not None:
        layer = cache.layers[0]
        click.echo(f"h2o: heavy={layer.heavy} recent={layer.recent} per head; kept "
                   f"{max(cache.kept_lengths())} of {cache.get_seq_length()} tokens; "
                   f"KV cache {cache.kv_bytes() / 2**20:.2f} MiB", file=sys.stderr)
