"""The grouped backend (fused causal SDPA per segment) and the attention backend dispatch.

Truth is the loop-built oracle of tests/test_attention_oracle.py (independent of petl's rules),
evaluated by eager float64 attention; outputs and the gradients of q, k and v for a random
upstream gradient. Every buffer the backend allocates is NaN-poisoned, so an output row or
gradient element it forgets to write fails. GPU tolerance rule: the grouped error (vs a float64
reference) <= 2x the error of the reference backend run in the same low precision, + 1e-3.
"""
from __future__ import annotations

import pytest
import torch

from petl.attention import PatternConfig, sparse_attention
from petl.attention import dispatch
from petl.attention.layout import build_layout
from petl.attention.patterns import dense_mask
from petl.kernels import attention_grouped as grouped
from tests.test_attention_oracle import Case, masked_attention, oracle_mask, transformers_mask

CASES = [
    Case("s2_whole_groups", "s2", length=64, params={"group_size": 16}),
    Case("s2_L_not_multiple_of_G", "s2", length=45),  # G = 10
    Case("s2_odd_L", "s2", length=37, dim=5),
    Case("s2_group_longer_than_L", "s2", length=10, params={"group_size": 16}),
    Case("s2_cyclic_whole_groups", "s2", length=64, params={"group_size": 16, "cyclic": True}),
    Case("s2_cyclic_pad_over_half", "s2", length=42, params={"group_size": 8, "cyclic": True}),  # N-L = 6 > G/2
    Case("s2_cyclic_odd_L", "s2", length=45, params={"cyclic": True}),
    Case("s2_cyclic_group_longer_than_L", "s2", length=10, params={"group_size": 16, "cyclic": True}),
    Case("sf_default", "sf", length=50),
    Case("sf_sinks_over_several_segments", "sf", length=30, params={"group_size": 4, "n_sink": 5}),
    Case("sf_groups_of_two", "sf", length=29, params={"group_size": 2}),
    Case("s2_gqa_split_on_kv_boundary", "s2", heads=8, kv_heads=2, length=48),
    Case("s2_gqa_split_inside_kv_group", "s2", heads=8, kv_heads=2, length=48, params={"shift_head_fraction": 0.25}),
    Case("sf_gqa_batch3", "sf", batch=3, heads=6, kv_heads=2, length=48),
    Case("s2_no_shifted_heads_batch2", "s2", batch=2, length=40, params={"shift_head_fraction": 0.0}),
    Case("sf_all_shifted_mqa_batch2", "sf", batch=2, heads=4, kv_heads=1, length=33,
         params={"shift_head_fraction": 1.0}),
    # both head classes read the same KV head: their K/V gradients must add, not overwrite
    Case("s2_mqa_classes_share_kv", "s2", heads=2, kv_heads=1, length=24, params={"group_size": 8}),
    Case("sf_mqa_classes_share_kv", "sf", heads=4, kv_heads=1, length=40, params={"group_size": 8, "n_sink": 2}),
]
#: (SINK_MODE, NATIVE_GQA) combinations; the first is the default
MODES = [("square", True), ("lower_right", True), ("square", False)]


@pytest.fixture(autouse=True)
def poison(monkeypatch: pytest.MonkeyPatch) -> None:
    """NaN-fill every output and gradient buffer the grouped backend allocates."""
    real = grouped._alloc

    def nan_alloc(shape, stride, like, zero):
        out = real(shape, stride, like, zero=False)
        return out.zero_() if zero else out.fill_(float("nan"))

    monkeypatch.setattr(grouped, "_alloc", nan_alloc)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def make_inputs(case: Case, dtype: torch.dtype, device: str = "cpu", blhd: bool = True, seed: int = 0):
    """Leaves and the [B, H, L, D] views handed to the backend. ``blhd``: transformers' memory layout."""
    g = torch.Generator(device=device).manual_seed(seed)
    leaves, views = [], []
    for heads in (case.heads, case.kv_heads, case.kv_heads):
        shape = (case.batch, case.length, heads, case.dim) if blhd else (case.batch, heads, case.length, case.dim)
        x = torch.randn(shape, generator=g, device=device, dtype=torch.float64).to(dtype).requires_grad_(True)
        leaves.append(x)
        views.append(x.transpose(1, 2) if blhd else x)
    dout = torch.randn(case.batch, case.length, case.heads, case.dim, generator=g, device=device,
                       dtype=torch.float64).to(dtype)
    return leaves, views, dout


