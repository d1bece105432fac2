"""petl's Triton S2/SF attention kernel (petl/kernels/attention_triton.py) against independent references.

CPU: the kernels run in Triton's interpreter inside ONE subprocess started with
``TRITON_INTERPRET=1`` (so the variable never reaches other test modules), on tiny odd shapes
with 16x16 tiles: segments straddling tiles, unaligned (padded) spans, internal group padding,
sinks split over two tiles, GQA groups mixing shifted and unshifted heads. The truth is eager
float64 attention with the loop-built oracle mask of ``tests/test_attention_oracle.py``; every
buffer the kernel allocates is NaN-poisoned. The subprocess also probes the block-range
arithmetic: visited tiles must be exactly the tiles holding an allowed pair (work scales with the
pattern) and "full" tiles must be entirely allowed (they skip the mask).

GPU (``-m gpu``): bf16/fp16, head dims 64/128, MHA/GQA, odd lengths, padded batches, SF, cyclic,
with petl's float32 reference attention as the truth.

Tolerance rule (both tiers): for the output and each of dq, dk, dv, the kernel's relative L2
error against the truth must be at most 2x the error of plain PyTorch attention run in the
kernel's precision, plus a small epsilon (1e-6 in fp32 on CPU, 1e-3 in 16-bit on GPU).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_attention_oracle import Case, masked_attention, oracle_mask, transformers_mask

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None

#: interpreter cases (fp32): (case, tiles (BM, BN) of the forward, dK/dV and dQ kernels); names say
#: what each one exercises. Sizes are small because the interpreter costs ~1 ms per tile op.
T16 = ((16, 16),) * 3
CPU_CASES = [
    (Case("s2_gqa_len37", "s2", heads=4, kv_heads=2, length=37, dim=16), T16),
    (Case("s2_full_tiles_len100", "s2", heads=2, kv_heads=1, length=100, dim=32, params={"group_size": 64}),
     ((32, 16), (16, 32), (16, 16))),
    (Case("s2_padded_unaligned", "s2", batch=2, heads=2, kv_heads=1, length=64, dim=16, pads=[(0, 13), (29, 0)],
          params={"group_ratio": 0.5}), T16),
    (Case("s2_cyclic_internal_pad", "s2", heads=4, kv_heads=2, length=70, dim=16,
          params={"cyclic": True, "group_size": 24}), ((16, 32), (32, 16), (16, 16))),
    (Case("s2_cyclic_padded", "s2", batch=2, heads=2, kv_heads=2, length=37, dim=16, pads=[(0, 5), (3, 0)],
          params={"cyclic": True}), T16),
    (Case("s2_group_longer_than_span", "s2", heads=2, kv_heads=1, length=37, dim=16, params={"group_size": 64}), T16),
    (Case("sf_padded_sink_pass", "sf", batch=2, heads=2, kv_heads=1, length=100, dim=16, pads=[(0, 0), (21, 0)],
          params={"group_size": 32}), ((32, 32), (16, 16), (32, 16))),
    (Case("sf_sinks_straddle_tiles", "sf", heads=2, kv_heads=1, length=61, dim=16, pads=[(14, 0)],
          params={"group_size": 16, "n_sink": 5}), T16),
    (Case("sf_mixed_gqa_group", "sf", heads=4, kv_heads=2, length=50, dim=16, params={"shift_head_fraction": 0.75}),
     T16),
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _grads(fn, tensors, dout) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _inputs(case: Case, device: str = "cpu", seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(case.batch, case.heads, case.length, case.dim, generator=g, device=device, dtype=torch.float64)
    k, v = (torch.randn(case.batch, case.kv_heads, case.length, case.dim, generator=g, device=device,
                        dtype=torch.float64) for _ in range(2))
    dout = torch.randn(case.batch, case.length, case.heads, case.dim, generator=g, device=device, dtype=torch.float64)
    return (q, k, v), dout


# --- interpreter subprocess ----------------------------------------------------------------------

def _poison(module) -> None:
    """NaN-fill every buffer the kernel wrapper allocates, so an unwritten element fails the test."""
    def empty(*shape, dtype, device):
        t = torch.empty(*shape, dtype=dtype, device=device)
        return t.fill_(float("nan")) if dtype.is_floating_point else t
    module._empty = empty


def _interpreter_numeric(case: Case, tiles: tuple) -> dict:
    from petl.attention import PatternConfig
    from petl.attention.layout import build_layout
    from petl.kernels import attention_triton as at

    at.CONFIG_OVERRIDE = tuple(at.BlockConfig(bm, bn, 1, 1) for bm, bn in tiles)

    cfg = PatternConfig.from_params(case.pattern, **case.params)
    layout = build_layout(case.batch, case.length, torch.device("cpu"), transformers_mask(case), None).with_groups(cfg)
    (q, k, v), dout = _inputs(case)
    mask = oracle_mask(case)
    reason = at.triton_unsupported(cfg, layout, q.float())
    truth = _grads(lambda *t: masked_attention(*t, mask), (q, k, v), dout)
    base = _grads(lambda *t: masked_attention(*t, mask), [t.float() for t in (q, k, v)], dout)
    ours = _grads(lambda *t: at.triton_pattern_attention(*t, cfg, layout), [t.float() for t in (q, k, v)], dout)
    return {"reason": reason, "finite": [bool(torch.isfinite(o).all()) for o in ours],
            "ours": [rel(o, t) for o, t in zip(ours, truth)], "base": [rel(b, t) for b, t in zip(base, truth)]}


def _interpreter_ranges(case: Case, bm: int, bn: int) -> dict:
    """Tiles visited by the range arithmetic vs tiles of the oracle mask (see the module docstring)."""
    from petl.attention import PatternConfig
    from petl.attention.layout import build_layout

    cfg = PatternConfig.from_params(case.pattern, **case.params)
    layout = build_layout(case.batch, case.length, torch.device("cpu"), transformers_mask(case), None).with_groups(cfg)
    nq, nk = -(-case.length // bm), -(-case.length // bn)
    out_q = torch.zeros(case.batch, case.heads, nq, 10, dtype=torch.int32)
    out_k = torch.zeros(case.batch, case.heads, nk, 10, dtype=torch.int32)
    _probe_ranges[(max(nq, nk), case.batch * case.heads)](
        out_q, out_k, layout.start, layout.length, layout.group, layout.padded, case.heads,
        cfg.shifted_from(case.heads), cfg.n_sink, nq, nk, BM=bm, BN=bn, CYCLIC=cfg.cyclic, HAS_SINK=cfg.n_sink > 0)
    mask = oracle_mask(case)
    padded = torch.nn.functional.pad(mask, (0, nk * bn - case.length, 0, nq * bm - case.length))
    tiles = padded.view(case.batch, case.heads, nq, bm, nk, bn)
    any_, all_ = tiles.any(5).any(3), tiles.all(5).all(3)  # [B, H, nq, nk]

    def covered(r: torch.Tensor, size: int, parts: tuple) -> torch.Tensor:  # [..., 10] -> [..., size]
        idx = torch.arange(size)
        return torch.stack([(idx >= r[..., a, None]) & (idx < r[..., b, None]) for a, b in parts]).any(0)

    every = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
    problems = []
    seen_k, full_k = covered(out_q, nk, every), covered(out_q, nk, ((2, 3),))  # [B, H, nq, nk]
    if not torch.equal(seen_k, any_):
        problems.append(f"query tiles visit {(seen_k & ~any_).nonzero().tolist()[:3]} needlessly and miss "
                        f"{(any_ & ~seen_k).nonzero().tolist()[:3]} ([b, h, q tile, k tile])")
    if (full_k & ~all_).any():
        problems.append(f"'full' key tiles not fully allowed: {(full_k & ~all_).nonzero().tolist()[:3]}")
    seen_q, full_q = covered(out_k, nq, every), covered(out_k, nq, ((2, 3),))  # [B, H, nk, nq]
    need = any_.transpose(2, 3).clone()
    # a key tile holding sinks leaves the rows past its own range (r[5]) to the sink pass
    start, end = layout.start[:, None], layout.start[:, None] + torch.clamp(layout.length, max=cfg.n_sink)[:, None]
    k0 = torch.arange(nk) * bn
    has_sink = ((k0[None] < end) & (k0[None] + bn > start))[:, None, :, None]  # [B, 1, nk, 1]
    need &= ~has_sink | (torch.arange(nq) < out_k[..., 5, None])
    if not torch.equal(seen_q, need):
        problems.append(f"key tiles visit {(seen_q & ~need).nonzero().tolist()[:3]} needlessly and miss "
                        f"{(need & ~seen_q).nonzero().tolist()[:3]} ([b, h, k tile, q tile])")
    if (full_q & ~all_.transpose(2, 3)).any():
        problems.append("'full' query tiles not fully allowed")
    return {"problems": problems, "full_key_tiles": int(full_k.sum()), "full_query_tiles": int(full_q.sum())}


def _interpreter_unsupported() -> dict:
    from petl.attention import PatternConfig
    from petl.attention.layout import build_layout
    from petl.kernels.attention_triton import triton_unsupported
    from tests.test_attention_oracle import position_ids

    q = torch.zeros(1, 4, 40, 16)
    plain = build_layout(1, 40, torch.device("cpu"), None, None)
    packed_case = Case("p", "s2", length=40, docs=[[15, 25]])
    packed = build_layout(1, 40, torch.device("cpu"), None, position_ids(packed_case))
    window = torch.ones(40, 40, dtype=torch.bool).tril().triu(-8)[None, None]
    windowed = build_layout(1, 40, torch.device("cpu"), window, None)
    s2, sf = PatternConfig.from_params("s2"), PatternConfig.from_params("sf")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bidir = PatternConfig.from_params("sf", sink_bidirectional=True)
    return {"plain": triton_unsupported(sf, plain, q), "packed": triton_unsupported(s2, packed, q),
            "window": triton_unsupported(s2, windowed, q), "bidir": triton_unsupported(bidir, plain, q),
            "dim24": triton_unsupported(s2, plain, torch.zeros(1, 4, 40, 24)),
            "many_sinks": triton_unsupported(PatternConfig.from_params("sf", n_sink=65), plain, q)}


def _interpreter_main() -> None:
    """Entry point of the subprocess (``TRITON_INTERPRET=1`` set by the parent): prints JSON."""
    from petl.kernels import attention_triton

    _poison(attention_triton)
    report = {"numeric": {c.name: _interpreter_numeric(c, tiles) for c, tiles in CPU_CASES},
              "ranges": {f"{c.name}@{bm}x{bn}": _interpreter_ranges(c, bm, bn)
                         for c, tiles in CPU_CASES for bm, bn in sorted(set(tiles) | {(16, 16)})},
              "unsupported": _interpreter_unsupported()}
    print("@@REPORT@@" + json.dumps(report))


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and HAS_TRITON:
    import triton
    import triton.language as tl

    from petl.kernels.attention_ranges import key_blocks, query_blocks

    @triton.jit
    def _probe_ranges(OUT_Q, OUT_K, START, LENGTH, GROUP, PADDED, H, H0, n_sink, NQ, NK, BM: tl.constexpr,
                      BN: tl.constexpr, CYCLIC: tl.constexpr, HAS_SINK: tl.constexpr):
        i = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        s = tl.load(START + b)
        n = tl.load(LENGTH + b)
        G = tl.load(GROUP + b)
        npad = tl.load(PADDED + b)
        sh = tl.where(h >= H0, G // 2, 0)
        if i < NQ:
            r = key_blocks(i * BM, s, n, G, sh, npad, n_sink, BM, BN, CYCLIC, HAS_SINK)
            for j in tl.static_range(10):
                tl.store(OUT_Q + (bh * NQ + i) * 10 + j, r[j])
        if i < NK:
            r = query_blocks(i * BN, s, n, G, sh, npad, BM, BN, CYCLIC)
            for j in tl.static_range(10):
                tl.store(OUT_K + (bh * NK + i) * 10 + j, r[j])


@pytest.fixture(scope="module")
def interpreter_report() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", "import tests.test_kernels_attention as t; t._interpreter_main()"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    marker = [line for line in proc.stdout.splitlines() if line.startswith("@@REPORT@@")]
    assert proc.returncode == 0 and marker, proc.stderr[-4000:]
    return json.loads(marker[0][len("@@REPORT@@"):])


needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@needs_triton
@pytest.mark.parametrize("name", [c.name for c, _ in CPU_CASES])
def test_interpreter_matches_float64(interpreter_report: dict, name: str) -> None:
    r = interpreter_report["numeric"][name]
    assert r["reason"] is None, r["reason"]
    assert all(r["finite"]), (name, r["finite"])
    for what, ours, base in zip(("out", "dq", "dk", "dv"), r["ours"], r["base"]):
        assert ours <= 2 * base + 1e-6, (name, what, ours, base)


@needs_triton
def test_block_ranges_are_exact(interpreter_report: dict) -> None:
    """Visited tiles == tiles with an allowed pair; 'full' tiles are entirely allowed."""
    for name, r in interpreter_report["ranges"].items():
        assert not r["problems"], (name, r["problems"])


@needs_triton
def test_unmasked_paths_are_exercised(interpreter_report: dict) -> None:
    """The numeric cases run each kernel's unmasked full-tile loop somewhere (else it is untested)."""
    ranges = interpreter_report["ranges"]
    fwd, dkdv, dq = ([ranges[f"{c.name}@{tiles[i][0]}x{tiles[i][1]}"] for c, tiles in CPU_CASES] for i in range(3))
    assert sum(r["full_key_tiles"] for r in fwd) > 0
    assert sum(r["full_query_tiles"] for r in dkdv) > 0
    assert sum(r["full_key_tiles"] for r in dq) > 0


