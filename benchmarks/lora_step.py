"""LoRA training step: petl's fused kernels vs transformers + peft (targets K5 and K6).

    python -m benchmarks.lora_step                 # H200: 862M Llama shape, bf16
    python -m benchmarks.lora_step --tiny          # CPU smoke run of the same code path
    python -m benchmarks.lora_step --host-cpu      # CPU host-cost proxy (not a K5 number), see below

Model: LlamaConfig(hidden 2048, 16 layers, 32 heads / 8 kv heads, intermediate 5632, vocab 32000,
untied head), random init, bf16: 852.6M base parameters + 9.3M LoRA (r=16 on all seven linear
layers) = 861.9M. Every row trains with AdamW on random tokens (labels = inputs), the same seeds,
so the first losses of petl and the baseline must agree (checked, reported).

* K5, 4 x 2048 tokens, full attention. ``baseline``: peft LoRA (float32 adapters, peft's default)
  on the bf16 model, SDPA, gradient checkpointing (non-reentrant), plain loop;
  ``baseline_autocast``: the same under ``torch.autocast(bfloat16)`` (what Trainer's bf16=True
  does). ``petl``: the same model + ``fuse_lora`` (fused LoRA projections, Triton RMSNorm / RoPE /
  SwiGLU, fused linear cross-entropy), gradient checkpointing on every layer.
* K6, 1 x 32768 tokens, LoRA+ (embeddings and norms trained, peft ``modules_to_save``).
  Baselines as above with full attention; ``petl``: S2 attention (``use_attention(model, "s2")``)
  + ``fuse_lora``, gradient checkpointing on all but ``--keep`` layers; ``reference_s2``: peft
  unfused with the same S2 attention, two untimed steps, as the loss check for the petl row.
* ``petl``/``petl_keep*`` run ``fuse_lora``'s default ``layer_checkpoint="auto"``: every
  checkpointed decoder layer is one self-checkpointing autograd Function
  (:mod:`petl.kernels.lora_layer`). ``petl_per_module``: the same with ``layer_checkpoint=False``
  (fused modules under transformers' non-reentrant checkpointing, the path before issue #5).
* ``petl_reentrant*``: the per-module petl rows with reentrant checkpointing (no per-tensor hooks).
* ``--host-cpu``: host cost on the CPU, a proxy for the launch-bound part of K5, not a K5 number: a
  16-layer Llama with tiny widths (host-bound by construction), float32, 2 x 64 tokens; per row the
  median wall time of a training step and the ATen ops dispatched by its forward and backward
  (a ``TorchDispatchMode`` counter), for peft unfused, petl per-module and petl layer Function.
  Written to ``results/lora_step_host_cpu.json``.
* Every CUDA row also reports ``host``: the host time to issue the forward, backward and optimizer
  of a step that starts on an idle device, next to the device time of each phase (host ~ device
  means the device waited for Python), and ``syncs``: device->host synchronisations in one step
  by call site (``torch.cuda.set_sync_debug_mode``).
* ``--profile``: one profiled step of baseline/petl at K5 (device time, launches, top kernels);
  ``--components``: each element-wise/loss kernel fwd+bwd against PyTorch and Liger (if installed).

Ratios are taken against the faster baseline row of the same run. Peak memory is
``torch.cuda.max_memory_allocated`` over the timed steps (weights and optimizer state included).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
GIB = 2 ** 30
RESULTS = Path(__file__).parent / "results" / "lora_step.json"
FULL = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
            intermediate_size=5632, vocab_size=32000)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=128)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(sizes: dict, device: str, lora_plus: bool, attention: str):
    """bf16 Llama from a config (seed 0) wrapped in peft LoRA r=16 (seed 1)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(max_position_embeddings=65536, tie_word_embeddings=False, **sizes)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    config.use_cache = False
    torch.manual_seed(1)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM",
                      modules_to_save=["embed_tokens", "norm"] if lora_plus else None)
    model = get_peft_model(model, lora)
    if attention == "s2":
        from petl.attention import use_attention

        use_attention(model, "s2", group_ratio=0.25)
    return model