def run_grouped(case: Case, leaves, views, dout) -> list[torch.Tensor]:
    cfg = PatternConfig.from_params(case.pattern, **case.params)
    out = sparse_attention(*views, cfg, backend="grouped")
    out.backward(dout)
    return [out.detach()] + [x.grad for x in leaves]


def oracle(case: Case, leaves, dout) -> list[torch.Tensor]:
    ref = [x.detach().double().requires_grad_(True) for x in leaves]
    views = [x.transpose(1, 2) if x.shape[1] == case.length else x for x in ref]
    out = masked_attention(*views, oracle_mask(case))
    out.backward(dout.double())
    return [out.detach()] + [x.grad for x in ref]


@pytest.mark.parametrize("blhd", [True, False], ids=["blhd", "bhld"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_grouped_matches_oracle(case: Case, blhd: bool) -> None:
    leaves, views, dout = make_inputs(case, torch.float64, blhd=blhd)
    got = run_grouped(case, leaves, views, dout)
    truth = oracle(case, leaves, dout)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, truth):
        assert torch.isfinite(a).all(), (case.name, name)
        assert rel(a, b) < 1e-12, (case.name, name, rel(a, b))


def set_mode(monkeypatch: pytest.MonkeyPatch, sink_mode: str, native_gqa: bool) -> None:
    monkeypatch.setattr(grouped, "SINK_MODE", sink_mode)
    monkeypatch.setattr(grouped, "NATIVE_GQA", native_gqa)


@pytest.mark.parametrize("sink_mode,native_gqa", MODES)
@pytest.mark.parametrize("name", ["sf_sinks_over_several_segments", "s2_gqa_split_inside_kv_group",
                                  "sf_gqa_batch3", "sf_all_shifted_mqa_batch2"])
def test_grouped_modes(name: str, sink_mode: str, native_gqa: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways of joining sinks, and GQA with and without repeated K/V, give the same function."""
    set_mode(monkeypatch, sink_mode, native_gqa)
    case = next(c for c in CASES if c.name == name)
    leaves, views, dout = make_inputs(case, torch.float64, seed=1)
    for a, b in zip(run_grouped(case, leaves, views, dout), oracle(case, leaves, dout)):
        assert rel(a, b) < 1e-12


def test_float32_close_to_oracle() -> None:
    case = next(c for c in CASES if c.name == "sf_gqa_batch3")
    leaves, views, dout = make_inputs(case, torch.float32, seed=3)
    for a, b in zip(run_grouped(case, leaves, views, dout), oracle(case, leaves, dout)):
        assert rel(a, b) < 1e-5


def test_plan_shape_and_zero_copy() -> None:
    """S2 on whole groups is three SDPA calls; for B=1 in transformers' layout the full-group
    operands are views of q (no copy)."""
    cfg = PatternConfig.from_params("s2", group_size=16)
    plan = grouped.make_plan(cfg, 4, 4, 64)
    buckets = {(b.lo, b.hi, b.count, b.runs): i for i, b in enumerate(plan.buckets)}
    assert set(buckets) == {
        (0, 2, 4, (grouped.Part(0, 16, 16),)),  # unshifted groups
        (2, 4, 3, (grouped.Part(8, 16, 16),)),  # inner shifted groups [G/2 + kG, 3G/2 + kG)
        (2, 4, 2, (grouped.Part(0, 56, 8),)),  # the two shifted half-groups
    }
    q = torch.randn(1, 64, 4, 8).transpose(1, 2)
    ops = grouped._Gather.apply(q, plan.q_specs, True)
    unshifted, inner = buckets[(0, 2, 4, (grouped.Part(0, 16, 16),))], buckets[(2, 4, 3, (grouped.Part(8, 16, 16),))]
    assert ops[unshifted].shape == (4, 2, 16, 8) and ops[inner].shape == (3, 2, 16, 8)
    assert ops[unshifted].data_ptr() == q.data_ptr()
    assert ops[inner].data_ptr() == q.data_ptr() + (8 * 32 + 2 * 8) * 4  # position 8, head 2, float32


@pytest.mark.parametrize("pattern,params,heads,length", [
    ("s2", {}, 4, 64), ("s2", {"cyclic": True, "group_size": 8}, 4, 42), ("sf", {"group_size": 4, "n_sink": 5}, 6, 30),
    ("sf", {}, 4, 37),
])
def test_pattern_pairs_counts_the_mask(pattern: str, params: dict, heads: int, length: int) -> None:
    cfg = PatternConfig.from_params(pattern, **params)
    layout = build_layout(2, length, torch.device("cpu"), None, None).with_groups(cfg)
    assert grouped.pattern_pairs(cfg, heads, length, batch=2) == int(dense_mask(cfg, heads, layout).sum())


@pytest.mark.parametrize("reentrant", [False, True])
def test_model_with_gradient_checkpointing(reentrant: bool) -> None:
    """A tiny llama trained with checkpointing: grouped equals the reference backend."""
    from petl.attention import use_attention
    from petl.testing import tiny_causal_lm

    x = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(0))
    result = {}
    for backend in ("grouped", "reference"):
        model = tiny_causal_lm("llama", max_position_embeddings=64).train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.config.use_cache = False
        use_attention(model, "sf", backend=backend, group_size=16)
        loss = model(x, labels=x).loss
        loss.backward()
        result[backend] = (loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert abs(result["grouped"][0] - result["reference"][0]) < 1e-5
    assert len(result["grouped"][1]) == len(result["reference"][1]) > 0
    for a, b in zip(result["grouped"][1], result["reference"][1]):
        assert rel(a, b) < 1e-4


# --- dispatch ------------------------------------------------------------------------------------

def call(pattern: str = "s2", padded: bool = False, length: int = 16, **params):
    """(cfg, layout, query) of a CPU call; ``padded`` gives a data-dependent layout. The query is a
    stride-0 stand-in: only its shape, device and dtype are read."""
    cfg = PatternConfig.from_params(pattern, **params)
    mask = None
    if padded:
        mask = transformers_mask(Case("d", pattern, batch=2, length=length, pads=[(0, 0), (0, 5)]))
    layout = build_layout(2, length, torch.device("cpu"), mask, None).with_groups(cfg)
    return cfg, layout, torch.zeros(()).expand(2, 4, length, 8)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv(dispatch.ENV_BACKEND, raising=False)
    monkeypatch.delenv("PETL_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return monkeypatch


def fake_triton(monkeypatch: pytest.MonkeyPatch, reason: str | None) -> None:
    monkeypatch.setattr(dispatch, "_TRITON", [(lambda *a, **k: None, lambda cfg, layout, q: reason)])
    monkeypatch.setattr(dispatch, "use_kernels", lambda device, explicit=None: device.type == "cuda")


def test_resolution_order(clean_env: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    cfg, layout, q = call(length=32768)
    fake_triton(clean_env, None)
    assert dispatch.resolve_backend(cfg, cpu, query=q, layout=layout) == "reference"
    assert dispatch.resolve_backend(cfg, cuda, query=q, layout=layout) == "grouped"
    assert dispatch.resolve_backend(cfg, cuda) == "flex"  # nothing known about the call
    clean_env.setenv("PETL_KERNELS", "off")
    assert dispatch.resolve_backend(cfg, cuda, query=q, layout=layout) == "reference"
    clean_env.setenv("PETL_KERNELS", "on")
    assert dispatch.resolve_backend(cfg, cuda) == "triton"
    clean_env.setenv(dispatch.ENV_BACKEND, "flex")
    assert dispatch.resolve_backend(cfg, cuda, query=q, layout=layout) == "flex"
    cfg_grouped = PatternConfig.from_params("s2", backend="grouped")
    assert dispatch.resolve_backend(cfg_grouped, cuda, query=q, layout=layout) == "grouped"
    assert dispatch.resolve_backend(cfg_grouped, cuda, "varlen", query=q, layout=layout) == "varlen"


def test_auto_per_layout(clean_env: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")
    cfg, layout, q = call(padded=True)
    fake_triton(clean_env, None)
    assert dispatch.resolve_backend(cfg, cuda, query=q, layout=layout) == "triton"
    fake_triton(clean_env, "not today")
    assert dispatch.resolve_backend(cfg, cuda, query=q, layout=layout) == "flex"
    clean_env.setattr(dispatch, "_TRITON", ["petl.kernels.attention_triton does not import (ImportError: x)"])
    assert dispatch.resolve_backend(cfg, cuda, query=q, layout=layout) == "flex"
    cfg, layout, q = call("sf", length=65536)
    assert dispatch.resolve_backend(cfg, cuda, query=q, layout=layout) == "grouped"


@pytest.mark.parametrize("pattern,length,short", [("s2", 8192, True), ("s2", 16384, False), ("sf", 16384, True),
                                                  ("sf", 32768, False)])
def test_auto_short_groups_prefer_triton(pattern: str, length: int, short: bool, clean_env: pytest.MonkeyPatch) -> None:
    """Static rows: triton below TRITON_BELOW_GROUP (where it measured faster), grouped above; grouped
    whenever triton is unavailable."""
    cuda = torch.device("cuda")
    cfg, layout, q = call(pattern, length=length)
    fake_triton(clean_env, None)
    assert dispatch.resolve_backend(cfg, cuda, query=q, layout=layout) == ("triton" if short else "grouped")
    fake_triton(clean_env, "no")
    assert dispatch.resolve_backend(cfg, cuda, query=q, layout=layout) == "grouped"


def one_line_error(exc_type, fn, match: str) -> str:
    with pytest.raises(exc_type, match=match) as err:
        fn()
    assert "\n" not in str(err.value)
    return str(err.value)


def test_forced_backend_errors(clean_env: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    cfg, layout, q = call(padded=True)
    msg = one_line_error(ValueError, lambda: dispatch.resolve_backend(cfg, cpu, "grouped", query=q, layout=layout),
                         "attention backend 'grouped' \\(from backend=grouped\\) cannot run this call: the batch has "
                         "padding")
    assert "backends that can: reference, flex" in msg
    clean_env.setattr(dispatch, "_TRITON", ["petl.kernels.attention_triton does not import (ImportError: gone)"])
    clean_env.setenv(dispatch.ENV_BACKEND, "triton")
    one_line_error(ValueError, lambda: dispatch.resolve_backend(cfg, cuda, query=q, layout=layout),
                   "from PETL_ATTENTION_BACKEND=triton.*does not import")
    one_line_error(RuntimeError, lambda: dispatch.backend_impl("triton"), "attention backend 'triton' is unavailable")
    clean_env.setenv(dispatch.ENV_BACKEND, "fast")
    one_line_error(ValueError, lambda: dispatch.resolve_backend(cfg, cpu), "PETL_ATTENTION_BACKEND='fast' is not a")
    clean_env.delenv(dispatch.ENV_BACKEND)
    clean_env.setenv("PETL_KERNELS", "on")
    one_line_error(RuntimeError, lambda: dispatch.resolve_backend(cfg, cpu, query=q, layout=layout), "PETL_KERNELS=on")


def test_grouped_rejects_bidirectional_sinks(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.warns(UserWarning):
        cfg = PatternConfig.from_params("sf", sink_bidirectional=True)
    _, layout, q = call()
    assert "sink_bidirectional" in grouped.grouped_unsupported(cfg, layout, q)
    one_line_error(ValueError, lambda: grouped.grouped_pattern_attention(q, q, q, cfg, layout),
                   "backend='grouped' cannot run this call: sink_bidirectional")
    fake_triton(clean_env, None)
    assert dispatch.resolve_backend(cfg, torch.device("cuda"), query=q, layout=layout) == "triton"


def test_recipe_accepts_backend_names() -> None:
    from petl.train.recipe import AttentionSection
    from petl.train.schema_types import RecipeError, from_dict

    for name in ("grouped", "triton"):
        section = from_dict(AttentionSection, {"pattern": "s2", "backend": name}, "attention")
        assert section.params()["backend"] == name
        assert PatternConfig.from_params("s2", **section.params()).backend == name
    with pytest.raises(RecipeError, match="choose one of: .*grouped, triton"):
        from_dict(AttentionSection, {"pattern": "s2", "backend": "fast"}, "attention")


# --- GPU -----------------------------------------------------------------------------------------

GPU_CASES = [
    (Case("s2_bf16_d128_L_odd", "s2", heads=8, kv_heads=8, length=1999, dim=128), torch.bfloat16),
    (Case("s2_fp16_d64_gqa", "s2", batch=2, heads=8, kv_heads=2, length=1536, dim=64), torch.float16),
    (Case("s2_cyclic_bf16_d128_gqa", "s2", heads=8, kv_heads=4, length=1500, dim=128, params={"cyclic": True}),
     torch.bfloat16),
    (Case("sf_bf16_d128_gqa_L_odd", "sf", heads=8, kv_heads=2, length=1777, dim=128), torch.bfloat16),
    (Case("sf_fp16_d64_batch2", "sf", batch=2, heads=4, kv_heads=4, length=1024, dim=64,
          params={"group_size": 256, "shift_head_fraction": 0.25}), torch.float16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("sink_mode,native_gqa", MODES)
@pytest.mark.parametrize("case,dtype", GPU_CASES, ids=[c.name for c, _ in GPU_CASES])
def test_grouped_gpu(case: Case, dtype: torch.dtype, sink_mode: str, native_gqa: bool,
                     monkeypatch: pytest.MonkeyPatch) -> None:
    set_mode(monkeypatch, sink_mode, native_gqa)
    compare_grouped_with_reference(case, dtype)


def compare_grouped_with_reference(case: Case, dtype: torch.dtype) -> None:
    """On CUDA: the grouped backend's output and input gradients in ``dtype`` against the float64
    reference, each within 2x the same-dtype reference's error + 1e-3 (the rule of these tests)."""
    cfg = PatternConfig.from_params(case.pattern, **case.params)
    leaves, views, dout = make_inputs(case, torch.float64, device="cuda")

    def run(dtype: torch.dtype, backend: str) -> list[torch.Tensor]:
        xs = [x.detach().to(dtype).requires_grad_(True) for x in leaves]
        out = sparse_attention(*(x.transpose(1, 2) for x in xs), cfg, backend=backend)
        out.backward(dout.to(dtype))
        return [out.detach()] + [x.grad for x in xs]

    truth, base, fast = run(torch.float64, "reference"), run(dtype, "reference"), run(dtype, "grouped")
    for name, f, b, t in zip(("out", "dq", "dk", "dv"), fast, base, truth):
        assert torch.isfinite(f).all(), (case.name, name)
        assert rel(f, t) <= 2 * rel(b, t) + 1e-3, (case.name, name, rel(f, t), rel(b, t))
