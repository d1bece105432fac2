"""S2/SF attention backends against full causal SDPA: the official attention kernel benchmark (K1-K4).

    python -m benchmarks.attention_kernels                  # H200: B=1, H=32, D=128, bf16, 8k..64k + GQA + K4
    python -m benchmarks.attention_kernels --lengths 8192 --k4-lengths --out /tmp/x.json

Rows (per length; heads 32/32, and 32q/8kv at ``--gqa-lengths``), each timed forward alone
(a training forward: inputs require grad) and forward+backward with a random upstream gradient:
full causal SDPA (the baseline), petl S2 through ``flex``, ``varlen``, ``grouped`` and ``triton``,
and SF with 4 sinks through ``grouped``, ``triton`` and ``flex``. Probe rows (``--probe-lengths``)
time variants of the grouped backend (SDPA kernel forced, the other sink joins, the segment op and
the PyTorch merge of SF's "merge" mode, repeated GQA K/V) that its defaults were chosen from. K4
rows time fwd+bwd at ``--k4-lengths`` with the peak memory. ``--merge-into`` adds a run to an
existing results file (rows keep a ``run`` index; ratios never mix runs).

Inputs are in transformers' memory layout (``[B, L, H, D]`` viewed as ``[B, H, L, D]``). Before any
timing every path is checked at ``--check-length`` against the reference backend: its relative L2
error (output, dq, dk, dv) against a float32 reference must stay within 2x the bf16 reference's +
1e-3. Times are medians of ``triton.testing.do_bench`` after warm-up; useful TFLOP/s count
``4*B*H*D`` per allowed query-key pair forward and 2.5x that for backward. Ratios are within this run.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from petl.attention import PatternConfig, sparse_attention
from petl.kernels import attention_grouped as grouped

GIB = 2 ** 30
S2 = PatternConfig.from_params("s2", group_ratio=0.25)
SF = PatternConfig.from_params("sf", group_ratio=0.25, n_sink=4)
SDPA = "sdpa_causal_full"
MAIN = [SDPA, "s2_flex", "s2_varlen", "s2_grouped", "s2_triton", "sf_grouped", "sf_triton", "sf_flex"]
PROBES = ["sdpa_causal_full[flash]", "sdpa_causal_full[cudnn]", "s2_grouped[flash]", "s2_grouped[cudnn]",
          "sf_grouped[lower_right]", "sf_grouped[merge]", "sf_grouped[merge_flash]", "sf_grouped[merge_efficient]",
          "sf_grouped[merge_torch]",
          "s2_grouped[repeat_kv]", "sf_grouped[repeat_kv]"]
#: probe name -> knobs of the grouped backend
PROBE_KNOBS = {"flash": {"SDPA_PRIORITY": ("FLASH_ATTENTION",)}, "cudnn": {"SDPA_PRIORITY": ("CUDNN_ATTENTION",)},
               "lower_right": {"SINK_MODE": "lower_right"}, "square": {"SINK_MODE": "square"},
               "merge": {"SINK_MODE": "merge", "SEGMENT_OP": "cudnn"},
               "merge_flash": {"SINK_MODE": "merge", "SEGMENT_OP": "flash"},
               "merge_efficient": {"SINK_MODE": "merge", "SEGMENT_OP": "efficient"},
               "merge_torch": {"SINK_MODE": "merge", "SEGMENT_OP": "cudnn", "MERGE_KERNELS": False},
               "repeat_kv": {"NATIVE_GQA": False}}
K4 = ["s2_grouped", "sf_grouped", "s2_triton", "sf_triton"]


@contextlib.contextmanager
def knobs(**values):
    """Temporarily set module knobs of the grouped backend (SINK_MODE, NATIVE_GQA, SDPA_PRIORITY,
    SEGMENT_OP, MERGE_KERNELS)."""
    old = {k: getattr(grouped, k) for k in values}
    for k, v in values.items():
        setattr(grouped, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(grouped, k, v)


def _sdpa_full(backend: str | None) -> Callable:
    def fn(q, k, v):
        ctx = contextlib.nullcontext()
        if backend:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            ctx = sdpa_kernel(getattr(SDPBackend, backend))
        with ctx:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        return out.transpose(1, 2)
    return fn


def variant(name: str) -> tuple[Callable, PatternConfig | None]:
    """``(fn(q, k, v) -> [B, L, H, D], pattern)`` of a row name ``<pattern>_<backend>[probe]``."""
    if name.startswith(SDPA):
        probe = name[len(SDPA):].strip("[]")
        return _sdpa_full({"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION"}.get(probe)), None
    base, _, probe = name.partition("[")
    pattern, backend = base.split("_", 1)
    cfg = S2 if pattern == "s2" else SF
    probe = probe.rstrip("]")
    settings = PROBE_KNOBS.get(probe, {})

    def fn(q, k, v):
        with knobs(**settings):
            return sparse_attention(q, k, v, cfg, backend=backend)
    return fn, cfg


def make_inputs(length: int, heads: int, kv_heads: int, dim: int, seed: int, dtype=torch.bfloat16):
    """Leaves ``[B, L, H, D]`` (what autograd fills) and their ``[B, H, L, D]`` views, plus dout."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    leaves = [torch.randn(1, length, h, dim, device="cuda", generator=gen).to(dtype).requires_grad_(True)
              for h in (heads, kv_heads, kv_heads)]
    dout = torch.randn(1, length, heads, dim, device="cuda", generator=gen).to(dtype)
    return leaves, [x.transpose(1, 2) for x in leaves], dout