def set_checkpointing(model, keep: int, reentrant: bool = False) -> None:
    """Gradient checkpointing on every decoder layer except the first ``keep``.

    transformers' default is non-reentrant (per-tensor pack/unpack hooks); the reentrant form
    replays the layer from its inputs with no hooks, which costs less host time per step.
    """
    base = model.get_base_model()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:  # the replayed layer needs an input that requires grad (frozen embeddings)
        base.enable_input_require_grads()
    for layer in base.model.layers[:keep]:
        layer.gradient_checkpointing = False


def run_row(name: str, sizes: dict, device: str, batch: int, seq: int, *, lora_plus: bool, attention: str,
            fused: bool, autocast: bool, keep: int, warmup: int, steps: int, reentrant: bool = False,
            profile: bool = False, layer_checkpoint: bool | str = "auto") -> dict:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build(sizes, device, lora_plus, attention)
    set_checkpointing(model, keep, reentrant)
    if fused:
        from petl.kernels import fuse_lora

        fuse_lora(model, kernels="on", triton=None if device == "cuda" else False, layer_checkpoint=layer_checkpoint)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator(device="cpu").manual_seed(2)
    batches = [torch.randint(0, sizes["vocab_size"], (batch, seq), generator=gen).to(device) for _ in range(4)]

    def step(i: int, marks: list | None = None) -> torch.Tensor:
        """One training step; ``marks`` collects (host clock, CUDA event) at the phase boundaries."""
        mark = (lambda: marks.append(_mark())) if marks is not None else (lambda: None)
        ids = batches[i % len(batches)]
        mark()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        mark()
        loss.backward()
        mark()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark()
        return loss.detach()

    losses = [step(i) for i in range(warmup)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup, warmup + steps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            losses.append(step(i))
            end.record()
            times.append((start, end))
        else:
            t0 = time.perf_counter()
            losses.append(step(i))
            times.append(time.perf_counter() - t0)
    sync()
    ms = [s.elapsed_time(e) for s, e in times] if device == "cuda" else [t * 1e3 for t in times]
    peak = torch.cuda.max_memory_allocated() / GIB if device == "cuda" and ms else None
    host = _diagnose(lambda: _host_split(step, warmup + steps)) if device == "cuda" and ms else None
    syncs = _diagnose(lambda: _count_syncs(lambda: step(0))) if device == "cuda" and ms else None
    prof = _profile(lambda: step(0)) if profile and device == "cuda" else None
    row = {"row": name, "tokens": f"{batch}x{seq}", "attention": attention, "fused": fused, "autocast": autocast,
           "lora_plus": lora_plus, "checkpointed_layers": sizes["num_hidden_layers"] - keep,
           "checkpointing": "reentrant" if reentrant else "non-reentrant", "host": host, "syncs": syncs,
           "layer_checkpoint": layer_checkpoint if fused else None,
           "profile": prof,
           "ms_per_step": statistics.median(ms) if ms else None, "ms_all": ms,
           "tokens_per_s": batch * seq / (statistics.median(ms) / 1e3) if ms else None, "peak_gib": peak,
           "losses": [float(x) for x in losses], "trainable": sum(p.numel() for p in params),
           "parameters": sum(p.numel() for p in model.parameters())}
    return row


def _diagnose(fn) -> dict:
    """Run a diagnostic; its failure is reported in the row, not lost with the row's timings."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a diagnostic must not cost the measured row
        return {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}


def _mark():
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return time.perf_counter(), event


def _host_split(step, first: int, repeats: int = 5) -> dict:
    """Host (CPU) time to issue each phase of a step, against the device time of the same phase.

    Each step starts on an idle device (synchronised), as it does after transformers' mask code
    reads a device value at the start of every forward. Where a phase's host time is near its
    device time the device waited for the host (launch-bound); a GPU-bound step issues each phase
    well before the device finishes it. Medians over ``repeats`` steps, milliseconds.
    """
    phases = ("forward", "backward", "optimizer")
    host = {p: [] for p in phases}
    dev = {p: [] for p in phases}
    wall = []
    for i in range(first, first + repeats):
        marks: list = []
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(i, marks)
        torch.cuda.synchronize()
        wall.append((time.perf_counter() - t0) * 1e3)
        for p, (a, b) in zip(phases, zip(marks, marks[1:])):
            host[p].append((b[0] - a[0]) * 1e3)
            dev[p].append(a[1].elapsed_time(b[1]))
    out = {f"host_{p}_ms": statistics.median(host[p]) for p in phases}
    out.update({f"device_{p}_ms": statistics.median(dev[p]) for p in phases})
    out["wall_ms"] = statistics.median(wall)
    return out


def _count_syncs(step) -> dict:
    """Device->host synchronisations in one step (``torch.cuda.set_sync_debug_mode``), by call site."""
    counts: dict[str, int] = {}
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        if "synchroniz" in str(w.message):
            site = f"{Path(w.filename).name}:{w.lineno}"
            counts[site] = counts.get(site, 0) + 1
    torch.cuda.synchronize()
    return counts


def _profile(step) -> dict:
    """One step under torch.profiler: device-busy time and the kernels that take most of it."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3
    device_us = lambda e: getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)  # noqa
    events = [e for e in prof.key_averages() if device_us(e) > 0]
    events.sort(key=device_us, reverse=True)
    top = [{"name": e.key[:90], "calls": e.count, "ms": device_us(e) / 1e3} for e in events[:15]]
    # operator rows (aten::...) repeat the device time of the kernels they launch: count kernels only
    kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    busy = sum(device_us(e) for e in kernels) / 1e3
    launches = sum(e.count for e in prof.key_averages() if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel")))
    print(f"    profile: device busy {busy:.1f} ms, wall {wall:.1f} ms (profiler overhead included), "
          f"{launches} launches", flush=True)
    for t in top[:10]:
        print(f"      {t['ms']:8.2f} ms {t['calls']:6d}x  {t['name']}", flush=True)
    return {"device_busy_ms": busy, "wall_ms_profiled": wall, "launches": launches, "top": top}


def _print_row(r: dict) -> None:
    if "error" in r:
        print(f"{r['row']:<22} {r['tokens']:>9}  ERROR {r['error']}", flush=True)
        return
    ms = f"{r['ms_per_step']:.1f}" if r["ms_per_step"] else "-"
    peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] else "-"
    tps = f"{r['tokens_per_s'] / 1e3:.1f}k" if r["tokens_per_s"] else "-"
    print(f"{r['row']:<22} {r['tokens']:>9} {ms:>9} {tps:>9} {peak:>8}  "
          f"losses {', '.join(f'{x:.4f}' for x in r['losses'][:3])}", flush=True)
    if r.get("host") and "error" not in r["host"] and "error" not in (r.get("syncs") or {}):
        h = r["host"]
        print(f"{'':<22} host/device ms: forward {h['host_forward_ms']:.1f}/{h['device_forward_ms']:.1f}, backward "
              f"{h['host_backward_ms']:.1f}/{h['device_backward_ms']:.1f}, optimizer {h['host_optimizer_ms']:.1f}/"
              f"{h['device_optimizer_ms']:.1f}; syncs {sum(r['syncs'].values())} {r['syncs']}", flush=True)
    elif r.get("host") or r.get("syncs"):
        print(f"{'':<22} diagnostics: {r.get('host')} {r.get('syncs')}", flush=True)


