"""The adapter test matrix: every petl adapter method runs the same checks on tiny models.

A method joins by adding :class:`AdapterRow` entries to :data:`ADAPTER_ROWS` (a name, a factory for
its peft config, a factory for a tiny deterministic model, optionally inputs/loss/output hooks).
``tests/test_adapter_matrix.py`` runs every check in :data:`CHECKS` on every row. A row that
cannot support a check lists it in ``skip`` with the reason, so gaps stay visible.

Tolerances follow one principle: comparisons that only reorder float32 arithmetic (merge versus
unmerged forward) use a relative error bound of 1e-5 (about 100 float32 ulps, far below any real
bug); bfloat16 runs are compared against the float32 model with a bound of 3e-2 (a few bfloat16
ulps, eps = 7.8e-3, accumulated over two layers). Save/load and disable_adapter must be exact.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

FP32_REL_TOL = 1e-5
BF16_REL_TOL = 3e-2


def lm_inputs(vocab_size: int = 128, batch: int = 2, length: int = 12, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, length), generator=gen)
    return {"input_ids": ids, "labels": ids.clone()}


def lm_loss(outputs, inputs: dict) -> torch.Tensor:
    return outputs.loss


def lm_output(outputs) -> torch.Tensor:
    return outputs.logits


@dataclass(frozen=True)
class AdapterRow:
    """One (method config, tiny model) pair of the matrix.

    Attributes:
        name: test id.
        make_config: returns a fresh peft config (called once per adapter).
        make_model: returns the tiny model, identical weights on every call.
        imports: modules to import first (registration of out-of-tree methods).
        make_inputs / loss / output: how to run the model; defaults fit causal LMs.
        skip: check name -> reason, for checks the method cannot support.
    """

    name: str
    make_config: Callable[[], PeftConfig]
    make_model: Callable[[], nn.Module]
    imports: tuple[str, ...] = ()
    make_inputs: Callable[[], dict] = lm_inputs
    loss: Callable[[object, dict], torch.Tensor] = lm_loss
    output: Callable[[object], torch.Tensor] = lm_output
    skip: dict = field(default_factory=dict)

    def peft_model(self, dtype: torch.dtype = torch.float32) -> PeftModel:
        for module in self.imports:
            importlib.import_module(module)
        return get_peft_model(self.make_model().to(dtype), self.make_config())

    def run(self, model: nn.Module, inputs: Optional[dict] = None) -> torch.Tensor:
        with torch.no_grad():
            return self.output(model(**(inputs if inputs is not None else self.make_inputs())))


class TinyMLP(nn.Module):
    """A non-transformers model with a prime input size (13) to exercise fallbacks."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(13, 24)
        self.fc2 = nn.Linear(24, 24)
        self.fc3 = nn.Linear(24, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 13] -> [B, 8]
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def _tiny_llm(arch: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from petl.testing import tiny_causal_lm

        return tiny_causal_lm(arch, seed=0)
    return make


def _mlp_inputs() -> dict:
    return {"x": torch.randn(4, 13, generator=torch.Generator().manual_seed(2))}


def _soka(**kwargs) -> Callable[[], PeftConfig]:
    def make() -> PeftConfig:
        from petl.adapters.soka import SokaConfig

        return SokaConfig(**kwargs)
    return make


_ALL_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: Rows of the matrix. Add your method's rows here.
ADAPTER_ROWS: list[AdapterRow] = [
    AdapterRow("peft-lora-llama", lambda: LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                     target_modules=["q_proj", "v_proj"]),
               _tiny_llm("llama")),
    AdapterRow("soka-weight-llama", _soka(target_modules=_ALL_LLAMA, r_max=4), _tiny_llm("llama"),
               imports=("petl.adapters.soka",)),
    AdapterRow("soka-zero-gpt_neox", _soka(init_weights="zero", rank_selection="fixed", r=2),
               _tiny_llm("gpt_neox"), imports=("petl.adapters.soka",)),
    AdapterRow("soka-factor4-scale2-qwen3", _soka(init_weights="weight", rank_selection="fixed", r=3,
                                              factor=4, scale=2.0, target_modules="all-linear"),
               _tiny_llm("qwen3"), imports=("petl.adapters.soka",)),
    AdapterRow("soka-prime-mlp", _soka(target_modules=["fc1", "fc2", "fc3"], rank_selection="energy",
                                       energy_threshold=0.8, r_max=3), TinyMLP,
               imports=("petl.adapters.soka",), make_inputs=_mlp_inputs,
               loss=lambda out, inputs: out.square().mean(), output=lambda out: out),
]


# ---------------------------------------------------------------- helpers

