"""Stage-1 Trainer for ``petl distill``: attention transfer with small, atomic checkpoints.

In stage 1 only the LAWCAT parameters train (well under 1% of the model), so a checkpoint holds
those tensors (``lawcat_weights.safetensors`` + ``lawcat_config.json``) next to Trainer's
optimiser, scheduler, RNG and trainer state, instead of a full copy of the frozen teacher
(14 GB per checkpoint for a 7B model). Checkpoints appear atomically
(:class:`petl.train.checkpointing.AtomicCheckpointTrainer`) and ``--resume`` continues from the
newest complete one. Single process and DDP; FSDP/DeepSpeed shard the model differently and are
not supported by this checkpoint format.
"""
from __future__ import annotations

import os

import torch.nn as nn

from petl.distill.attention_transfer import AttentionTransferTrainer
from petl.linear.convert import get_lawcat_config, lawcat_parameters
from petl.train.checkpointing import AtomicCheckpointTrainer

LAWCAT_WEIGHTS = "lawcat_weights.safetensors"


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def save_lawcat_weights(model: nn.Module, directory: str | os.PathLike) -> str:
    """Write the LAWCAT parameters of ``model`` and its LawcatConfig into ``directory``."""
    from safetensors.torch import save_file

    model = _unwrap(model)
    os.makedirs(directory, exist_ok=True)
    tensors = {name: p.detach().contiguous().cpu() for name, p in lawcat_parameters(model)}
    path = os.path.join(directory, LAWCAT_WEIGHTS)
    save_file(tensors, path, metadata={"format": "pt"})
    get_lawcat_config(model).save(directory)
    return path


def load_lawcat_weights(model: nn.Module, directory: str | os.PathLike) -> None:
    """Load what :func:`save_lawcat_weights` wrote; every LAWCAT parameter must be present."""
    from safetensors.torch import load_file

    model = _unwrap(model)
    path = os.path.join(directory, LAWCAT_WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {directory} is not a petl distill stage-1 checkpoint")
    saved = load_file(path)
    expected = {name for name, _ in lawcat_parameters(model)}
    if set(saved) != expected:
        missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected)
        raise ValueError(f"checkpoint {directory} does not fit this model (missing {missing[:2]}, "
                         f"unexpected {extra[:2]}); resume with the recipe that wrote it")
    model.load_state_dict(saved, strict=False)


class AttentionTransferCheckpointTrainer(AtomicCheckpointTrainer, AttentionTransferTrainer):
    """:class:`AttentionTransferTrainer` whose checkpoints hold only the LAWCAT weights.

    Args: as :class:`petl.distill.AttentionTransferTrainer` (``loss_scale``) and
    ``transformers.Trainer``.
    """

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:  # Trainer hook
        if not self.args.should_save:
            return
        save_lawcat_weights(self.model, output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        load_lawcat_weights(model if model is not None else self.model, resume_from_checkpoint)