def compare(rows: list[dict], target: str, petl: str, baselines: list[str], loss_ref: str, loss_steps: int) -> dict:
    """Ratios of ``petl`` against the faster baseline, and the loss check against ``loss_ref``."""
    by = {r["row"]: r for r in rows if r["tokens"] and "error" not in r}
    if petl not in by:
        return {"target": target, "error": "petl row missing"}
    ok = [by[b] for b in baselines if b in by and by[b]["ms_per_step"]]
    out = {"target": target, "petl_row": petl}
    if ok:
        base = min(ok, key=lambda r: r["ms_per_step"])
        mem = (lambda b: by[petl]["peak_gib"] / b["peak_gib"]) if by[petl]["peak_gib"] else (lambda b: None)
        out.update(baseline=base["row"], speedup=by[petl]["tokens_per_s"] / base["tokens_per_s"],
                   memory_ratio=mem(base), memory_ratio_vs_each={b["row"]: mem(b) for b in ok},
                   speedup_vs_each={b["row"]: by[petl]["tokens_per_s"] / b["tokens_per_s"] for b in ok})
    if loss_ref in by:
        a, b = by[petl]["losses"][:loss_steps], by[loss_ref]["losses"][:loss_steps]
        diff = max(abs(x - y) / abs(y) for x, y in zip(a, b))
        out.update(loss_reference=loss_ref, loss_max_rel_diff=diff, loss_check=bool(diff < 2e-2))
    return out


