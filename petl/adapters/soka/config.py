"""Configuration of SoKA (SVD on Kronecker Adaptation, Chong & Qu, arXiv 2506.15251)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from ..registration import PetlType

InitWeights = Literal["weight", "grad", "zero"]
RankSelection = Literal["energy_elbow", "energy", "elbow", "fixed"]


@dataclass
class SokaConfig(PeftConfig):
    """Adapter ``ΔW = scale * sum_k A_k ⊗ B_k`` on each targeted ``nn.Linear``.

    Usable with ``peft.get_peft_model`` once ``petl`` (or ``petl.adapters.soka``) is imported.
    Choices the paper leaves open are fields; their defaults are petl's documented
    interpretation (docs/soka.md).

    Args:
        target_modules (list[str] | str, Optional): module names (suffix match), a regex, or
            ``"all-linear"``. Default: q/k/v/o projections of known architectures.
        exclude_modules (list[str] | str, Optional): modules never adapted. Default: None.
        init_weights (str): ``"weight"`` (PiSSA-style: the top Kronecker components of W0 become
            A, B; the residual ``W0 - sum A0 ⊗ B0`` stays frozen, so the output equals the base
            model at init), ``"grad"`` (A, B from the KPSVD of ``-grad_step_size * G``, where G is
            the gradient accumulated on each targeted weight, see :func:`accumulate_gradients`;
            W0 kept) or ``"zero"`` (A Kaiming-uniform, B = 0; the KronA/LoKr baseline).
            Default: ``"weight"``.
        rank_selection (str): ``"energy_elbow"``, ``"energy"``, ``"elbow"`` (from the Kronecker
            spectrum) or ``"fixed"`` (use ``r``). Default: ``"energy_elbow"``.
        r (int): number of Kronecker terms when ``rank_selection="fixed"``. Default: 8.
        energy_threshold (float): energy fraction tau for the energy rule. Default: 0.9.
        elbow_rule (str): ``"kneedle"`` or ``"log_curvature"``. Default: ``"kneedle"``.
        elbow_window (int): number of leading singular values the elbow looks at. Default: 64.
        r_min (int): lower bound per module (0 lets the budget drop a module). Default: 1.
        r_max (int): upper bound per module. Default: 16.
        param_budget (int, Optional): global cap on trainable parameters; the smallest-sigma
            terms across all modules are dropped until it holds. Default: None.
        factor (int): ``-1`` balanced factor shapes (divisors nearest sqrt(dim)); ``f > 0`` gives
            ``(f, dim // f)`` on both sides (A small, B large). Default: -1.
        prime_fallback (str): what to do when a dimension is prime (its only split is
            ``(1, dim)``): ``"lora"`` (use ``[d_out,1] ⊗ [1,d_in]``: rank-r LoRA, KPSVD = SVD),
            ``"skip"`` (leave the module un-adapted) or ``"error"``. Default: ``"lora"``.
        scale (float): the scalar s in ``ΔW = s * sum A ⊗ B``. Default: 1.0.
        grad_step_size (float): eta in the ``"grad"`` init ``-eta * G``. Default: 1e-3.
        svd_method (str): ``"auto"``, ``"full"`` or ``"randomized"`` (see ``kpsvd``). Default: ``"auto"``.
        svd_niter (int): power iterations of the randomized SVD. Default: 4.
        svd_oversample (int): extra probes of the randomized SVD. Default: 8.
        seed (int): seed of the randomized SVD and of the ``"zero"`` init. Default: 0.
        rank_pattern (dict[str, int]): per-module ranks (exact module name or dotted suffix).
            Filled with the chosen rank of every module when the adapter is created and saved
            with it, so loading rebuilds the same shapes. Default: {}.
        shape_pattern (dict[str, list[int]]): per-module factor shapes ``[m1, n1, m2, n2]``; filled
            and saved like ``rank_pattern``. Default: {}.
        modules_to_save (list[str], Optional): extra modules trained and saved in full. Default: None.
        bias (str): only ``"none"`` (biases stay frozen). Default: ``"none"``.
    """

    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    init_weights: InitWeights = "weight"
    rank_selection: RankSelection = "energy_elbow"
    r: int = 8
    energy_threshold: float = 0.9
    elbow_rule: Literal["kneedle", "log_curvature"] = "kneedle"
    elbow_window: int = 64
    r_min: int = 1
    r_max: int = 16
    param_budget: Optional[int] = None
    factor: int = -1
    prime_fallback: Literal["lora", "skip", "error"] = "lora"
    scale: float = 1.0
    grad_step_size: float = 1e-3
    svd_method: Literal["auto", "full", "randomized"] = "auto"
    svd_niter: int = 4
    svd_oversample: int = 8
    seed: int = 0
    rank_pattern: dict = field(default_factory=dict)
    shape_pattern: dict = field(default_factory=dict)
    modules_to_save: Optional[list[str]] = None
    bias: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PetlType.SOKA
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self._validate()

    def _validate(self) -> None:
        choices = {"init_weights": ("weight", "grad", "zero"),
                   "rank_selection": ("energy_elbow", "energy", "elbow", "fixed"),
                   "elbow_rule": ("kneedle", "log_curvature"),
                   "prime_fallback": ("lora", "skip", "error"),
                   "svd_method": ("auto", "full", "randomized"),
                   "bias": ("none",)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"SokaConfig.{name}={getattr(self, name)!r} is not one of {allowed}")
        if self.init_weights == "zero" and self.rank_selection != "fixed":
            raise ValueError("init_weights='zero' has no spectrum to select ranks from; "
                             "set rank_selection='fixed' (and r)")
        if not 0 <= self.r_min <= self.r_max:
            raise ValueError(f"need 0 <= r_min <= r_max, got r_min={self.r_min}, r_max={self.r_max}")
        if self.r < 1:
            raise ValueError(f"SokaConfig.r must be >= 1, got {self.r}")
        if not 0.0 < self.energy_threshold <= 1.0:
            raise ValueError(f"energy_threshold must be in (0, 1], got {self.energy_threshold}")
        if self.elbow_window < 3:
            raise ValueError(f"elbow_window must be >= 3, got {self.elbow_window}")
        if self.param_budget is not None and self.param_budget < 0:
            raise ValueError(f"param_budget must be >= 0 or None, got {self.param_budget}")
        if self.factor != -1 and self.factor < 1:
            raise ValueError(f"factor must be -1 (balanced) or a positive divisor, got {self.factor}")
        if not self.scale > 0:
            raise ValueError(f"scale must be positive (the init puts sqrt(sigma / scale) in each factor), got {self.scale}")
        for key, shape in self.shape_pattern.items():
            if len(shape) != 4 or any(int(v) < 1 for v in shape):
                raise ValueError(f"shape_pattern[{key!r}]={shape!r} must be four positive ints [m1, n1, m2, n2]")
