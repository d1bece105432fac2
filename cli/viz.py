"""`petl viz`: draw training-time attention patterns as PNG images."""
from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def viz() -> None:
    """Draw attention patterns (S2 / SF) as PNG images."""


@viz.command("attention")
@click.option("--pattern", type=click.Choice(["s2", "sf"]), required=True, help="S2-Attn (LongLoRA) or SF-Attn (SinkLoRA).")
@click.option("--length", type=click.IntRange(min=2), required=True, help="Sequence length in tokens.")
@click.option("--group-ratio", type=float, default=0.25, show_default=True, help="Group size as a fraction of the length.")
@click.option("--group-size", type=int, default=None, help="Fixed even group size (overrides --group-ratio).")
@click.option("--n-sink", type=int, default=None, help="Sink tokens (sf only). [default: 4]")
@click.option("--cyclic", is_flag=True, help="LongLoRA's roll semantics (s2 only).")
@click.option("--shift-head-fraction", type=float, default=0.5, show_default=True, help="Fraction of shifted heads.")
@click.option("--bidirectional-sinks", is_flag=True, help="Sinks also attend to later tokens (sf only; leaks).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="PNG path. [default: <pattern>_mask.png]")
def attention(pattern: str, length: int, group_ratio: float, group_size: int | None, n_sink: int | None,
              cyclic: bool, shift_head_fraction: float, bidirectional_sinks: bool, out: str | None) -> None:
    """Write a PNG of the pattern, one panel per head half (unshifted / shifted)."""
    import warnings

    from petl.attention.patterns import PatternConfig
    from petl.attention.viz import render_pattern

    params = dict(group_ratio=group_ratio, group_size=group_size, shift_head_fraction=shift_head_fraction)
    if cyclic:
        params["cyclic"] = True
    if n_sink is not None:
        params["n_sink"] = n_sink
    if bidirectional_sinks:
        params["sink_bidirectional"] = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the bidirectional-sink warning is for training
            cfg = PatternConfig.from_params(pattern, **params)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    path = render_pattern(cfg, length, out or f"{pattern}_mask.png")
    click.echo(f"wrote {path}")