def components(device: str) -> list[dict]:
    """fwd+bwd time of each element-wise/loss kernel at the K5 shape: petl, PyTorch, liger (if installed)."""
    import importlib.util

    from triton.testing import do_bench

    from petl.kernels.cross_entropy import linear_cross_entropy
    from petl.kernels.rmsnorm import rms_norm, rms_norm_reference
    from petl.kernels.rope import apply_rope, rope_reference
    from petl.kernels.swiglu import swiglu, swiglu_backward, swiglu_reference

    bf, rows = torch.bfloat16, []
    torch.manual_seed(0)
    x = torch.randn(8192, 2048, device=device, dtype=bf, requires_grad=True)
    w = torch.ones(2048, device=device, dtype=bf, requires_grad=True)
    g, u = (torch.randn(8192, 5632, device=device, dtype=bf, requires_grad=True) for _ in range(2))
    q = torch.randn(4, 2048, 32, 128, device=device, dtype=bf, requires_grad=True)
    k = torch.randn(4, 2048, 8, 128, device=device, dtype=bf, requires_grad=True)
    ang = torch.rand(1, 2048, 64, device=device) * 100
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(bf), torch.cat([ang.sin()] * 2, -1).to(bf)
    head = torch.randn(32000, 2048, device=device, dtype=bf) / 45
    target = torch.randint(0, 32000, (8192,), device=device)

    def fb(fn):
        def run():
            out = fn()
            out = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward(out, [torch.ones_like(o) for o in out])
        return run

    def swiglu_petl():
        h = swiglu(g.detach(), u.detach())
        swiglu_backward(torch.ones_like(h), g.detach(), u.detach(), inplace=False)

    cases = {
        "rmsnorm": {"petl": fb(lambda: rms_norm(x, w, 1e-6)), "torch": fb(lambda: rms_norm_reference(x, w, 1e-6))},
        "swiglu": {"petl": swiglu_petl, "torch": fb(lambda: swiglu_reference(g, u))},
        "rope": {"petl": fb(lambda: apply_rope(q, k, cos, sin)), "torch": fb(lambda: rope_reference(q, k, cos, sin))},
        "linear_cross_entropy": {
            "petl": fb(lambda: linear_cross_entropy(x, head, target)),
            "torch": fb(lambda: torch.nn.functional.cross_entropy((x @ head.t()).float(), target))},
    }
    if importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        qt, kt = q.detach().transpose(1, 2).contiguous().requires_grad_(), k.detach().transpose(1, 2).contiguous()
        kt.requires_grad_()
        cases["rmsnorm"]["liger"] = fb(lambda: LigerRMSNormFunction.apply(x, w, 1e-6, 0.0, "llama", False))
        cases["swiglu"]["liger"] = fb(lambda: LigerSiLUMulFunction.apply(g, u))
        cases["rope"]["liger"] = fb(lambda: LigerRopeFunction.apply(qt, kt, cos, sin))
        flce = LigerFusedLinearCrossEntropyFunction.apply
        cases["linear_cross_entropy"]["liger"] = fb(lambda: flce(x, head, target)[0])
    for op, impls in cases.items():
        for impl, fn in impls.items():
            try:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                ms = do_bench(fn, warmup=50, rep=200, return_mode="median")
                peak = (torch.cuda.max_memory_allocated() - base) / GIB
                rows.append({"op": op, "impl": impl, "ms_fwd_bwd": ms, "extra_peak_gib": peak})
            except Exception as exc:
                rows.append({"op": op, "impl": impl, "error": f"{type(exc).__name__}: {str(exc)[:160]}"})
            r = rows[-1]
            print(f"  {op:<22} {impl:<6} " + (f"{r['ms_fwd_bwd']:.3f} ms, +{r['extra_peak_gib']:.2f} GiB"
                                            if "error" not in r else r["error"]), flush=True)
            x.grad = w.grad = g.grad = u.grad = q.grad = k.grad = None
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke test)")
    parser.add_argument("--rows", default="k5,k6", help="comma list of k5, k6")
    parser.add_argument("--keep", default="10", help="comma list: K6 petl layers without checkpointing")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--no-autocast-baseline", action="store_true")
    parser.add_argument("--components", action="store_true", help="also time each kernel against PyTorch/liger")
    parser.add_argument("--profile", action="store_true", help="profile one K5 step of petl and the baseline")
    parser.add_argument("--host-cpu", action="store_true", help="CPU host-cost proxy: 16 tiny layers, ops and ms/step")
    parser.add_argument("--out", default=None,
                        help=f"result file (default {RESULTS}, or {HOST_RESULTS} with --host-cpu)")
    args = parser.parse_args(argv)
    if args.host_cpu:
        return host_cpu(args, argv)
    args.out = args.out or str(RESULTS)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    sizes = TINY if args.tiny else FULL
    k5 = (2, 64) if args.tiny else (4, 2048)
    k6 = (1, 256) if args.tiny else (1, 32768)
    keeps = [int(k) for k in args.keep.split(",")]
    if args.tiny:
        keeps = [min(k, sizes["num_hidden_layers"]) for k in keeps]
    rows, plan = [], []
    autocast_rows = [] if args.no_autocast_baseline else [True]
    if "k5" in args.rows:
        w, s = args.warmup or 3, args.steps or 20
        plan += [("baseline", k5, False, "sdpa", False, False, 0, w, s, False)]
        plan += [("baseline_autocast", k5, False, "sdpa", False, True, 0, w, s, False) for _ in autocast_rows]
        plan += [("petl", k5, False, "sdpa", True, False, 0, w, s, False)]
        plan += [("petl_per_module", k5, False, "sdpa", True, False, 0, w, s, False)]
        plan += [("petl_reentrant", k5, False, "sdpa", True, False, 0, w, s, True)]
    if "k6" in args.rows:
        w, s = args.warmup or 2, args.steps or 5
        plan += [("baseline", k6, True, "sdpa", False, False, 0, w, s, False)]
        plan += [("baseline_autocast", k6, True, "sdpa", False, True, 0, w, s, False) for _ in autocast_rows]
        plan += [("reference_s2", k6, True, "s2", False, False, 0, 2, 0, False)]
        plan += [(f"petl_keep{k}", k6, True, "s2", True, False, k, w, s, False) for k in keeps]
        plan += [(f"petl_reentrant_keep{keeps[0]}", k6, True, "s2", True, False, keeps[0], w, s, True)]
    print(f"{'row':<22} {'tokens':>9} {'ms/step':>9} {'tok/s':>9} {'peak GiB':>8}", flush=True)
    for name, (b, n), lora_plus, attention, fused, autocast, keep, warm, steps, reentrant in plan:
        try:
            row = run_row(name, sizes, device, b, n, lora_plus=lora_plus, attention=attention, fused=fused,
                          autocast=autocast, keep=keep, warmup=warm, steps=steps, reentrant=reentrant,
                          profile=args.profile and n == k5[1] and name in ("petl", "petl_reentrant", "baseline"),
                          layer_checkpoint=False if name.startswith(("petl_per_module", "petl_reentrant")) else "auto")
        except Exception as exc:  # keep the other rows; the error is reported in the table and JSON
            traceback.print_exc()
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            row = {"row": name, "tokens": f"{b}x{n}", "error": f"{type(exc).__name__}: {first}"}
        rows.append(row)
        _print_row(row)
    comp = []
    if args.components and device == "cuda":
        print("kernels at the K5 shape (fwd+bwd, median):", flush=True)
        comp = components(device)
    summary = []
    base = ["baseline", "baseline_autocast"]
    if "k5" in args.rows:
        for petl in ("petl", "petl_per_module", "petl_reentrant"):
            summary.append(compare([r for r in rows if r["tokens"] == f"{k5[0]}x{k5[1]}"], "K5", petl, base,
                                   "baseline", 3))
    if "k6" in args.rows:
        k6_rows = [r for r in rows if r["tokens"] == f"{k6[0]}x{k6[1]}"]
        for petl in [f"petl_keep{k}" for k in keeps] + [f"petl_reentrant_keep{keeps[0]}"]:
            summary.append(compare(k6_rows, "K6", petl, base, "reference_s2", 2))
    for s in summary:
        print(json.dumps(s), flush=True)
    result = {"benchmark": "lora_step", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python -m benchmarks.lora_step " + " ".join(argv if argv is not None else sys.argv[1:]),
              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "versions": _versions(),
              "model": {**sizes, "tie_word_embeddings": False, "lora_r": 16, "lora_alpha": 32, "targets": TARGETS},
              "rows": rows, "summary": summary, "components": comp}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return result


