"""Gradient accumulation for ``SokaConfig(init_weights="grad")``.

The ``"grad"`` init takes the KPSVD of ``-grad_step_size * G`` where G is the loss gradient of each
targeted weight, averaged over a few batches (the LoRA-GA / LoRA-One idea applied to Kronecker
factors). peft builds layers from the model alone, so G travels on the weights themselves:
``weight.grad`` is read by ``get_peft_model`` and released once the adapter is built.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn

from peft.tuners.tuners_utils import check_target_module_exists

from .config import SokaConfig


def accumulate_gradients(model: nn.Module, batches: Iterable[dict], config: Optional[SokaConfig] = None,
                         loss_fn: Optional[Callable[[object, dict], torch.Tensor]] = None) -> int:
    """Store the mean loss gradient over ``batches`` in ``.grad`` of the targeted Linear weights.

    Args:
        model (nn.Module): the base model (not yet wrapped by peft).
        batches (Iterable[dict]): keyword arguments of ``model(**batch)``.
        config (SokaConfig, Optional): only its ``target_modules`` get gradients (saves memory).
            Default: every ``nn.Linear``.
        loss_fn (Callable, Optional): ``loss_fn(outputs, batch) -> loss``. Default: ``outputs.loss``.

    Returns:
        The number of batches used. Other parameters' ``requires_grad`` flags are restored.
    """
    weights = [m.weight for key, m in model.named_modules() if isinstance(m, nn.Linear)
               and (config is None or config.target_modules is None or check_target_module_exists(config, key))]
    if not weights:
        raise ValueError("no nn.Linear matches config.target_modules; nothing to accumulate gradients for")
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
        w.grad = None
    count = 0
    try:
        for batch in batches:
            outputs = model(**batch)
            loss = loss_fn(outputs, batch) if loss_fn is not None else outputs.loss
            loss.backward()
            count += 1
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    if count == 0:
        raise ValueError("accumulate_gradients got no batches; pass at least one")
    for w in weights:
        w.grad.div_(count)
    return count
