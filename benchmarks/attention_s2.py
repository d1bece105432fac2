"""S2-Attn / SF-Attn forward+backward against full causal SDPA (flex and varlen only).

Superseded by ``benchmarks/attention_kernels.py`` (all backends, forward alone too, K1-K4 rows);
kept because it also times the flex block-mask build.

    python -m benchmarks.attention_s2                       # H200: B=1, H=32, D=128, bf16, 8k/16k/32k
    python -m benchmarks.attention_s2 --lengths 8192 --out /tmp/x.json

Rows per length: SDPA causal (full attention, the flash backend), petl S2 through FlexAttention,
petl SF (4 sinks) through FlexAttention, petl S2 through ``varlen_attn`` (where available), and
the one-off cost of building each per-head block mask (cached across layers and steps). Times are
medians of ``triton.testing.do_bench`` (CUDA events) over fwd+bwd with a random upstream gradient;
ratios are measured within this one run. A spot check compares Flex S2 with varlen S2 outputs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from petl.attention import PatternConfig, sparse_attention
from petl.attention.flex import build_block_mask
from petl.attention.layout import build_layout

GIB = 2 ** 30


def fwd_bwd(fn, q, k, v, dout):
    """A closure running fn(q, k, v) forward and backward."""
    def step():
        out = fn(q, k, v)
        out.backward(dout)
    return step


def bench(step, tensors) -> tuple[float, float]:
    """(median ms, peak GiB) of ``step``."""
    from triton.testing import do_bench

    step()  # compile / warm up outside the timed region
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / GIB
    ms = do_bench(step, warmup=25, rep=200, grad_to_none=list(tensors), return_mode="median")
    return ms, peak


def variants(args) -> tuple[dict, dict]:
    s2 = PatternConfig.from_params("s2", group_ratio=args.group_ratio)
    sf = PatternConfig.from_params("sf", group_ratio=args.group_ratio, n_sink=4)
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)  # noqa: E731
    rows = {
        "sdpa_causal_full": sdpa,
        "petl_s2_flex": lambda q, k, v: sparse_attention(q, k, v, s2, backend="flex"),
        "petl_sf_flex_4sinks": lambda q, k, v: sparse_attention(q, k, v, sf, backend="flex"),
    }
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
        rows["petl_s2_varlen"] = lambda q, k, v: sparse_attention(q, k, v, s2, backend="varlen")
    except ImportError:
        pass
    return rows, {"petl_s2_flex": s2, "petl_sf_flex_4sinks": sf}


def mask_build_ms(cfg: PatternConfig, heads: int, length: int) -> float:
    layout = build_layout(1, length, torch.device("cuda"), None, None).with_groups(cfg)
    build_block_mask(cfg, heads, layout)  # warm up
    torch.cuda.synchronize()
    start = time.perf_counter()
    build_block_mask(cfg, heads, layout)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--group-ratio", type=float, default=0.25)
    parser.add_argument("--out", default="benchmarks/results/attention_s2.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("attention_s2 needs a CUDA device")
    import transformers
    import triton

    fns, cfgs = variants(args)
    rows, checks = [], []
    result = dict(
        benchmark="attention_s2", gpu=torch.cuda.get_device_name(), torch=torch.__version__,
        triton=triton.__version__, transformers=transformers.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command="python -m benchmarks.attention_s2 " + " ".join(sys.argv[1:] if argv is None else argv),
        config=dict(batch=args.batch, heads=args.heads, dim=args.dim, dtype="bfloat16", group_ratio=args.group_ratio,
                    timing="triton.testing.do_bench median, fwd+bwd, warmup 25 ms, rep 200 ms"),
        rows=rows, checks=checks)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for length in args.lengths:
        gen = torch.Generator(device="cuda").manual_seed(length)
        shape = (args.batch, args.heads, length, args.dim)
        q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_(True)
                   for _ in range(3))
        dout = torch.randn(args.batch, length, args.heads, args.dim, device="cuda", dtype=torch.bfloat16,
                           generator=gen)
        base = None
        for name, fn in fns.items():
            try:
                ms, peak = bench(fwd_bwd(fn, q, k, v, dout), (q, k, v))
            except Exception as err:  # a failing variant is recorded, the others still run
                rows.append(dict(length=length, variant=name, error=f"{type(err).__name__}: {err}"[:300]))
                print(json.dumps(rows[-1]), flush=True)
                continue
            base = ms if name == "sdpa_causal_full" else base
            row = dict(length=length, variant=name, fwd_bwd_ms=round(ms, 3), peak_gib=round(peak, 3),
                       speedup_vs_sdpa=round(base / ms, 3))
            if name in cfgs:
                row["block_mask_build_ms"] = round(mask_build_ms(cfgs[name], args.heads, length), 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
        ok = {r["variant"] for r in rows if r["length"] == length and "error" not in r}
        if {"petl_s2_varlen", "petl_s2_flex"} <= ok:
            with torch.no_grad():
                a = fns["petl_s2_flex"](q, k, v).float()
                b = fns["petl_s2_varlen"](q, k, v).float()
            checks.append(dict(length=length, flex_vs_varlen_max_abs=(a - b).abs().max().item(),
                               flex_vs_varlen_rel_l2=((a - b).norm() / b.norm()).item()))
            print(json.dumps(checks[-1]), flush=True)
        del q, k, v, dout
        torch.cuda.empty_cache()
        out.write_text(json.dumps(result, indent=2) + "\n")  # after every length: partial runs keep their rows
    print(f"{'L':>6} {'variant':<22} {'ms':>9} {'x sdpa':>7} {'GiB':>6}")
    for r in (r for r in rows if "error" not in r):
        print(f"{r['length']:>6} {r['variant']:<22} {r['fwd_bwd_ms']:>9.3f} {r['speedup_vs_sdpa']:>7.2f} "
              f"{r['peak_gib']:>6.2f}")
    return result


if __name__ == "__main__":
    main()