@needs_triton
def test_unsupported_reasons(interpreter_report: dict) -> None:
    r = interpreter_report["unsupported"]
    assert r["plain"] is None
    assert "packed documents" in r["packed"]
    assert "more than causality and padding" in r["window"]
    assert "sink_bidirectional" in r["bidir"]
    assert "head dims" in r["dim24"]
    assert "n_sink <= 64" in r["many_sinks"]


@needs_triton
def test_cpu_without_interpreter_is_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    from petl.attention import PatternConfig
    from petl.attention.layout import build_layout
    from petl.kernels.attention_triton import triton_pattern_attention, triton_unsupported

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = PatternConfig.from_params("s2")
    layout = build_layout(1, 8, torch.device("cpu"), None, None)
    q = torch.zeros(1, 2, 8, 16)
    assert "needs CUDA tensors" in triton_unsupported(cfg, layout, q)
    with pytest.raises(ValueError, match="use backend='flex'"):
        triton_pattern_attention(q, q, q, cfg, layout)


# --- GPU -------------------------------------------------------------------------------------------

GPU_CASES = [
    (Case("s2_mha_d128_len2049", "s2", heads=4, kv_heads=4, length=2049, dim=128), torch.bfloat16),
    (Case("s2_gqa_d64_padded_len1000", "s2", batch=2, heads=8, kv_heads=2, length=1000, dim=64,
          pads=[(0, 0), (0, 300)]), torch.bfloat16),
    (Case("s2_gqa_d128_fp16_leftpad", "s2", batch=2, heads=8, kv_heads=2, length=1000, dim=128,
          pads=[(77, 0), (0, 0)]), torch.float16),
    (Case("s2_cyclic_gqa_d128_len1536", "s2", heads=8, kv_heads=4, length=1536, dim=128, params={"cyclic": True}),
     torch.bfloat16),
    (Case("sf_gqa_d128_padded_len2049", "sf", batch=2, heads=8, kv_heads=2, length=2049, dim=128,
          pads=[(0, 0), (333, 0)]), torch.bfloat16),
    (Case("sf_mha_d64_fp16_len1000", "sf", heads=4, kv_heads=4, length=1000, dim=64), torch.float16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case,dtype", GPU_CASES, ids=[c.name for c, _ in GPU_CASES])
def test_gpu_matches_reference(case: Case, dtype: torch.dtype) -> None:
    from petl.attention import PatternConfig
    from petl.attention.layout import build_layout
    from petl.attention.reference import reference_attention
    from petl.kernels import attention_triton as at

    _poison(at)
    cfg = PatternConfig.from_params(case.pattern, **case.params)
    mask = transformers_mask(case)
    layout = build_layout(case.batch, case.length, torch.device("cuda"), None if mask is None else mask.cuda(),
                          None).with_groups(cfg)
    (q, k, v), dout = _inputs(case, "cuda")
    assert at.triton_unsupported(cfg, layout, q.to(dtype)) is None
    ref = lambda *t: reference_attention(*t, cfg, layout)  # noqa: E731
    truth = _grads(ref, [t.float() for t in (q, k, v)], dout)
    base = _grads(ref, [t.to(dtype) for t in (q, k, v)], dout)
    ours = _grads(lambda *t: at.triton_pattern_attention(*t, cfg, layout), [t.to(dtype) for t in (q, k, v)], dout)
    for what, o, b, t in zip(("out", "dq", "dk", "dv"), ours, base, truth):
        assert torch.isfinite(o).all(), (case.name, what)
        assert rel(o, t) <= 2 * rel(b, t) + 1e-3, (case.name, what, rel(o, t), rel(b, t))
