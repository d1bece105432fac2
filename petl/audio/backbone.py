"""Loading an AST classifier for a new label set and a new input length.

AST's positional embeddings cover a fixed patch grid (AudioSet checkpoints: 12 frequency x 101
time patches for 1024 frames). PETL-AST trains on shorter inputs (100-500 frames). transformers
has no resizing for AST, so the reference code loaded with ``ignore_mismatched_sizes=True`` and ran
with *all-zero, frozen* positional embeddings (adapters.md §2.5, trap 2). petl's default instead
interpolates the pretrained grid along time (bilinear, as Gong et al.'s AST code does for other
lengths); ``pos_embed="zero"`` reproduces the reference.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import nn
from torch.nn import functional as F

from petl.adapters.audio.model import patch_grid

PosEmbedMode = Literal["interpolate", "zero"]


def resize_position_embeddings(model: nn.Module, max_frames: int, mode: PosEmbedMode = "interpolate") -> None:
    """Make an AST (``ASTForAudioClassification`` or ``ASTModel``) accept ``max_frames`` frames, in place.

    ``interpolate`` resamples the ``[F, T_old]`` grid of patch embeddings to ``[F, T_new]`` and keeps
    the CLS / distillation rows; ``zero`` replaces the whole table with zeros (the reference code's
    effective behaviour). ``config.max_length`` is updated.
    """
    config = model.config
    if max_frames < config.patch_size:
        raise ValueError(f"max_frames={max_frames} is shorter than one patch ({config.patch_size} frames)")
    ast = getattr(model, "audio_spectrogram_transformer", model)
    table = ast.embeddings.position_embeddings  # [1, 2 + F*T_old, D]
    f, t_old = patch_grid(config)
    config.max_length = max_frames
    _, t_new = patch_grid(config)
    if mode == "zero":
        new = torch.zeros(1, 2 + f * t_new, table.shape[-1], dtype=table.dtype, device=table.device)
    elif mode == "interpolate":
        if t_new == t_old:
            return
        special, grid = table[:, :2], table[:, 2:]
        grid = grid.reshape(1, f, t_old, -1).permute(0, 3, 1, 2).float()  # [1, D, F, T_old]
        grid = F.interpolate(grid, size=(f, t_new), mode="bilinear", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, f * t_new, -1).to(table.dtype)
        new = torch.cat([special, grid], dim=1)
    else:
        raise ValueError(f"positional-embedding mode {mode!r} is unknown; use 'interpolate' or 'zero'")
    ast.embeddings.position_embeddings = nn.Parameter(new.detach().clone(), requires_grad=table.requires_grad)


def load_ast_classifier(name: str, label_names: list[str], max_frames: Optional[int] = None,
                        pos_embed: PosEmbedMode = "interpolate", revision: Optional[str] = None,
                        dtype: Optional[torch.dtype] = None, trust_remote_code: bool = False) -> nn.Module:
    """``ASTForAudioClassification`` from a hub id or local folder with a fresh head for ``label_names``.

    The checkpoint's head is kept when its label set matches, otherwise re-initialised (transformers'
    ``ignore_mismatched_sizes``). ``max_frames`` (None keeps the checkpoint's length) sets the input
    length, resizing the positional embeddings as ``pos_embed`` says.
    """
    from transformers import ASTForAudioClassification

    from petl.models import resolve_model_path

    labels = {i: n for i, n in enumerate(label_names)}
    model = ASTForAudioClassification.from_pretrained(
        resolve_model_path(name), revision=revision, num_labels=len(labels), id2label=labels,
        label2id={n: i for i, n in labels.items()}, ignore_mismatched_sizes=True, dtype=dtype,
        trust_remote_code=trust_remote_code)
    if max_frames is not None and (max_frames != model.config.max_length or pos_embed == "zero"):
        resize_position_embeddings(model, max_frames, pos_embed)
    return model