def useful_flops(name: str, cfg: PatternConfig | None, length: int, heads: int, dim: int, mode: str) -> float:
    pairs = length * (length + 1) // 2 * heads if cfg is None else grouped.pattern_pairs(cfg, heads, length)
    return 4.0 * dim * pairs * (3.5 if mode == "fwd_bwd" else 1.0)


def bench(fn: Callable, views, leaves, dout, mode: str, warmup: int, rep: int) -> tuple[float, float, float]:
    """(median ms, peak GiB, GiB allocated during the step beyond what existed before it)."""
    from triton.testing import do_bench

    def step():
        out = fn(*views)
        if mode == "fwd_bwd":
            out.backward(dout)

    for x in leaves:
        x.grad = None
    step()  # compile / build masks / warm up outside the timed region
    for x in leaves:
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    ms = do_bench(step, warmup=warmup, rep=rep, grad_to_none=leaves, return_mode="median")
    return ms, peak / GIB, (peak - before) / GIB


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check(names: list[str], length: int, heads: int, kv_heads: int, dim: int) -> list[dict]:
    """Every path vs the reference backend at a small size (output and input gradients)."""
    leaves, _, dout = make_inputs(length, heads, kv_heads, dim, seed=7)
    results = []

    def run(fn, dtype):
        xs = [x.detach().to(dtype).requires_grad_(True) for x in leaves]
        out = fn(*(x.transpose(1, 2) for x in xs))
        out.backward(dout.to(dtype))
        return [out.detach().float()] + [x.grad.float() for x in xs]

    truths = {}
    for name in names:
        fn, cfg = variant(name)
        if cfg is None:
            continue
        row = dict(check_length=length, heads=heads, kv_heads=kv_heads, variant=name)
        try:
            if cfg.pattern not in truths:
                ref = lambda q, k, v, c=cfg: sparse_attention(q, k, v, c, backend="reference")  # noqa: E731
                truths[cfg.pattern] = (run(ref, torch.float32), run(ref, torch.bfloat16))
            truth, base = truths[cfg.pattern]
            got = run(fn, torch.bfloat16)
            errs = {t: (rel(g, tr), rel(b, tr)) for t, g, b, tr in zip(("out", "dq", "dk", "dv"), got, base, truth)}
            row.update({f"rel_err_{t}": round(e[0], 5) for t, e in errs.items()})
            row.update({f"ref_bf16_rel_err_{t}": round(e[1], 5) for t, e in errs.items()})
            row["ok"] = all(torch.isfinite(g).all().item() for g in got) and all(
                e <= 2 * b + 1e-3 for e, b in errs.values())
        except Exception as err:  # recorded; the row is then not timed
            row.update(ok=False, error=f"{type(err).__name__}: {err}"[:300])
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def cross_check(names: list[str], views, length: int, kv: int, failed: set, triton_error: str | None) -> list[dict]:
    """Forward outputs of every S2/SF path at the timed size against the grouped path of the same
    pattern (checked against the reference above); also compiles flex outside the timed region."""
    outs, rows = {}, []
    for name in names:
        fn, cfg = variant(name)
        if cfg is None or (name, kv) in failed or ("triton" in name and triton_error):
            continue
        try:
            outs[name] = fn(*views).detach()
        except Exception as err:
            rows.append(dict(length=length, kv_heads=kv, variant=name, error=f"{type(err).__name__}: {err}"[:300]))
    for name, out in outs.items():
        ref = outs.get(name.split("_")[0] + "_grouped")
        if ref is not None and name != name.split("_")[0] + "_grouped":
            diff = (out.float() - ref.float()).abs().max().item()
            rows.append(dict(length=length, kv_heads=kv, variant=name, vs=name.split("_")[0] + "_grouped",
                             rel_l2=round(rel(out, ref), 5), max_abs=round(diff, 4)))
    del outs
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


