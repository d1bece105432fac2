"""SF through the grouped backend's "merge" mode: S2's fused segment calls + log-sum-exp sink merge.

Truth is the loop-built oracle of tests/test_attention_oracle.py evaluated in float64 (outputs and
the gradients of q, k, v for a random upstream gradient). On CPU the fused CUDA ops are replaced by
two stand-ins with the same (out, lse) forward / (merged out, merged lse) backward contract:
``math`` (plain PyTorch, float64) and ``cpu_flash`` (PyTorch's fused CPU flash op), so the merge,
the custom backward and the plan are checked in CI; the Triton merge kernels run in Triton's
interpreter in one subprocess (``TRITON_INTERPRET=1`` never reaches other test modules). GPU
tolerance rule, as in tests/test_kernels_grouped.py: the merge path's error (vs a float64
reference) <= 2x the error of the reference backend run in the same low precision, + 1e-3.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from petl.attention import PatternConfig
from petl.kernels import attention_grouped as grouped
from petl.kernels import attention_sink_merge as merge
from tests.test_attention_oracle import Case
from tests.test_kernels_grouped import (CASES, compare_grouped_with_reference, make_inputs, oracle, poison,  # noqa: F401
                                        rel, run_grouped)  # (poison: fixture)

ROOT = Path(__file__).resolve().parents[1]
SF_CASES = [c for c in CASES if c.pattern == "sf"]
#: interpreter cases (fp32): few and tiny, the interpreter costs ~1 ms per tile op
INTERP_CASES = ["sf_sinks_over_several_segments", "sf_gqa_batch3"]

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


def use_merge(monkeypatch: pytest.MonkeyPatch, op: str, kernels: bool | None = False) -> None:
    monkeypatch.setattr(grouped, "SINK_MODE", "merge")
    monkeypatch.setattr(grouped, "SEGMENT_OP", op)
    monkeypatch.setattr(grouped, "MERGE_KERNELS", kernels)


def count_merges(monkeypatch: pytest.MonkeyPatch) -> list:
    """Record every SinkSegmentAttention call (so a test cannot pass by silently falling back)."""
    calls: list = []
    real = merge.SinkSegmentAttention.apply
    monkeypatch.setattr(merge.SinkSegmentAttention, "apply", lambda *a: calls.append(a[5]) or real(*a))
    return calls


@pytest.mark.parametrize("op", ["math", "cpu_flash"])
@pytest.mark.parametrize("blhd", [True, False], ids=["blhd", "bhld"])
@pytest.mark.parametrize("case", SF_CASES, ids=lambda c: c.name)
def test_merge_matches_oracle(case: Case, blhd: bool, op: str, monkeypatch: pytest.MonkeyPatch) -> None:
    use_merge(monkeypatch, op)
    calls = count_merges(monkeypatch)
    leaves, views, dout = make_inputs(case, torch.float64, blhd=blhd, seed=5)
    got = run_grouped(case, leaves, views, dout)
    assert calls, "the merge path did not run"
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, oracle(case, leaves, dout)):
        assert torch.isfinite(a).all(), (case.name, name)
        assert rel(a, b) < 1e-12, (case.name, name, rel(a, b))


def test_merge_gqa_repeated_kv(monkeypatch: pytest.MonkeyPatch) -> None:
    """K/V repeated before the op (NATIVE_GQA off) and inside it (an op without GQA) agree too."""
    use_merge(monkeypatch, "cpu_flash")
    case = next(c for c in CASES if c.name == "sf_gqa_batch3")
    leaves, views, dout = make_inputs(case, torch.float64, seed=2)
    truth = oracle(case, leaves, dout)
    monkeypatch.setattr(grouped, "NATIVE_GQA", False)
    for a, b in zip(run_grouped(case, leaves, views, dout), truth):
        assert rel(a, b) < 1e-12


def test_merge_plan_is_s2_plan() -> None:
    """The merge plan runs exactly S2's buckets; every bucket with a segment after the sinks gets
    one sink operand of width min(last start, n_sink)."""
    sf, s2 = PatternConfig.from_params("sf", group_size=16), PatternConfig.from_params("s2", group_size=16)
    plan = grouped.make_plan(sf, 4, 4, 64, "merge")
    ref = grouped.make_plan(s2, 4, 4, 64)
    assert [(b.lo, b.hi, b.count, b.runs) for b in plan.buckets] == [(b.lo, b.hi, b.count, b.runs) for b in ref.buckets]
    assert plan.q_specs == ref.q_specs and plan.kv_specs == ref.kv_specs
    assert [b.sink for b in plan.buckets] == [4, 4, 4]
    assert plan.sink_specs == tuple((b.lo, b.hi, 1, (grouped.Part(0, 0, 4),), False) for b in plan.buckets)
    tiny = grouped.make_plan(PatternConfig.from_params("sf", group_size=4, n_sink=5), 2, 2, 6, "merge")
    assert sorted(b.sink for b in tiny.buckets) == [0, 0, 2, 4]  # segments at 0, 4 | 0 (half), 2


def test_fallbacks_without_a_fused_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU (no SEGMENT_OP) and float32 on CUDA run "square"; cuDNN is not offered strided K/V;
    unknown ops fail in one line."""
    monkeypatch.setattr(grouped, "SINK_MODE", "merge")
    monkeypatch.setattr(grouped, "SEGMENT_OP", None)
    assert grouped.merge_op(torch.zeros(1, 2, 8, 16)) is None
    monkeypatch.setattr(grouped, "SEGMENT_OP", "cudnn")
    assert grouped.merge_op(torch.zeros(1, 2, 8, 16)) is None  # a CUDA op on CPU tensors
    assert not grouped._op_runs("cudnn", "cuda", torch.float32, 128)
    assert not grouped._op_runs("flash", "cuda", torch.bfloat16, 256)
    assert not grouped._op_runs("cudnn", "cpu", torch.bfloat16, 128)
    kv = torch.zeros(1, 8, 2, 16).transpose(1, 2)  # [B, H, L, D] view of [B, L, H, D]: not contiguous
    assert not merge._accepts("cudnn", kv, kv, kv)
    with pytest.raises(ValueError, match="unknown segment op 'fast'; use one of"):
        merge._op_forward("fast", *[torch.zeros(1, 1, 2, 8)] * 3, 1.0)


