"""Per-module rank selection for SoKA from a Kronecker spectrum, and a global parameter budget.

The SoKA paper names an energy threshold and an elbow point but its exact rule was not available;
this module implements the documented interpretation (shared/methods/adapters.md §1.4) and every
choice is a :class:`~petl.adapters.soka.config.SokaConfig` field:

* energy: the smallest r with ``sum_{k<=r} sigma_k^2 / ||W||_F^2 >= tau``;
* elbow (Kneedle): over the first K values, normalise ``x = (k-1)/(K-1)`` and
  ``y = (sigma_k - sigma_K) / (sigma_1 - sigma_K)``; the knee is the point farthest below the chord
  from (0, 1) to (1, 0); the components *before* the knee are kept. ``log_curvature`` instead
  takes the knee at the largest second difference of ``log sigma``;
* combined: ``r = clip(min(r_energy, r_elbow), r_min, r_max)``;
* budget: drop the globally smallest-sigma terms (never below ``r_min``) until the total
  trainable parameter count fits.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Optional

import torch


def energy_rank(sigma: torch.Tensor, total_energy: float, threshold: float) -> int:
    """Smallest r whose leading r components hold ``threshold`` of the energy ``||W||_F^2``.

    Only the leading ``len(sigma)`` values need to be known; if they do not reach the threshold
    the answer is ``len(sigma)`` (a lower bound, which the caller caps at ``r_max`` anyway).
    """
    if total_energy <= 0 or sigma.numel() == 0:
        return 1
    captured = torch.cumsum(sigma.double().square(), 0) / total_energy  # [q]
    reached = torch.nonzero(captured >= threshold - 1e-12)
    return int(reached[0]) + 1 if reached.numel() else sigma.numel()


def elbow_rank(sigma: torch.Tensor, window: int = 64, rule: str = "kneedle") -> int:
    """Number of components before the elbow of the first ``window`` values of ``sigma``.

    A spectrum with fewer than 3 values, or a flat one, has no elbow: all values are kept.
    """
    s = sigma[:window].double()
    K = s.numel()
    if K < 3:
        return max(K, 1)
    if rule == "kneedle":
        span = s[0] - s[-1]
        if span <= 0:
            return K
        x = torch.arange(K, dtype=torch.float64) / (K - 1)
        y = (s - s[-1]) / span
        knee = int(torch.argmax(1.0 - x - y))  # 0-based index of the first tail point
    elif rule == "log_curvature":
        logs = s.clamp_min(torch.finfo(torch.float64).tiny).log()
        second = logs[:-2] - 2 * logs[1:-1] + logs[2:]  # curvature at indices 1..K-2
        knee = int(torch.argmax(second)) + 1
    else:
        raise ValueError(f"elbow_rule must be 'kneedle' or 'log_curvature', got {rule!r}")
    return max(knee, 1)


def select_rank(sigma: torch.Tensor, total_energy: float, rule: str, threshold: float,
                window: int, elbow_rule: str, r_min: int, r_max: int, cap: int) -> tuple[int, dict]:
    """Rank for one module and the intermediate values (for the log).

    Args:
        sigma (Tensor): leading Kronecker singular values, descending.
        total_energy (float): ``||W||_F^2``.
        rule (str): ``"energy_elbow"``, ``"energy"`` or ``"elbow"``.
        cap (int): the module's Kronecker rank (no more terms exist).
    """
    sigma = sigma.detach().double().cpu()  # a few dozen values; keeps the rules off the GPU
    detail: dict = {}
    candidates = []
    if rule in ("energy", "energy_elbow"):
        detail["energy"] = energy_rank(sigma, total_energy, threshold)
        candidates.append(detail["energy"])
    if rule in ("elbow", "energy_elbow"):
        detail["elbow"] = elbow_rank(sigma, window, elbow_rule)
        candidates.append(detail["elbow"])
    if not candidates:
        raise ValueError(f"unknown rank_selection {rule!r}; use 'energy_elbow', 'energy', 'elbow' or 'fixed'")
    rank = max(r_min, min(min(candidates), r_max))
    return min(rank, cap), detail


@dataclass
class RankedModule:
    """What the budget needs to know about one module: its spectrum and the cost of one term."""

    key: str
    rank: int
    term_params: int
    sigma: Optional[torch.Tensor] = None
    fixed: bool = False
    detail: dict = field(default_factory=dict)


def apply_budget(modules: list[RankedModule], budget: int, r_min: int) -> int:
    """Lower ranks in place until ``sum(rank * term_params) <= budget``; returns the final total.

    Terms are dropped smallest Kronecker singular value first across all modules; a module whose
    rank was fixed by the user (``rank_pattern``) keeps it. Raises when the budget cannot be met
    without going below ``r_min``.
    """
    total = sum(m.rank * m.term_params for m in modules)
    heap: list[tuple[float, int]] = []
    for index, module in enumerate(modules):
        if module.fixed or module.rank <= r_min:
            continue
        if module.sigma is None:
            raise ValueError(f"param_budget needs a Kronecker spectrum, but {module.key} has none "
                             "(init_weights='zero'); use init_weights='weight' or 'grad', or drop param_budget")
        heapq.heappush(heap, (float(module.sigma[module.rank - 1]), index))
    while total > budget and heap:
        _, index = heapq.heappop(heap)
        module = modules[index]
        module.rank -= 1
        total -= module.term_params
        if module.rank > r_min:
            heapq.heappush(heap, (float(module.sigma[module.rank - 1]), index))
    if total > budget:
        raise ValueError(f"param_budget={budget} is below the {total} trainable parameters left at "
                         f"r_min={r_min}; raise param_budget, lower r_min (0 lets modules drop out) "
                         "or target fewer modules")
    return total
