"""Plan a SoKA adapter before any layer is built: factor shapes, KPSVD, ranks, budget.

Ranks depend on every module at once when a global ``param_budget`` is set, so the tuner plans all
targeted modules first (``SokaModel._prepare_model``) and builds the layers afterwards from the
plan. The chosen shapes and ranks are written into the config (``shape_pattern``, ``rank_pattern``)
so a saved adapter loads with the same shapes without re-running the selection, and logged.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from peft.tuners.tuners_utils import BaseTunerLayer

from .config import SokaConfig
from .kpsvd import Kpsvd, KronShape, kpsvd, kpsvd_factors, kron_shape, lora_shape
from .ranks import RankedModule, apply_budget, select_rank

logger = logging.getLogger("petl.soka")


@dataclass
class ModulePlan:
    """How one module is adapted. ``shape is None`` or ``rank == 0`` means: left as it is."""

    key: str
    shape: Optional[KronShape]
    rank: int
    A: Optional[torch.Tensor] = None  # [rank, m1, n1] float32
    B: Optional[torch.Tensor] = None  # [rank, m2, n2] float32
    residual: bool = False
    note: str = ""


def pattern_value(pattern: dict, key: str):
    """Value for module ``key`` in a ``{name_or_suffix: value}`` pattern (exact name wins)."""
    if key in pattern:
        return pattern[key]
    for name, value in pattern.items():
        if key.endswith("." + name):
            return value
    return None


@dataclass
class _Ranked:
    """A module between ranking and building: its linear layer, shape, spectrum and rank."""

    linear: nn.Linear
    shape: Optional[KronShape]
    spectrum: Optional[Kpsvd]
    ranked: RankedModule
    index: int


def plan_adapter(model: nn.Module, config: SokaConfig,
                 is_target: Callable[[SokaConfig, str], object]) -> dict[str, ModulePlan]:
    """Plan every module of ``model`` that ``is_target`` selects; updates the config's patterns."""
    inside_tuners = [k + "." for k, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    targets = [(key, module) for key, module in model.named_modules()
               if key and not any(key.startswith(p) for p in inside_tuners) and is_target(config, key)]
    pending = {key: _rank_module(key, module, config, index) for index, (key, module) in enumerate(targets)}
    budgeted = [p.ranked for p in pending.values() if p.ranked.rank > 0]
    if config.param_budget is not None and budgeted:
        apply_budget(budgeted, config.param_budget, config.r_min)
    plans = {key: _finish(p, config) for key, p in pending.items()}
    for key, plan in plans.items():
        _record(config, plan)
    total = sum(p.rank * p.shape.term_params for p in plans.values() if p.rank > 0)
    logger.info("SoKA: %d of %d targeted modules adapted, %d trainable parameters",
                sum(p.rank > 0 for p in plans.values()), len(plans), total)
    return plans


def plan_module(key: str, module: nn.Module, config: SokaConfig) -> ModulePlan:
    """Plan a single module (no global budget): for modules matched outside the planning pass."""
    plan = _finish(_rank_module(key, module, config, 0), config)
    _record(config, plan)
    return plan


def _record(config: SokaConfig, plan: ModulePlan) -> None:
    config.rank_pattern[plan.key] = plan.rank
    if plan.shape is not None:
        config.shape_pattern[plan.key] = list(plan.shape)


def _linear(key: str, module: nn.Module) -> nn.Linear:
    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    if not isinstance(base, nn.Linear):
        raise TypeError(f"SoKA adapts torch.nn.Linear layers; {key} is a {type(base).__name__}: "
                        "remove it from target_modules")
    return base


def _shape(key: str, d_out: int, d_in: int, config: SokaConfig) -> tuple[Optional[KronShape], str]:
    explicit = pattern_value(config.shape_pattern, key)
    if explicit is not None:
        shape = KronShape(*(int(v) for v in explicit))
        if (shape.d_out, shape.d_in) != (d_out, d_in):
            raise ValueError(f"shape_pattern for {key} is {list(shape)} but the layer is {d_out}x{d_in}; "
                             "factors must multiply to the layer's dimensions")
        return shape, ""
    try:
        shape = kron_shape(d_out, d_in, config.factor)
    except ValueError as err:
        raise ValueError(f"{key}: {err}") from None
    prime = [d for d, small in ((d_out, shape.m1), (d_in, shape.n1)) if small == 1 and d > 1]
    if not prime:
        return shape, ""
    what = f"{key}: dimension {prime[0]} is prime, so its only Kronecker split is (1, {prime[0]})"
    if config.prime_fallback == "error":
        raise ValueError(f"{what}; set prime_fallback='lora' or 'skip', or give shape_pattern for it")
    if config.prime_fallback == "skip":
        logger.warning("%s; module skipped (prime_fallback='skip')", what)
        return None, "skipped: prime dimension"
    logger.warning("%s; using LoRA-shaped factors [%d,1] x [1,%d] (prime_fallback='lora')", what, d_out, d_in)
    return lora_shape(d_out, d_in), "lora fallback: prime dimension"


def _source(key: str, linear: nn.Linear, config: SokaConfig, fixed: Optional[int]) -> Optional[torch.Tensor]:
    """The matrix whose KPSVD initialises the adapter, or None for a placeholder init."""
    if config.init_weights == "weight":
        return linear.weight
    if config.init_weights == "grad":
        grad = linear.weight.grad
        if grad is None:
            if fixed is not None:  # loading a saved adapter: its values come from the checkpoint
                return None
            raise ValueError(f"init_weights='grad' needs the gradient of {key}.weight; run "
                             "petl.adapters.soka.accumulate_gradients(model, batches) before get_peft_model")
        return -config.grad_step_size * grad
    return None


def _rank_module(key: str, module: nn.Module, config: SokaConfig, index: int) -> _Ranked:
    linear = _linear(key, module)
    shape, note = _shape(key, linear.out_features, linear.in_features, config)
    detail = {"note": note} if note else {}
    fixed = pattern_value(config.rank_pattern, key)
    if shape is None:
        return _Ranked(linear, None, None, RankedModule(key, 0, 1, fixed=True, detail=detail), index)
    if fixed is not None:
        rank = min(int(fixed), shape.kron_rank)
    elif config.rank_selection == "fixed":
        rank = min(config.r, shape.kron_rank)
    else:
        rank = None
    source = _source(key, linear, config, fixed)
    spectrum = None
    if source is not None and (rank is None or rank > 0):
        uses_elbow = config.rank_selection in ("elbow", "energy_elbow")
        q = rank if rank is not None else max(config.r_max, config.elbow_window if uses_elbow else 0)
        spectrum = kpsvd(source, shape, q, config.svd_method, config.svd_niter,
                         config.svd_oversample, config.seed + index)
    if rank is None:
        rank, chosen = select_rank(spectrum.sigma, spectrum.total_energy, config.rank_selection,
                                   config.energy_threshold, config.elbow_window, config.elbow_rule,
                                   config.r_min, config.r_max, shape.kron_rank)
        detail.update(chosen)
    sigma = spectrum.sigma.cpu() if spectrum is not None else None  # the budget reads it term by term
    ranked = RankedModule(key, rank, shape.term_params, sigma, fixed is not None, detail)
    return _Ranked(linear, shape, spectrum, ranked, index)


def _finish(pending: _Ranked, config: SokaConfig) -> ModulePlan:
    key, rank, shape = pending.ranked.key, pending.ranked.rank, pending.shape
    note = pending.ranked.detail.get("note", "")
    if shape is None or rank == 0:
        logger.info("SoKA %s: not adapted (%s)", key, note or "rank 0")
        return ModulePlan(key, shape, 0, note=note or "rank 0")
    if pending.spectrum is not None:
        A, B = kpsvd_factors(pending.spectrum, shape, rank, config.scale)
    else:  # init "zero", or a placeholder that a checkpoint will overwrite
        A, B = _zero_init(shape, rank, config.seed + pending.index, pending.linear.weight.device)
    if config.init_weights == "grad":
        pending.linear.weight.grad = None  # consumed; the base weights are frozen from here on
    details = ", ".join(f"{k}={v}" for k, v in pending.ranked.detail.items()) or "fixed"
    logger.info("SoKA %s: [%d,%d] x [%d,%d], rank %d (%s), %d params", key, *shape, rank, details,
                rank * shape.term_params)
    return ModulePlan(key, shape, rank, A, B, config.init_weights == "weight", note)


def _zero_init(shape: KronShape, rank: int, seed: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A Kaiming-uniform, B zero (ΔW = 0 at init; the zero-side receives gradient first)."""
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(shape.n1)  # nn.init.kaiming_uniform_(a=sqrt(5)) with fan_in = n1
    A = (torch.rand(rank, shape.m1, shape.n1, generator=gen) * 2 - 1) * bound
    B = torch.zeros(rank, shape.m2, shape.n2)
    return A.to(device), B.to(device)
