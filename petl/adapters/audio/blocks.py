"""Adapter blocks of PETL-AST: bottleneck, Conformer convolution and ConvPass (2-D).

Each block maps a token sequence ``[B, S, D] -> [B, S, D]``. The tuner layers in ``layer.py`` decide
where a block sits (parallel / sequential, before / after a sub-layer); the blocks only compute.

Inits. ``faithful=False`` (petl's default) starts every block as the zero function, so an adapted
model equals its base model at step 0: the last projection is zero. ``faithful=True`` reproduces
the reference code's *effective* init: its blocks were built inside ``from_pretrained``, which
re-initialised every Linear / Conv2d missing from the checkpoint with trunc-normal(0, 0.02) weights
and zero biases (adapters.md §2.5); Conv1d / BatchNorm / LayerNorm kept PyTorch's defaults.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, the activation of ConvPass (and CLIP)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def repo_init_(module: nn.Module) -> None:
    """trunc-normal(0, 0.02) weights and zero biases on every Linear / Conv2d (the faithful init)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class Bottleneck(nn.Module):
    """``up(GELU(down(x)))`` with ``down: D -> b`` and ``up: b -> D`` (biases on both)."""

    def __init__(self, hidden: int, width: int, dropout: float = 0.0, faithful: bool = False) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, width)
        self.up = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        if faithful:
            repo_init_(self)
        else:  # down keeps PyTorch's Kaiming-uniform weight; zero bias so GELU starts centred
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, D] -> [B, S, D]
        return self.up(self.dropout(self.act(self.down(x))))


class ConformerConv(nn.Module):
    """Conformer convolution module as an adapter, over the token axis (CLS and distillation included).

    pointwise Conv1d D -> 2b, GLU over channels, depthwise Conv1d(b, kernel, 'same'), BatchNorm1d(b),
    SiLU, pointwise Conv1d b -> D, dropout. The LayerNorm(D) in front is applied (petl's default;
    the Conformer module starts with one) or, with ``faithful=True``, built but not applied, as in
    the reference code (there its parameters count as trainable but never receive a gradient).
    """

    def __init__(self, hidden: int, width: int, kernel_size: int = 31, dropout: float = 0.0,
                 faithful: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.pointwise_in = nn.Conv1d(hidden, 2 * width, kernel_size=1)
        self.depthwise = nn.Conv1d(width, width, kernel_size, padding=kernel_size // 2, groups=width)
        self.batch_norm = nn.BatchNorm1d(width)
        self.pointwise_out = nn.Conv1d(width, hidden, kernel_size=1)
        self.dropout = nn.Dropout(dropout)
        self.apply_norm = not faithful
        if not faithful:  # zero output at init; the reference keeps PyTorch's Conv1d init (non-zero)
            nn.init.zeros_(self.pointwise_out.weight)
            nn.init.zeros_(self.pointwise_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, D] -> [B, S, D]
        h = self.norm(x) if self.apply_norm else x
        h = self.pointwise_in(h.transpose(1, 2))  # [B, 2b, S]
        h = F.glu(h, dim=1)  # [B, b, S]
        h = F.silu(self.batch_norm(self.depthwise(h)))
        return self.dropout(self.pointwise_out(h)).transpose(1, 2)


class ConvPass2d(nn.Module):
    """ConvPass (Jie & Deng 2022) with a real 3x3 convolution over the frequency x time patch grid.

    ``s * up(drop(QGELU(conv(QGELU(down(x))))))``. The trailing ``F * T`` tokens are the patches in
    transformers' AST order (row-major frequency x time, as the patch embedding flattens them); the
    leading tokens (CLS, distillation or prompts) go through the same convolution as 1x1 maps, so
    only its centre tap acts on them. The conv starts as the identity (centre tap = I, others 0).

    Args:
        hidden (int): model width D.
        width (int): bottleneck channels b.
        grid (tuple[int, int]): (F, T) patches along frequency and time.
    """

    def __init__(self, hidden: int, width: int, grid: tuple[int, int], scale: float = 1.0,
                 dropout: float = 0.1, faithful: bool = False) -> None:
        super().__init__()
        self.grid = tuple(int(g) for g in grid)
        self.scale = scale
        self.down = nn.Linear(hidden, width)
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.up = nn.Linear(width, hidden)
        self.act = QuickGELU()
        self.dropout = nn.Dropout(dropout)
        if faithful:
            repo_init_(self)
        else:
            nn.init.xavier_uniform_(self.down.weight)
            nn.init.zeros_(self.down.bias)
            with torch.no_grad():
                self.conv.weight.zero_()
                self.conv.weight[:, :, 1, 1] = torch.eye(width)
            nn.init.zeros_(self.conv.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, D] -> [B, S, D]
        f, t = self.grid
        batch, seq, _ = x.shape
        special = seq - f * t
        if special < 0:
            raise ValueError(f"ConvPass expects at least {f}x{t}={f * t} patch tokens, got a sequence of {seq}; "
                             "apply the adapter to a model with the same max_length as when it was created")
        h = self.act(self.down(x))  # [B, S, b]
        patches = h[:, special:].transpose(1, 2).reshape(batch, -1, f, t)  # [B, b, F, T]
        patches = self.conv(patches).flatten(2).transpose(1, 2)  # [B, F*T, b]
        # A 1x1 map with padding 1 sees only the centre tap: conv2d on [B*special, b, 1, 1].
        head = h[:, :special].reshape(batch * special, -1, 1, 1)
        head = self.conv(head).reshape(batch, special, -1)
        h = self.dropout(self.act(torch.cat([head, patches], dim=1)))
        return self.scale * self.up(h)


def bottleneck_width(hidden: int, reduction_rate: int) -> int:
    """round(hidden / reduction_rate), at least 1 (the paper's b)."""
    return max(1, int(round(hidden / reduction_rate)))


def prompt_init_bound(patch_size: int, hidden: int) -> float:
    """VPT's uniform bound sqrt(6 / (3 * p * p + D)) used for prompts and prefixes (0.0625 for AST-B)."""
    return math.sqrt(6.0 / (3 * patch_size * patch_size + hidden))
