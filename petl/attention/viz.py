"""Render an attention pattern as a PNG: one panel per head class (unshifted / shifted heads).

Uses the same rules as training (:func:`petl.attention.patterns.dense_mask`), so the picture is
what the model trains with. Long sequences are max-pooled to at most ``max_pixels`` per side (a
pooled pixel is lit if any token pair in it may attend).
"""
from __future__ import annotations

from pathlib import Path

import torch

from petl.attention.layout import build_layout
from petl.attention.patterns import PatternConfig, dense_mask, head_classes


def pattern_panels(cfg: PatternConfig, length: int, num_heads: int = 2) -> list[tuple[str, torch.Tensor]]:
    """``[(title, mask [L, L] bool)]`` for each head class of one unpadded sample of ``length``."""
    layout = build_layout(1, length, torch.device("cpu"), None, None).with_groups(cfg)
    mask = dense_mask(cfg, num_heads, layout)[0]
    reps, _ = head_classes(cfg, num_heads)
    h0 = cfg.shifted_from(num_heads)
    return [("shifted heads" if h >= h0 else "unshifted heads", mask[h]) for h in reps]


def _pool(mask: torch.Tensor, max_pixels: int) -> torch.Tensor:
    factor = -(-mask.shape[0] // max_pixels)
    if factor == 1:
        return mask.float()
    return torch.nn.functional.max_pool2d(mask.float()[None, None], factor, ceil_mode=True)[0, 0]


def render_pattern(cfg: PatternConfig, length: int, out: str | Path, max_pixels: int = 512) -> Path:
    """Draw ``cfg`` at ``length`` tokens into the PNG ``out``; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if length < 2:
        raise ValueError(f"length must be at least 2 tokens, got {length}")
    panels = pattern_panels(cfg, length)
    group = int(cfg.group_for_length(torch.tensor([length]))[0])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.4), squeeze=False)
    causal = length * (length + 1) / 2
    for ax, (title, mask) in zip(axes[0], panels):
        ax.imshow(_pool(mask, max_pixels).numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest",
                  extent=(0, length, length, 0))
        ax.set_title(f"{title}: {mask.sum().item() / causal:.0%} of causal")
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
    extras = f", {cfg.n_sink} sinks" if cfg.n_sink else ""
    extras += ", bidirectional sinks" if cfg.sink_bidirectional else ""
    extras += ", cyclic" if cfg.cyclic else ""
    fig.suptitle(f"{cfg.pattern.upper()}-Attn, L={length}, G={group}{extras}")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
