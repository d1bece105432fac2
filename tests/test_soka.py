"""SoKA: KPSVD identities, Kronecker matvec, rank selection, init modes, portability, Trainer resume.

The shared peft checks (save/load, merge, dtypes, multiple adapters) run in tests/test_adapter_matrix.py.
"""
from __future__ import annotations

import json
import logging

import pytest
import torch
from peft import PeftModel, get_peft_model

from petl.adapters.soka import (KronShape, SokaConfig, accumulate_gradients, kpsvd, kpsvd_factors, kron_matvec,
                                kron_shape, kron_sum, rearrange, unrearrange)
from petl.adapters.soka.kpsvd import factorize
from petl.adapters.soka.ranks import RankedModule, apply_budget, elbow_rank, energy_rank
from petl.testing import tiny_causal_lm

from .adapter_matrix import lm_inputs, perturb_adapter

#: Odd, non-square factor shapes (m1, n1, m2, n2); the last is LoRA-shaped.
SHAPES = [KronShape(3, 4, 5, 2), KronShape(2, 3, 4, 5), KronShape(4, 4, 4, 4), KronShape(6, 1, 1, 7)]
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _random_factors(shape: KronShape, r: int, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(r, shape.m1, shape.n1, generator=gen, dtype=dtype)
    B = torch.randn(r, shape.m2, shape.n2, generator=gen, dtype=dtype)
    return A, B


# ---------------------------------------------------------------- KPSVD identities

@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rearrangement_maps_kron_to_rank_one(shape):
    A, B = _random_factors(shape, 1)
    W = torch.kron(A[0], B[0])
    assert torch.equal(rearrange(W, shape), torch.outer(A[0].flatten(), B[0].flatten()))
    assert torch.equal(unrearrange(rearrange(W, shape), shape), W)
    assert torch.equal(kron_sum(A, B), W)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_full_kronecker_rank_reconstructs_exactly(shape):
    W = torch.randn(shape.d_out, shape.d_in, generator=torch.Generator().manual_seed(1))
    result = kpsvd(W, shape, shape.kron_rank, method="full")
    A, B = kpsvd_factors(result, shape, shape.kron_rank)
    assert (kron_sum(A, B) - W).norm() / W.norm() < 1e-5


@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
def test_truncation_error_equals_tail_energy(shape):
    W = torch.randn(shape.d_out, shape.d_in, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sigma = torch.linalg.svdvals(rearrange(W, shape))  # float64 reference spectrum
    result = kpsvd(W, shape, shape.kron_rank, method="full")
    assert result.total_energy == pytest.approx(float(W.square().sum()), rel=1e-6)
    for r in range(1, shape.kron_rank):
        A, B = kpsvd_factors(result, shape, r)
        err2 = float((W - kron_sum(A.double(), B.double())).square().sum())
        assert err2 == pytest.approx(float(sigma[r:].square().sum()), rel=1e-4, abs=1e-9)


def test_randomized_kpsvd_matches_full_on_decaying_spectrum():
    shape = KronShape(8, 8, 8, 8)
    gen = torch.Generator().manual_seed(3)
    A, B = _random_factors(shape, 12, dtype=torch.float32, seed=3)
    weights = 0.5 ** torch.arange(12.0)  # decaying Kronecker spectrum plus noise
    W = kron_sum(A * weights[:, None, None], B) + 1e-4 * torch.randn(64, 64, generator=gen)
    full = kpsvd(W, shape, 4, method="full")
    fast = kpsvd(W, shape, 4, method="randomized", niter=4, seed=7)
    torch.testing.assert_close(fast.sigma, full.sigma, rtol=1e-3, atol=1e-5)
    assert torch.equal(kpsvd(W, shape, 4, method="randomized", seed=7).sigma, fast.sigma)  # seeded
    fa, fb = kpsvd_factors(full, shape, 4)
    ra, rb = kpsvd_factors(fast, shape, 4)
    assert (kron_sum(ra, rb) - kron_sum(fa, fb)).norm() / kron_sum(fa, fb).norm() < 1e-3


def test_factor_shapes():
    assert factorize(4096) == (64, 64) and factorize(11008) == (86, 128)
    assert factorize(2048) == (32, 64) and factorize(768) == (24, 32)
    assert factorize(13) == (1, 13) and factorize(64, 8) == (8, 8)
    assert kron_shape(11008, 4096) == KronShape(86, 64, 128, 64)
    with pytest.raises(ValueError, match="does not divide"):
        factorize(100, 48)


# ---------------------------------------------------------------- Kronecker matvec

@pytest.mark.parametrize("order", ["a_first", "b_first", "auto"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matvec_equals_dense_kron_with_gradients(shape, order):
    A, B = _random_factors(shape, 3)
    A.requires_grad_(True)
    B.requires_grad_(True)
    x = torch.randn(2, 5, shape.d_in, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 5, shape.d_out, dtype=torch.float64)
    A0, B0 = _random_factors(shape, 2, seed=1)
    c = torch.randn(2, 5, shape.d_out, dtype=torch.float64, requires_grad=True)
    y = kron_matvec(x, A, B, (A0, B0), accumulate=c, order=order)
    grads = torch.autograd.grad(y, (x, A, B, c), gy)
    dense = sum(torch.kron(A[k], B[k]) for k in range(3)) - sum(torch.kron(A0[k], B0[k]) for k in range(2))
    y_ref = c + x @ dense.T  # independent reference: dense Kronecker products
    grads_ref = torch.autograd.grad(y_ref, (x, A, B, c), gy)
    torch.testing.assert_close(kron_matvec(x, A, B, order=order), x @ sum(torch.kron(a, b) for a, b in zip(A, B)).T)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for got, ref in zip(grads, grads_ref):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_matvec_low_precision_and_autocast():
    shape = KronShape(4, 8, 8, 4)
    A, B = _random_factors(shape, 2, dtype=torch.float32)
    x = torch.randn(3, 32)
    ref = x @ kron_sum(A, B).T
    y = kron_matvec(x.bfloat16(), A, B)
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref).norm() / ref.norm() < 2e-2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_auto = kron_matvec(x, A, B)
    assert y_auto.dtype == torch.bfloat16 and (y_auto.float() - ref).norm() / ref.norm() < 2e-2


def test_forward_and_backward_never_materialise_delta_w(monkeypatch):
    model = get_peft_model(tiny_causal_lm("llama"), SokaConfig(target_modules=ATTN, r_max=3))

    def forbidden(*args, **kwargs):
        raise AssertionError("the dense Kronecker product was built during forward/backward")

    monkeypatch.setattr("petl.adapters.soka.layer.kron_sum", forbidden)
    monkeypatch.setattr(torch, "kron", forbidden)
    model(**lm_inputs()).loss.backward()


# ---------------------------------------------------------------- rank selection

def test_energy_and_elbow_rules_hand_checked():
    sigma = torch.tensor([3.0, 2.0, 1.0])
    assert energy_rank(sigma, 14.0, 0.6) == 1  # 9/14 = 0.64
    assert energy_rank(sigma, 14.0, 0.9) == 2  # 13/14 = 0.93
    assert energy_rank(sigma[:2], 20.0, 0.9) == 2  # threshold not reached: all computed values
    knee = torch.tensor([10.0, 9.5, 9.0, 1.0, 0.9, 0.8, 0.7, 0.6])
    assert elbow_rank(knee, rule="kneedle") == 3
    assert elbow_rank(knee, rule="log_curvature") == 3
    assert elbow_rank(torch.ones(6)) == 6  # flat: no elbow


def test_budget_drops_smallest_sigma_terms_first():
    a = RankedModule("a", 3, 10, torch.tensor([5.0, 4.0, 0.5]))
    b = RankedModule("b", 3, 10, torch.tensor([3.0, 2.0, 1.0]))
    fixed = RankedModule("c", 2, 10, torch.tensor([0.1, 0.05]), fixed=True)
    total = apply_budget([a, b, fixed], budget=60, r_min=1)
    assert (a.rank, b.rank, fixed.rank, total) == (2, 2, 2, 60)  # dropped 0.5 then 1.0
    with pytest.raises(ValueError, match="param_budget"):
        apply_budget([RankedModule("d", 2, 10, torch.tensor([1.0, 0.5]))], budget=5, r_min=1)


def test_chosen_ranks_respect_bounds_budget_and_are_saved(tmp_path, caplog):
    config = SokaConfig(target_modules=ATTN, r_min=2, r_max=5, param_budget=4000)
    with caplog.at_level(logging.INFO, logger="petl.soka"):
        model = get_peft_model(tiny_causal_lm("llama"), config)
    ranks = config.rank_pattern
    assert len(ranks) == 8 and all(2 <= r <= 5 for r in ranks.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(r * KronShape(*config.shape_pattern[k]).term_params for k, r in ranks.items())
    assert trainable <= 4000
    assert "model.layers.0.self_attn.q_proj" in caplog.text and "rank" in caplog.text
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SOKA" and saved["rank_pattern"] == ranks


# ---------------------------------------------------------------- init modes

def test_weight_init_is_identity_and_holds_top_components():
    base = tiny_causal_lm("llama")
    model = get_peft_model(tiny_causal_lm("llama"), SokaConfig(target_modules=["q_proj"], rank_selection="fixed", r=3))
    inputs = lm_inputs()
    expected = base(**inputs).logits
    assert (model(**inputs).logits - expected).norm() / expected.norm() < 1e-6  # float32 rounding only
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    W = base.model.layers[0].self_attn.q_proj.weight.detach().double()
    shape = layer.soka_shape["default"]
    U, S, Vh = torch.linalg.svd(rearrange(W, shape), full_matrices=False)
    top = unrearrange(U[:, :3] @ torch.diag(S[:3]) @ Vh[:3], shape)  # float64 reference
    got = kron_sum(layer.soka_A["default"].double(), layer.soka_B["default"].double())
    assert (got - top).norm() / top.norm() < 1e-5
    assert torch.equal(layer.base_layer.weight, base.model.layers[0].self_attn.q_proj.weight)


def test_grad_init_uses_truncated_gradient():
    model = tiny_causal_lm("llama")
    config = SokaConfig(target_modules=["v_proj"], init_weights="grad", rank_selection="fixed", r=2,
                        grad_step_size=0.5)
    assert accumulate_gradients(model, [lm_inputs(seed=3), lm_inputs(seed=4)], config) == 2
    G = model.model.layers[1].self_attn.v_proj.weight.grad.clone().double()
    assert model.model.layers[1].self_attn.q_proj.weight.grad is None  # only targets get gradients
    peft_model = get_peft_model(model, config)
    layer = peft_model.base_model.model.model.layers[1].self_attn.v_proj
    shape = layer.soka_shape["default"]
    U, S, Vh = torch.linalg.svd(rearrange(-0.5 * G, shape), full_matrices=False)
    expected = unrearrange(U[:, :2] @ torch.diag(S[:2]) @ Vh[:2], shape)
    assert (layer.get_delta_weight("default").double() - expected).norm() / expected.norm() < 1e-5
    assert layer.base_layer.weight.grad is None


def test_grad_init_without_gradients_is_a_clear_error():
    with pytest.raises(ValueError, match="accumulate_gradients"):
        get_peft_model(tiny_causal_lm("llama"), SokaConfig(target_modules=ATTN, init_weights="grad"))


def test_zero_init_starts_at_base_and_needs_fixed_ranks():
    base, inputs = tiny_causal_lm("llama"), lm_inputs()
    model = get_peft_model(tiny_causal_lm("llama"), SokaConfig(init_weights="zero", rank_selection="fixed", r=2))
    assert torch.equal(model(**inputs).logits, base(**inputs).logits)
    with pytest.raises(ValueError, match="rank_selection='fixed'"):
        SokaConfig(init_weights="zero")


def test_prime_dimension_fallbacks(caplog):
    from .adapter_matrix import TinyMLP

    x = torch.randn(3, 13)
    config = SokaConfig(target_modules=["fc1", "fc2"], rank_selection="fixed", r=2)
    with caplog.at_level(logging.WARNING, logger="petl.soka"):
        model = get_peft_model(TinyMLP(), config)
    assert "prime" in caplog.text
    fc1 = model.base_model.model.fc1
    assert fc1.soka_shape["default"] == KronShape(24, 1, 1, 13)  # LoRA-shaped: KPSVD = SVD (PiSSA)
    W = TinyMLP().fc1.weight.detach().double()
    U, S, Vh = torch.linalg.svd(W)
    got = kron_sum(fc1.soka_A["default"].double(), fc1.soka_B["default"].double())
    assert (got - U[:, :2] @ torch.diag(S[:2]) @ Vh[:2]).norm() / W.norm() < 1e-5
    torch.testing.assert_close(model(x=x), TinyMLP()(x), rtol=1e-6, atol=1e-7)  # identity at init
    skipped = get_peft_model(TinyMLP(), SokaConfig(target_modules=["fc1", "fc2"], rank_selection="fixed", r=2,
                                                   prime_fallback="skip"))
    assert isinstance(skipped.base_model.model.fc1, torch.nn.Linear)
    assert skipped.peft_config["default"].rank_pattern["fc1"] == 0
    with pytest.raises(ValueError, match="prime"):
        get_peft_model(TinyMLP(), SokaConfig(target_modules=["fc1"], prime_fallback="error"))


def test_bad_config_values_name_the_field():
    with pytest.raises(ValueError, match="init_weights"):
        SokaConfig(init_weights="pissa")
    with pytest.raises(ValueError, match="r_min"):
        SokaConfig(r_min=5, r_max=2)
    with pytest.raises(ValueError, match="factor=7 does not divide"):
        get_peft_model(tiny_causal_lm("llama"), SokaConfig(target_modules=["q_proj"], factor=7))


# ---------------------------------------------------------------- portability and training

def test_trained_weight_init_adapter_reloads_exactly_on_untouched_base(tmp_path):
    model = get_peft_model(tiny_causal_lm("qwen2"), SokaConfig(r_max=3))
    perturb_adapter(model)
    inputs = lm_inputs()
    expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert any(k.endswith("q_proj.soka_A0") for k in keys) and not any(".default" in k for k in keys)
    loaded = PeftModel.from_pretrained(tiny_causal_lm("qwen2"), tmp_path)
    assert torch.equal(loaded(**inputs).logits, expected)
    merged = PeftModel.from_pretrained(tiny_causal_lm("qwen2"), tmp_path).merge_and_unload()
    assert (merged(**inputs).logits - expected).norm() / expected.norm() < 1e-5


class _TokenData(torch.utils.data.Dataset):
    def __init__(self, n: int = 8, length: int = 16) -> None:
        gen = torch.Generator().manual_seed(5)
        self.ids = torch.randint(0, 128, (n, length), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(output_dir, max_steps: int):
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_causal_lm("llama"), SokaConfig(target_modules=ATTN, r_max=2))
    args = TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=2,
                             learning_rate=5e-3, save_steps=2, save_strategy="steps", logging_steps=1,
                             report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=_TokenData())


def test_trainer_trains_and_resumes_from_checkpoint(tmp_path):
    full = _trainer(tmp_path / "full", 4)
    full.train()
    expected = {k: v for k, v in full.model.state_dict().items() if "soka_" in k}
    assert (tmp_path / "full" / "checkpoint-2" / "adapter_model.safetensors").exists()
    resumed = _trainer(tmp_path / "full", 4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    got = {k: v for k, v in resumed.model.state_dict().items() if "soka_" in k}
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7)
    start = _trainer(tmp_path / "fresh", 1).model.state_dict()
    assert any(not torch.equal(start[k], expected[k]) for k in expected if "soka_A." in k or "soka_B." in k)


@pytest.mark.gpu
@pytest.mark.parametrize("order", ["a_first", "b_first"])
def test_cuda_bf16_matvec_and_layer(order, tmp_path):
    shape = KronShape(16, 32, 64, 32)  # 1024 x 1024
    A, B = (t.cuda().float().requires_grad_() for t in _random_factors(shape, 3, dtype=torch.float32))
    A0, B0 = (t.cuda().float() for t in _random_factors(shape, 3, dtype=torch.float32, seed=4))
    x = torch.randn(512, shape.d_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(512, shape.d_out, device="cuda", dtype=torch.bfloat16)
    y = kron_matvec(x, A, B, (A0, B0), order=order)
    grads = torch.autograd.grad(y, (x, A, B), gy)
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    dense = kron_sum(A64, B64) - kron_sum(A0.double(), B0.double())
    ref = x64 @ dense.T
    refs = torch.autograd.grad(ref, (x64, A64, B64), gy.double())
    assert y.dtype == torch.bfloat16
    for got, want in zip((y,) + grads, (ref,) + refs):
        assert ((got.double() - want).norm() / want.norm()) < 2e-2  # bf16 operands
    model = get_peft_model(tiny_causal_lm("llama").cuda().to(torch.bfloat16), SokaConfig(r_max=3))
    perturb_adapter(model)
    inputs = {k: v.cuda() for k, v in lm_inputs().items()}
    model(**inputs).loss.backward()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_causal_lm("llama").cuda().to(torch.bfloat16), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
