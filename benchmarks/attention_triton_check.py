"""petl's Triton S2/SF attention kernel: GPU tests, a small tile sweep, and fwd+bwd times vs SDPA.

    python -m benchmarks.attention_triton_check                        # H200: tests, sweep, 8k/16k/32k, 128k
    python -m benchmarks.attention_triton_check --no-tests --no-sweep --lengths 16384

Steps, all in one run so every ratio comes from the same machine state:

1. ``pytest -m gpu tests/test_kernels_attention.py`` in a subprocess (correctness first).
2. Tile sweep (D=128, 16k, S2): a few forward / dK-dV / dQ tiles, the fastest of each is used below.
3. A spot check at 4k with those tiles: kernel (bf16) vs the float32 reference, relative L2 of
   out/dq/dk/dv beside the bf16 reference's own error.
4. Per length (B=1, H=32, D=128, bf16, group ratio 1/4): full causal SDPA, Triton S2, Triton SF
   (4 sinks), and GQA 32q/8kv (SDPA with ``enable_gqa`` vs Triton S2), fwd+bwd and forward only;
   medians of ``triton.testing.do_bench``; useful TFLOP/s from the exact count of allowed pairs
   (4 * D * pairs forward, 2.5x that for backward).
5. 128k tokens, Triton S2 fwd+bwd: time and peak memory (K4: memory linear in N).
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from petl.attention import PatternConfig
from petl.attention.layout import build_layout
from petl.attention.reference import reference_attention
from petl.kernels import attention_triton as at
from petl.kernels.attention_triton import BlockConfig, triton_pattern_attention

GIB = 2 ** 30


def allowed_pairs(n: int, cfg: PatternConfig, heads: int) -> int:
    """Exact number of allowed (query, key) pairs summed over heads (one unpadded sample)."""
    G = int(cfg.group_for_length(torch.tensor([n]))[0])
    total = 0
    for h in range(heads):
        sh = G // 2 if h >= cfg.shifted_from(heads) else 0
        cuts = sorted({0, n, *range(G - sh if sh else G, n, G)})
        for a, b in zip(cuts, cuts[1:]):
            m = b - a
            total += m * (m + 1) // 2
            if cfg.n_sink and a > 0:  # rows of later segments also see the sinks
                total += min(cfg.n_sink, a) * m
    return total


def bench_ms(fn, grads=()) -> float:
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=10, rep=80, grad_to_none=list(grads), return_mode="median")


def step_fn(attn, q, k, v, dout):
    def step():
        attn(q, k, v).backward(dout)
    return step


def make_inputs(length: int, heads: int, kv_heads: int, dim: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, heads, length, dim, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
    k, v = (torch.randn(1, kv_heads, length, dim, device="cuda", dtype=torch.bfloat16, generator=g)
            .requires_grad_(True) for _ in range(2))
    dout = torch.randn(1, length, heads, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, k, v, dout


def triton_fn(cfg: PatternConfig, length: int):
    layout = build_layout(1, length, torch.device("cuda"), None, None).with_groups(cfg)
    return lambda q, k, v: triton_pattern_attention(q, k, v, cfg, layout)


def sdpa_fn(gqa: bool):
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa).transpose(1, 2)


def run_tests() -> dict:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                           "tests/test_kernels_attention.py"], capture_output=True, text=True, timeout=300)
    lines = proc.stdout.strip().splitlines()
    print(proc.stdout[-3000:], proc.stderr[-2000:], flush=True)
    return {"returncode": proc.returncode, "summary": lines[-1] if lines else "", "tail": proc.stdout[-1500:]}


def spot_check(length: int = 4096) -> dict:
    out = {}
    for pattern, kw in (("s2", {}), ("sf", {"n_sink": 4})):
        cfg = PatternConfig.from_params(pattern, **kw)
        layout = build_layout(1, length, torch.device("cuda"), None, None).with_groups(cfg)
        q, k, v, dout = make_inputs(length, 8, 2, 128, seed=1)
        res = []
        for fn, dtype in ((reference_attention, torch.float32), (triton_pattern_attention, torch.bfloat16),
                          (reference_attention, torch.bfloat16)):
            leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
            o = fn(*leaves, cfg, layout)
            o.backward(dout.to(dtype))
            res.append([o.detach().float()] + [t.grad.float() for t in leaves])
        rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
        ours, base = [rel(a, t) for a, t in zip(res[1], res[0])], [rel(a, t) for a, t in zip(res[2], res[0])]
        out[pattern] = {"triton_bf16": ours, "reference_bf16": base,
                        "ok": all(o <= 2 * b + 1e-3 for o, b in zip(ours, base))}  # the tests' tolerance rule
    print("spot check (rel L2 out, dq, dk, dv vs fp32 reference):", json.dumps(out), flush=True)
    return out


def sweep(length: int = 16384) -> dict:
    """Time a few tiles per kernel; returns the rows and sets the fastest as CONFIG_OVERRIDE."""
    fwd0, kv0, dq0 = at.GPU_CONFIGS[128]
    cands = {
        "fwd": [fwd0, BlockConfig(128, 128, 8, 2), BlockConfig(128, 64, 8, 3)],
        "dkdv": [kv0, BlockConfig(64, 128, 8, 3), BlockConfig(128, 128, 8, 2), BlockConfig(128, 64, 8, 2)],
        "dq": [dq0, BlockConfig(128, 128, 8, 2), BlockConfig(128, 128, 8, 3)],
    }
    cfg = PatternConfig.from_params("s2")
    attn = triton_fn(cfg, length)
    q, k, v, dout = make_inputs(length, 32, 32, 128)
    rows, best = [], {"fwd": fwd0, "dkdv": kv0, "dq": dq0}
    for role, lst in cands.items():
        times = {}
        for c in lst:
            trial = dict(best, **{role: c})
            at.CONFIG_OVERRIDE = (trial["fwd"], trial["dkdv"], trial["dq"])
            try:
                if role == "fwd":
                    with torch.no_grad():
                        ms = bench_ms(lambda: attn(q, k, v))
                else:
                    out = attn(q, k, v)
                    ms = bench_ms(lambda: out.backward(dout, retain_graph=True), (q, k, v))
                    del out
            except Exception as err:  # a tile that does not compile is recorded and skipped
                rows.append(dict(role=role, config=c.__dict__, error=f"{type(err).__name__}: {err}"[:200]))
                print(json.dumps(rows[-1]), flush=True)
                continue
            times[c] = ms
            rows.append(dict(role=role, config=c.__dict__, ms=round(ms, 3),
                             what="forward" if role == "fwd" else "backward (all kernels)"))
            print(json.dumps(rows[-1]), flush=True)
        if times:
            best[role] = min(times, key=times.get)
    at.CONFIG_OVERRIDE = (best["fwd"], best["dkdv"], best["dq"])
    return {"rows": rows, "chosen": {r: c.__dict__ for r, c in best.items()}}


def time_length(length: int) -> list[dict]:
    rows = []
    s2, sf = PatternConfig.from_params("s2"), PatternConfig.from_params("sf", n_sink=4)
    for heads, kv in ((32, 32), (32, 8)):
        q, k, v, dout = make_inputs(length, heads, kv, 128)
        variants = [("sdpa_causal_full", sdpa_fn(kv != heads), None), ("triton_s2", triton_fn(s2, length), s2)]
        if kv == heads:
            variants.append(("triton_sf_4sinks", triton_fn(sf, length), sf))
        base = base_fwd = None
        for name, fn, cfg in variants:
            ms = bench_ms(step_fn(fn, q, k, v, dout), (q, k, v))
            with torch.no_grad():
                fwd_ms = bench_ms(lambda: fn(q, k, v))
            pairs = heads * length * (length + 1) // 2 if cfg is None else allowed_pairs(length, cfg, heads)
            base = base or ms
            base_fwd = base_fwd or fwd_ms
            rows.append(dict(length=length, heads=heads, kv_heads=kv, variant=name, fwd_bwd_ms=round(ms, 3),
                             fwd_ms=round(fwd_ms, 3), speedup_vs_sdpa=round(base / ms, 3),
                             fwd_speedup_vs_sdpa=round(base_fwd / fwd_ms, 3),
                             useful_tflops=round(4 * 128 * pairs * 3.5 / ms / 1e9, 1)))
            print(json.dumps(rows[-1]), flush=True)
        q = k = v = dout = None  # free before the next shape
        torch.cuda.empty_cache()
    return rows


def memory_row(length: int, pattern: str) -> dict:
    cfg = PatternConfig.from_params(pattern)
    q, k, v, dout = make_inputs(length, 32, 32, 128)
    fn = triton_fn(cfg, length)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step_fn(fn, q, k, v, dout)()
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - before) / GIB
    ms = bench_ms(step_fn(fn, q, k, v, dout), (q, k, v))
    row = dict(length=length, variant=f"triton_{pattern}", fwd_bwd_ms=round(ms, 3),
               inputs_gib=round(before / GIB, 3), peak_extra_gib=round(extra, 3),
               useful_tflops=round(4 * 128 * allowed_pairs(length, cfg, 32) * 3.5 / ms / 1e9, 1))
    print(json.dumps(row), flush=True)
    del q, k, v, dout
    torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--long", type=int, nargs="*", default=[131072])
    parser.add_argument("--no-tests", action="store_true")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/attention_triton_check.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("attention_triton_check needs a CUDA device")
    import transformers
    import triton

    result = dict(benchmark="attention_triton_check", gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=triton.__version__, transformers=transformers.__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  command="python -m benchmarks.attention_triton_check " + " ".join(sys.argv[1:] if argv is None
                                                                                     else argv),
                  config=dict(batch=1, heads=32, dim=128, dtype="bfloat16", group_ratio=0.25,
                              timing="triton.testing.do_bench median, warmup 10 ms, rep 80 ms"),
                  rows=[], long_rows=[])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save = lambda: out.write_text(json.dumps(result, indent=2) + "\n")  # noqa: E731
    if not args.no_tests:
        result["gpu_tests"] = run_tests()
        save()
    if not args.no_sweep:
        result["sweep_16k"] = sweep()
        save()
    result["spot_check_4k"] = spot_check()  # with the tiles timed below
    save()
    result["tiles"] = [c.__dict__ for c in at._configs(128)]
    for length in args.lengths:
        result["rows"] += time_length(length)
        save()
    for length in args.long:
        for pattern in ("s2", "sf"):
            result["long_rows"].append(memory_row(length, pattern))
            save()
    print(f"{'L':>6} {'H/Hkv':>6} {'variant':<18} {'fwd+bwd ms':>10} {'x sdpa':>7} {'fwd ms':>8} {'x sdpa':>7} "
          f"{'TFLOP/s':>8}")
    for r in result["rows"]:
        print(f"{r['length']:>6} {r['heads']:>3}/{r['kv_heads']:<2} {r['variant']:<18} {r['fwd_bwd_ms']:>10.3f} "
              f"{r['speedup_vs_sdpa']:>7.2f} {r['fwd_ms']:>8.3f} {r['fwd_speedup_vs_sdpa']:>7.2f} "
              f"{r['useful_tflops']:>8.1f}")
    return result


if __name__ == "__main__":
    main()