def test_torch_merge_against_concatenated_softmax() -> None:
    """The merge arithmetic alone: segment (math op) merged with sinks equals one softmax over the
    concatenated keys [sinks, segment] with the segment part causal (hand-built, float64)."""
    g = torch.Generator().manual_seed(0)
    count, heads, kv, n, dim, width = 3, 4, 2, 7, 5, 3
    q = torch.randn(count, heads, n, dim, generator=g, dtype=torch.float64)
    k, v = (torch.randn(count, kv, n, dim, generator=g, dtype=torch.float64) for _ in range(2))
    ks, vs = (torch.randn(1, kv, width, dim, generator=g, dtype=torch.float64) for _ in range(2))
    meta = merge.SinkMeta(count=count, start=0, stride=2, n_sink=width, width=width, lo=0, rep=2, kv_lo=0)
    out, lse, _ = merge._math_forward(q, k, v, 0.3)
    merge.merge_sinks_torch(q, out, lse, ks, vs, meta, 0.3)
    for seg, sinks in enumerate(meta.sinks_per_segment()):  # 0, 2, 3 sinks
        kk = torch.cat([ks[0, :, :sinks], k[seg]], 1).repeat_interleave(2, 0)
        vv = torch.cat([vs[0, :, :sinks], v[seg]], 1).repeat_interleave(2, 0)
        s = q[seg] @ kk.transpose(-1, -2) * 0.3
        allowed = torch.cat([torch.ones(n, sinks, dtype=torch.bool), torch.ones(n, n, dtype=torch.bool).tril()], 1)
        s = s.masked_fill(~allowed, float("-inf"))
        assert torch.allclose(out[seg], torch.softmax(s, -1) @ vv, rtol=0, atol=1e-13)
        assert torch.allclose(lse[seg], torch.logsumexp(s, -1), rtol=0, atol=1e-13)


# --- Triton interpreter subprocess -----------------------------------------------------------------

def _interpreter_main() -> None:
    """Entry point of the subprocess (``TRITON_INTERPRET=1`` set by the parent): prints JSON."""
    grouped.SINK_MODE, grouped.SEGMENT_OP, grouped.MERGE_KERNELS = "merge", "math", True
    real_alloc = grouped._alloc

    def nan_alloc(shape, stride, like, zero):
        out = real_alloc(shape, stride, like, zero=False)
        return out.zero_() if zero else out.fill_(float("nan"))

    grouped._alloc = nan_alloc
    report = {}
    for name in INTERP_CASES:
        case = next(c for c in CASES if c.name == name)
        leaves, views, dout = make_inputs(case, torch.float32, seed=4)
        got = run_grouped(case, leaves, views, dout)
        truth = oracle(case, leaves, dout)
        report[name] = {t: [rel(a, b), bool(torch.isfinite(a).all())] for t, a, b in zip(("out", "dq", "dk", "dv"),
                                                                                          got, truth)}
    print("REPORT" + json.dumps(report))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_merge_in_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", "import tests.test_attention_sink_merge as t; t._interpreter_main()"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.split("REPORT", 1)[1])
    for name, errs in report.items():
        for tensor, (err, finite) in errs.items():
            assert finite, (name, tensor)
            assert err < 1e-5, (name, tensor, err)  # fp32 kernels vs the float64 oracle


# --- GPU -----------------------------------------------------------------------------------------

GPU_CASES = [
    (Case("sf_bf16_d128_gqa_odd_segments", "sf", heads=8, kv_heads=2, length=1800, dim=128,
          params={"group_size": 360}), torch.bfloat16),
    (Case("sf_fp16_d64_mha_batch2", "sf", batch=2, heads=4, kv_heads=4, length=1024, dim=64,
          params={"group_size": 256, "shift_head_fraction": 0.25}), torch.float16),
    (Case("sf_bf16_d64_gqa_split_in_group_L_odd", "sf", heads=8, kv_heads=2, length=1777, dim=64,
          params={"shift_head_fraction": 0.25}), torch.bfloat16),
    (Case("sf_fp16_d128_mqa_sinks_over_segments", "sf", heads=4, kv_heads=1, length=999, dim=128,
          params={"group_size": 4, "n_sink": 6}), torch.float16),
]
GPU_MODES = [("cudnn", True), ("flash", True), ("efficient", True), ("cudnn", False)]  # (segment op, Triton merge)


@pytest.mark.gpu
@pytest.mark.parametrize("op,kernels", GPU_MODES, ids=[f"{op}-{'triton' if k else 'torch'}" for op, k in GPU_MODES])
@pytest.mark.parametrize("case,dtype", GPU_CASES, ids=[c.name for c, _ in GPU_CASES])
def test_merge_gpu(case: Case, dtype: torch.dtype, op: str, kernels: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    use_merge(monkeypatch, op, kernels)
    calls = count_merges(monkeypatch)
    compare_grouped_with_reference(case, dtype)
    assert calls, "the merge path did not run"