HOST_RESULTS = Path(__file__).parent / "results" / "lora_step_host_cpu.json"
HOST_SIZES = dict(hidden_size=64, num_hidden_layers=16, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=128)


def _count_ops(fn) -> tuple[int, object]:
    """(ATen ops dispatched while ``fn`` runs, its result); CPU autograd runs in this thread, so backward counts."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.n += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        out = fn()
    return Counter.n, out


def host_cpu(args, argv) -> dict:
    """Host cost per training step on the CPU: peft unfused vs petl per-module vs petl layer Function."""
    from petl.kernels import fuse_lora

    torch.set_num_threads(1)  # host work, not arithmetic: keep the rows comparable on a shared machine
    batch, seq = 2, 64
    steps, warmup = args.steps or 10, args.warmup or 2
    rows_plan = [("peft_unfused", None), ("petl_per_module", False), ("petl_layer", "auto")]
    ids = torch.randint(0, HOST_SIZES["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(2))
    steps_of, losses_of = {}, {}
    for name, mode in rows_plan:
        model = build(HOST_SIZES, "cpu", False, "sdpa").float()
        set_checkpointing(model, 0)
        if mode is not None:
            fuse_lora(model, kernels="on", triton=False, layer_checkpoint=mode)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model=model, opt=opt):
            """(loss, ms of forward, ms of backward, ms of the whole step)."""
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            return float(loss), (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t0) * 1e3

        steps_of[name] = (model, step)
        losses_of[name] = [step()[0] for _ in range(warmup)]
    times = {name: [] for name, _ in rows_plan}
    for _ in range(steps):  # rows interleaved: load from other processes hits them alike
        for name, _ in rows_plan:
            loss, *ms = steps_of[name][1]()
            losses_of[name].append(loss)
            times[name].append(ms)
    rows = []
    print(f"{'row (CPU host proxy)':<22} {'ms/step':>9} {'fwd ms':>8} {'bwd ms':>8} {'fwd ops':>8} {'bwd ops':>8} "
          f"{'loss':>10}", flush=True)
    for name, mode in rows_plan:
        model = steps_of[name][0]
        fwd_ops, loss = _count_ops(lambda: model(input_ids=ids, labels=ids).loss)
        bwd_ops, _ = _count_ops(loss.backward)
        model.zero_grad(set_to_none=True)
        fwd, bwd, total = (statistics.median(t[i] for t in times[name]) for i in range(3))
        row = {"row": name, "layer_checkpoint": mode, "tokens": f"{batch}x{seq}", "ms_per_step": total,
               "ms_forward": fwd, "ms_backward": bwd, "ms_all": [t[2] for t in times[name]],
               "forward_aten_ops": fwd_ops, "backward_aten_ops": bwd_ops, "losses": losses_of[name]}
        rows.append(row)
        print(f"{name:<22} {total:>9.1f} {fwd:>8.1f} {bwd:>8.1f} {fwd_ops:>8} {bwd_ops:>8} {row['losses'][0]:>10.6f}",
              flush=True)
    base = rows[0]
    for r in rows[1:]:
        r["speedup_vs_peft"] = base["ms_per_step"] / r["ms_per_step"]
        r["ops_ratio_vs_peft"] = (r["forward_aten_ops"] + r["backward_aten_ops"]) / (
            base["forward_aten_ops"] + base["backward_aten_ops"])
        print(f"{r['row']}: {r['speedup_vs_peft']:.2f}x peft's step rate, {r['ops_ratio_vs_peft']:.2f}x its ATen ops",
              flush=True)
    result = {"benchmark": "lora_step --host-cpu", "note": "CPU host-cost proxy (16 tiny layers), not a K5 number",
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python -m benchmarks.lora_step " + " ".join(argv if argv is not None else sys.argv[1:]),
              "device": "cpu", "threads": torch.get_num_threads(), "versions": _versions(),
              "model": {**HOST_SIZES, "tie_word_embeddings": False, "lora_r": 16, "lora_alpha": 32, "targets": TARGETS,
                        "dtype": "float32", "checkpointing": "non-reentrant, every layer"},
              "rows": rows}
    out = Path(args.out or HOST_RESULTS)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


def _versions() -> dict:
    import peft
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


if __name__ == "__main__":
    main()