def cast_inputs(inputs: dict, dtype: torch.dtype) -> dict:
    """Floating-point inputs in ``dtype`` (token ids stay integers)."""
    return {k: v.to(dtype) if torch.is_tensor(v) and v.dtype.is_floating_point else v
            for k, v in inputs.items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def perturb_adapter(model: nn.Module, adapter: str = "default", seed: int = 0, size: float = 0.05) -> None:
    """Move the adapter's trainable tensors away from their (often identity) init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if _belongs_to(name, adapter) and p.dtype.is_floating_point:
                p.add_((torch.randn(p.shape, generator=gen) * size).to(p.device, p.dtype))


def _belongs_to(param_name: str, adapter: str) -> bool:
    return f".{adapter}." in param_name or param_name.endswith(f".{adapter}")


def assert_declared_trainable(model: nn.Module, adapter: str) -> None:
    """Every tensor a tuner layer declares trainable (``adapter_layer_names``) requires grad."""
    for layer in (m for m in model.modules() if isinstance(m, BaseTunerLayer)):
        for attr in layer.adapter_layer_names:
            container = getattr(layer, attr)
            if adapter in container and attr not in layer.frozen_peft_weight_names.get(adapter, ()):
                item = container[adapter]
                params = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
                assert all(p.requires_grad for p in params), f"{attr} of active adapter {adapter} is frozen"


def train_steps(row: AdapterRow, model: nn.Module, steps: int = 3, lr: float = 1e-2) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        inputs = row.make_inputs()
        row.loss(model(**inputs), inputs).backward()
        opt.step()
        opt.zero_grad()
    model.eval()


# ---------------------------------------------------------------- checks

def check_save_load_round_trip(row: AdapterRow, tmp_path: Path) -> None:
    """A trained adapter saved and loaded onto an untouched base model gives identical outputs."""
    model = row.peft_model()
    train_steps(row, model)
    expected = row.run(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(row.make_model(), tmp_path)
    assert torch.equal(row.run(loaded), expected), "reloaded adapter changed the outputs"
    base_after = {k: v for k, v in loaded.get_base_model().state_dict().items() if "base_layer" in k}
    untouched = row.make_model().state_dict()
    for key, value in base_after.items():
        plain = key.replace(".base_layer", "")
        assert torch.equal(value, untouched[plain]), f"loading modified base weight {plain}"


def check_merge_unmerge(row: AdapterRow, tmp_path: Path) -> None:
    """merge -> unmerge -> merge: outputs and base weights match the unmerged model."""
    model = row.peft_model()
    perturb_adapter(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = row.run(model)
    model.merge_adapter()
    merged = row.run(model)
    assert rel_err(merged, unmerged) < FP32_REL_TOL
    model.unmerge_adapter()
    assert rel_err(row.run(model), unmerged) < FP32_REL_TOL
    for key, value in model.state_dict().items():
        assert rel_err(value, before[key]) < FP32_REL_TOL or torch.equal(value, before[key]), key
    model.merge_adapter()
    assert rel_err(row.run(model), merged) < FP32_REL_TOL


def check_merge_and_unload(row: AdapterRow, tmp_path: Path) -> None:
    """merge_and_unload returns the plain base architecture with the adapted outputs."""
    model = row.peft_model()
    perturb_adapter(model)
    expected = row.run(model)
    merged = model.merge_and_unload()
    reference = row.make_model()
    assert type(merged) is type(reference)
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert set(merged.state_dict()) == set(reference.state_dict())
    assert rel_err(row.run(merged), expected) < FP32_REL_TOL


def check_only_adapter_params_change(row: AdapterRow, tmp_path: Path) -> None:
    """A few optimizer steps change every trainable tensor and nothing else."""
    model = row.peft_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(_belongs_to(n, "default") for n in trainable), sorted(trainable)[:5]
    assert_declared_trainable(model, "default")
    before = {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()}
    train_steps(row, model)
    for key, value in model.state_dict().items():
        changed = not torch.equal(value, before[key])
        assert changed == (key in trainable), f"{key}: changed={changed}, trainable={key in trainable}"


def check_dtype_bf16(row: AdapterRow, tmp_path: Path) -> None:
    """A bfloat16 base: float32 adapter weights, bfloat16 outputs close to float32, finite grads."""
    ref_model = row.peft_model(torch.float32)
    perturb_adapter(ref_model)
    model = row.peft_model(torch.bfloat16)
    adapter_state = {k: v for k, v in ref_model.state_dict().items() if _belongs_to(k, "default")
                     and "base_layer" not in k}
    model.load_state_dict(adapter_state, strict=False)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32, f"{name} is {p.dtype}; adapters train in float32"
    inputs = cast_inputs(row.make_inputs(), torch.bfloat16)
    out = row.run(model, inputs)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, row.run(ref_model)) < BF16_REL_TOL
    row.loss(model(**inputs), inputs).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    merged = model.merge_and_unload()
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())
    assert rel_err(row.run(merged, inputs), out) < BF16_REL_TOL


def check_disable_adapter(row: AdapterRow, tmp_path: Path) -> None:
    """Inside ``disable_adapter()`` the model is exactly the base model."""
    model = row.peft_model()
    perturb_adapter(model)
    adapted = row.run(model)
    base = row.run(row.make_model())
    with model.disable_adapter():
        assert torch.equal(row.run(model), base)
    assert torch.equal(row.run(model), adapted)


def check_multiple_adapters(row: AdapterRow, tmp_path: Path) -> None:
    """Named adapters are independent; set_adapter switches outputs and trainability; each saves."""
    model = row.peft_model()
    perturb_adapter(model, "default", seed=1)
    out_default = row.run(model)
    model.add_adapter("second", row.make_config())
    perturb_adapter(model, "second", seed=2)
    assert torch.equal(row.run(model), out_default), "adding an adapter changed the active one"
    model.set_adapter("second")
    out_second = row.run(model)
    assert rel_err(out_second, out_default) > 1e-4, "the second adapter has no effect"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(_belongs_to(n, "second") for n in trainable)
    assert_declared_trainable(model, "second")
    model.set_adapter("default")
    assert torch.equal(row.run(model), out_default)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(row.make_model(), tmp_path / "second")
    assert torch.equal(row.run(loaded), out_second)


CHECKS: dict[str, Callable[[AdapterRow, Path], None]] = {
    "save_load_round_trip": check_save_load_round_trip,
    "merge_unmerge": check_merge_unmerge,
    "merge_and_unload": check_merge_and_unload,
    "only_adapter_params_change": check_only_adapter_params_change,
    "dtype_bf16": check_dtype_bf16,
    "disable_adapter": check_disable_adapter,
    "multiple_adapters": check_multiple_adapters,
}

__all__ = ["ADAPTER_ROWS", "CHECKS", "AdapterRow", "TinyMLP", "perturb_adapter", "rel_err", "train_steps"]