def sdpa_choices(length: int, heads: int, kv_heads: int, dim: int) -> dict:
    """Which SDPA kernel PyTorch picks for the full call and for the grouped operands."""
    from torch.nn.attention import SDPBackend

    names = {int(b): n for n, b in SDPBackend.__members__.items()}
    q = torch.empty(1, heads, length, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.empty(1, kv_heads, length, dim, device="cuda", dtype=torch.bfloat16)
    g = length // 4
    qg = torch.empty(4, heads // 2, g, dim, device="cuda", dtype=torch.bfloat16)
    kg = torch.empty(4, kv_heads // 2, g, dim, device="cuda", dtype=torch.bfloat16)
    gqa = heads != kv_heads
    return {"full_causal": names[torch._fused_sdp_choice(q, k, k, is_causal=True, enable_gqa=gqa)],
            "grouped_operand": names[torch._fused_sdp_choice(qg, kg, kg, is_causal=True, enable_gqa=gqa)]}


def summarize(rows: list[dict]) -> dict:
    """K1-K4 ratios from the rows (fwd+bwd)."""
    t = {(r["length"], r["kv_heads"], r["variant"]): r["ms"] for r in rows if r.get("mode") == "fwd_bwd" and "ms" in r}
    out = {}
    for (length, kv, name), ms in sorted(t.items()):
        base = t.get((length, kv, SDPA))
        key = f"{length}_kv{kv}"
        if base and name != SDPA and "[" not in name:
            out.setdefault("speedup_vs_sdpa", {}).setdefault(key, {})[name] = round(base / ms, 3)
        if name.startswith("s2_") and "[" not in name and name not in ("s2_flex", "s2_varlen"):
            alt = [t[(length, kv, n)] for n in ("s2_flex", "s2_varlen") if (length, kv, n) in t]
            if alt:
                out.setdefault("k2_vs_best_of_flex_varlen", {}).setdefault(key, {})[name] = round(min(alt) / ms, 3)
        if name.startswith("sf_") and "[" not in name:
            s2 = t.get((length, kv, "s2_" + name[3:]))
            if s2:
                out.setdefault("k3_sf_over_s2", {}).setdefault(key, {})[name[3:]] = round(ms / s2, 3)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--gqa-lengths", type=int, nargs="*", default=[32768])
    parser.add_argument("--flex-lengths", type=int, nargs="*", default=None,
                        help="lengths with flex rows (each shape compiles); default: all")
    parser.add_argument("--probe-lengths", type=int, nargs="*", default=[32768])
    parser.add_argument("--k4-lengths", type=int, nargs="*", default=[65536, 131072])
    parser.add_argument("--check-length", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads-gqa", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    parser.add_argument("--check-skip", nargs="*", default=[],
                        help="backends left out of the small-size reference check (e.g. flex: saves its compiles; "
                             "every path is still cross-checked against grouped at each timed length)")
    parser.add_argument("--only", nargs="*", default=None, help="time only these row names")
    parser.add_argument("--out", default="benchmarks/results/attention_kernels.json")
    parser.add_argument("--merge-into", default=None,
                        help="after the run (or, with --merge-only, instead of it) add this run's rows to that "
                             "results file, keeping its earlier runs")
    parser.add_argument("--merge-only", default=None, help="a finished run's JSON to merge into --merge-into")
    args = parser.parse_args(argv)
    if args.merge_only:
        return merge_runs(Path(args.merge_into), json.loads(Path(args.merge_only).read_text()))
    if not torch.cuda.is_available():
        raise SystemExit("attention_kernels needs a CUDA device")
    import transformers
    import triton

    try:
        import petl.kernels.attention_triton  # noqa: F401
        triton_error = None
    except Exception as err:  # recorded in every triton row
        triton_error = f"{type(err).__name__}: {err}"[:300]
    rows: list[dict] = []
    result = dict(
        benchmark="attention_kernels", gpu=torch.cuda.get_device_name(), torch=torch.__version__,
        triton=triton.__version__, transformers=transformers.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command="python -m benchmarks.attention_kernels " + " ".join(sys.argv[1:] if argv is None else argv),
        config=dict(batch=1, heads=args.heads, dim=args.dim, dtype="bfloat16", group_ratio=0.25, n_sink=4,
                    layout="[B, L, H, D] memory viewed as [B, H, L, D]",
                    grouped_defaults=dict(SINK_MODE=grouped.SINK_MODE, NATIVE_GQA=grouped.NATIVE_GQA,
                                          SDPA_PRIORITY=grouped.SDPA_PRIORITY, SEGMENT_OP=grouped.SEGMENT_OP,
                                          CUDA_SEGMENT_OP=grouped.CUDA_SEGMENT_OP,
                                          MERGE_KERNELS=grouped.MERGE_KERNELS),
                    timing=f"triton.testing.do_bench median, warmup {args.warmup} ms, rep {args.rep} ms",
                    flops="4*B*H*D*allowed_pairs forward, x3.5 forward+backward"),
        triton_import_error=triton_error, sdpa_kernel_choice={}, checks=[], cross_checks=[], rows=rows)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save():
        result["summary"] = summarize(rows)
        out_path.write_text(json.dumps(result, indent=2) + "\n")

    for name in ("cache_size_limit", "recompile_limit"):  # one flex compile per shape and pattern
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    configs = [(n, args.heads) for n in args.lengths] + [(n, args.kv_heads_gqa) for n in args.gqa_lengths]
    for kv in sorted({kv for _, kv in configs}):
        result["sdpa_kernel_choice"][f"kv{kv}"] = sdpa_choices(8192, args.heads, kv, args.dim)
        checked = [n for n in MAIN + PROBES if not any(s in n for s in args.check_skip)
                   and (args.only is None or n in args.only)]
        result["checks"] += check(checked, args.check_length, args.heads, kv, args.dim)
    failed = {(c["variant"], c["kv_heads"]) for c in result["checks"] if not c["ok"]}
    save()

    flex_lengths = set(args.lengths + args.gqa_lengths if args.flex_lengths is None else args.flex_lengths)
    plan = []
    for length, kv in configs:
        names = [n for n in MAIN if "flex" not in n or length in flex_lengths]
        names += [p for p in PROBES if length in args.probe_lengths and ("repeat_kv" not in p or kv != args.heads)]
        names = [n for n in names if args.only is None or n in args.only]
        plan += [(length, kv, n, mode) for n in names for mode in ("fwd", "fwd_bwd")]
    done = {(length, kv) for length, kv in configs}
    plan += [(n, args.heads, v, "fwd_bwd") for n in args.k4_lengths if (n, args.heads) not in done for v in K4]

    current = None
    for length, kv, name, mode in plan:
        if current != (length, kv):
            torch.cuda.empty_cache()
            leaves, views, dout = make_inputs(length, args.heads, kv, args.dim, seed=length + kv)
            current = (length, kv)
            names = [n for n, (ln, k) in ((p[2], p[:2]) for p in plan) if (ln, k) == current]
            result["cross_checks"] += cross_check(sorted(set(names)), views, length, kv, failed, triton_error)
            save()
        row = dict(length=length, heads=args.heads, kv_heads=kv, variant=name, mode=mode)
        fn, cfg = variant(name)
        if "triton" in name and triton_error:
            row["error"] = triton_error
        elif (name, kv) in failed:
            row["error"] = "failed the correctness check (see checks)"
        else:
            try:
                ms, peak, extra = bench(fn, views, leaves, dout, mode, args.warmup, args.rep)
                row.update(ms=round(ms, 3), tflops=round(useful_flops(name, cfg, length, args.heads, args.dim, mode)
                                                          / ms / 1e9, 1),
                           peak_gib=round(peak, 3), step_alloc_gib=round(extra, 3))
            except Exception as err:  # a failing variant is recorded, the others still run
                row["error"] = f"{type(err).__name__}: {err}"[:300]
                torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
        save()

    base = {(r["length"], r["kv_heads"], r["mode"]): r["ms"] for r in rows if r["variant"] == SDPA and "ms" in r}
    for r in rows:
        b = base.get((r["length"], r["kv_heads"], r["mode"]))
        if b and "ms" in r:
            r["speedup_vs_sdpa"] = round(b / r["ms"], 3)
    save()
    print(f"\n{'N':>7} {'kv':>3} {'variant':<26} {'fwd ms':>9} {'fwd+bwd ms':>11} {'x sdpa':>7} {'TFLOP/s':>8} "
          f"{'peak GiB':>9}")
    table: dict = {}
    for r in rows:
        table.setdefault((r["length"], r["kv_heads"], r["variant"]), {})[r["mode"]] = r
    for (length, kv, name), modes in table.items():
        f, fb = modes.get("fwd", {}), modes.get("fwd_bwd", {})
        if "ms" not in fb:
            print(f"{length:>7} {kv:>3} {name:<26} error: {fb.get('error', f.get('error', ''))[:60]}")
            continue
        fwd = f"{f['ms']:.3f}" if "ms" in f else "-"
        print(f"{length:>7} {kv:>3} {name:<26} {fwd:>9} {fb['ms']:>11.3f} {fb.get('speedup_vs_sdpa', 0):>7.2f} "
              f"{fb['tflops']:>8.1f} {fb['peak_gib']:>9.2f}")
    print(json.dumps(result["summary"]))
    if args.merge_into:
        merge_runs(Path(args.merge_into), result)
    return result


RUN_KEYS = ("date", "command", "gpu", "torch", "triton", "transformers", "config", "triton_import_error",
            "sdpa_kernel_choice", "checks", "cross_checks", "summary")


def merge_runs(path: Path, new: dict) -> dict:
    """Add run ``new`` to the results file ``path``: every row keeps a ``run`` index, ``runs`` holds
    each run's date, command, versions, checks and summary (ratios never mix runs); the top level
    describes the newest run."""
    old = json.loads(path.read_text()) if path.exists() else None
    runs, rows = [], []
    if old is not None:
        if "runs" in old:
            runs, rows = list(old["runs"]), list(old["rows"])
        else:  # a single-run file: it becomes run 0
            runs = [dict(run=0, **{k: old[k] for k in RUN_KEYS if k in old})]
            rows = [dict(r, run=0) for r in old["rows"]]
    index = len(runs)
    runs.append(dict(run=index, **{k: new[k] for k in RUN_KEYS if k in new}))
    rows += [dict(r, run=index) for r in new["rows"]]
    merged = dict(benchmark="attention_kernels", **{k: new[k] for k in RUN_KEYS if k in new},
                  runs=runs, rows=rows)
    merged["summary_by_run"] = {str(r["run"]): r.get("summary", {}) for r in runs}
    path.write_text(json.dumps(merged, indent=2) + "\n")
    print(f"merged run {index} ({len(new['rows'])} rows) into {path}")
    return merged


if __name__ == "__main__":
    main()
