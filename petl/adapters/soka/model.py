"""SoKA tuner: peft ``BaseTuner`` that plans all targeted modules, then swaps in :class:`SokaLinear`."""
from __future__ import annotations

from typing import Any

from torch import nn

from peft.tuners.tuners_utils import BaseTuner, _maybe_include_all_linear_layers

from .config import SokaConfig
from .layer import SokaLayer, SokaLinear
from .plan import ModulePlan, plan_adapter, plan_module

#: Default targets (the attention projections SoKA was evaluated on) per ``config.model_type``.
TARGET_MODULES: dict[str, list[str]] = {
    **{arch: ["q_proj", "k_proj", "v_proj", "o_proj"]
       for arch in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")},
    "gpt_neox": ["query_key_value", "dense"],
    "bert": ["query", "key", "value"],
    "roberta": ["query", "key", "value"],
}


class SokaModel(BaseTuner):
    """Creates SoKA adapters on a model (``peft.get_peft_model`` calls this through the registry).

    Planning happens once per adapter in :meth:`_prepare_model`, before any layer is replaced: the
    KPSVD of every targeted weight, the per-module rank rule and the optional global parameter
    budget need all modules together. The plan is written into the adapter config
    (``rank_pattern``, ``shape_pattern``) so the saved adapter reloads with the same shapes.
    """

    prefix: str = "soka_"
    tuner_layer_cls = SokaLayer
    target_module_mapping = TARGET_MODULES

    def _prepare_model(self, peft_config: SokaConfig, model: nn.Module) -> None:
        # inject_adapter resolves "all-linear" only after this hook; resolve it here as well so the
        # plan sees the same modules (the helper is idempotent).
        peft_config = _maybe_include_all_linear_layers(peft_config, model)
        plans = self.__dict__.setdefault("_soka_plans", {})  # keyed by id(config): one per adapter
        plans[id(peft_config)] = plan_adapter(model, peft_config, self._check_target_module_exists)

    def _create_and_replace(self, peft_config: SokaConfig, adapter_name: str, target: nn.Module,
                            target_name: str, parent: nn.Module, current_key: str,
                            **optional_kwargs: Any) -> None:
        plans: dict[str, ModulePlan] = self.__dict__.get("_soka_plans", {}).get(id(peft_config), {})
        plan = plans.pop(current_key, None)
        if plan is None:  # matched outside the planning pass (e.g. injection from a state dict)
            plan = plan_module(current_key, target, peft_config)
        if plan.shape is None or plan.rank == 0:
            return
        if isinstance(target, SokaLayer):
            target.update_layer(adapter_name, plan.shape, plan.A, plan.B, peft_config.scale,
                                plan.residual, inference_mode=peft_config.inference_mode)
            return
        new_module = SokaLinear(target, adapter_name, plan.shape, plan.A, plan.B, peft_config.scale,
                                plan.residual, inference_mode=peft_config.inference_mode)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def _post_injection_hook(self, model: nn.Module, config: SokaConfig, adapter_name: str) -> None:
        self.__dict__.get("_soka_plans", {}).pop(id(config), None)  # free the initial factors
