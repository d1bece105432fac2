"""K8: H2O decode at long context vs the full KV cache (BENCHMARKS.md).

    python -m benchmarks.h2o_decode                  # H200: 862M Llama shape, 32k context, 20% budget
    python -m benchmarks.h2o_decode --tiny           # CPU smoke run of the same code

A Llama-shaped model is built from a config (random bf16 weights; decode cost does not depend on
the weights). Both caches are filled synthetically with random keys/values as if a 32k prompt had
been prefilled (a real batched 32k prefill would cost minutes of device time and changes nothing
about the decode step); the H2O cache holds ``budget * context`` slots per head, half heavy, half
recent. Per-step time is the median of CUDA-synchronised ``model(...)`` decode steps, each feeding
the previous greedy token, so the full cache grows and H2O scores + evicts on every step.

Rows: equal batch (full vs H2O), the largest batch each fits under ``--cap-gib`` (enforced with
``torch.cuda.set_per_process_memory_fraction``), a prefill row for the explicit-probability
attention, and a correctness check (full-budget H2O logits vs SDPA on the same cache contents).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from petl.cache import H2OCache, disable_h2o, enable_h2o

warnings.filterwarnings("ignore", category=FutureWarning)
GIB = 2 ** 30


def build_model(tiny: bool, device: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    sizes = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=128) if tiny else
             dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                  intermediate_size=5632, vocab_size=32000))
    config = LlamaConfig(max_position_embeddings=131072, **sizes)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval()


def _kv_shape(model, batch: int, length: int) -> tuple[int, int, int, int]:
    cfg = model.config
    return batch, cfg.num_key_value_heads, length, cfg.hidden_size // cfg.num_attention_heads


def full_cache(model, batch: int, context: int, seed: int = 1):
    """A DynamicCache holding ``context`` random tokens per layer."""
    from transformers import DynamicCache

    cache, gen = DynamicCache(), torch.Generator(model.device).manual_seed(seed)
    for layer in range(model.config.num_hidden_layers):
        shape = _kv_shape(model, batch, context)
        k = torch.randn(shape, generator=gen, device=model.device, dtype=torch.bfloat16)
        cache.update(k, torch.randn_like(k), layer)
    return cache


def h2o_cache(model, batch: int, context: int, heavy: int, recent: int, seed: int = 1):
    """An H2OCache in the state after a ``context``-token prefill: heavy + recent slots per head."""
    cache, gen = H2OCache(heavy=heavy, recent=recent), torch.Generator(model.device).manual_seed(seed)
    kept = min(context, heavy + recent)
    for layer_idx in range(model.config.num_hidden_layers):
        k = torch.randn(_kv_shape(model, batch, kept), generator=gen, device=model.device, dtype=torch.bfloat16)
        cache.update(k, torch.randn_like(k), layer_idx)
        layer = cache.layers[layer_idx]
        layer.accumulate(torch.rand(layer.scores.shape, generator=gen, device=model.device))
        # positions: the heavy slots spread over the old part, then the recent window
        old = torch.linspace(0, context - recent - 1, kept - recent, device=model.device).long()
        pos = torch.cat([old, torch.arange(context - recent, context, device=model.device)])
        layer.positions = pos.expand_as(layer.positions).contiguous()
        layer.cumulative_length = context
    return cache


def cache_bytes(cache) -> int:
    if isinstance(cache, H2OCache):
        return cache.kv_bytes()
    return sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def decode_steps(model, cache, batch: int, steps: int, warmup: int = 2) -> dict:
    """Median per-step time of greedy decode steps on ``cache`` (mutated)."""
    device = str(model.device)
    token = torch.randint(0, model.config.vocab_size, (batch, 1), device=model.device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / GIB if device.startswith("cuda") else float("nan")
    return dict(step_ms=step * 1e3, tokens_per_s=batch / step, peak_gib=peak, kv_gib=cache_bytes(cache) / GIB)


def run_case(model, kind: str, batch: int, args, budget: tuple[int, int]) -> dict:
    if kind == "h2o":
        enable_h2o(model)
        cache = h2o_cache(model, batch, args.context, *budget)
    else:
        disable_h2o(model)
        cache = full_cache(model, batch, args.context)
    row = dict(case=kind, batch=batch, context=args.context, kept=budget[0] + budget[1] if kind == "h2o"
               else args.context, **decode_steps(model, cache, batch, args.steps))
    del cache
    _free()
    return row


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def largest_batch(model, kind: str, args, budget, per_sample_gib: float, weights_gib: float) -> dict:
    """Run at the largest batch that fits under --cap-gib, starting from an estimate."""
    # the DynamicCache's torch.cat holds one layer twice; leave 4 GiB for activations/allocator
    overhead = 1 + 1 / model.config.num_hidden_layers
    batch = max(1, int((args.cap_gib - weights_gib - 4) / (per_sample_gib * overhead)))
    for _ in range(6):
        try:
            return run_case(model, kind, batch, args, budget)
        except torch.OutOfMemoryError:
            _free()
            batch = max(1, int(batch * 0.9))
    raise RuntimeError(f"{kind}: no batch fits under {args.cap_gib} GiB")


@torch.inference_mode()
def check_correctness(model) -> dict:
    """Full-budget H2O vs SDPA on identical cache contents, both against a float32 model.

    Pass: H2O's error is at most 2x SDPA's (same bf16 weights and cache), the principle of
    bounding by the same-precision PyTorch error.
    """
    import copy

    batch, context = 2, 2048
    disable_h2o(model)
    reference_model = copy.deepcopy(model).float()
    full = full_cache(model, batch, context, seed=7)
    contents = [(layer.keys.clone(), layer.values.clone()) for layer in full.layers]
    token = torch.randint(0, model.config.vocab_size, (batch, 1), device=model.device)
    sdpa = model(input_ids=token, past_key_values=full, use_cache=True).logits.float()
    full32 = full_cache(model, batch, 0)
    for i, (k, v) in enumerate(contents):
        full32.layers[i].keys, full32.layers[i].values = k.float(), v.float()
    ref = reference_model(input_ids=token, past_key_values=full32, use_cache=True).logits.float()
    del reference_model, full32
    enable_h2o(model)
    h2o = H2OCache(heavy=context, recent=context)
    for i, (k, v) in enumerate(contents):  # same contents; slots = positions 0..context-1
        h2o.update(k, v, i)
        h2o.layers[i].accumulate(torch.zeros_like(h2o.layers[i].scores))
    out = model(input_ids=token, past_key_values=h2o, use_cache=True).logits.float()
    rel = lambda x: ((x - ref).norm() / ref.norm()).item()  # noqa: E731
    row = dict(case="check", context=context, batch=batch, h2o_rel_err=rel(out), sdpa_rel_err=rel(sdpa),
               h2o_vs_sdpa_rel=((out - sdpa).norm() / sdpa.norm()).item(),
               same_argmax_as_sdpa=bool((out.argmax(-1) == sdpa.argmax(-1)).all()))
    row["ok"] = row["h2o_rel_err"] <= 2 * row["sdpa_rel_err"] + 1e-6
    del full, h2o, contents
    _free()
    return row


@torch.inference_mode()
def prefill_row(model, kind: str, context: int, budget) -> dict:
    device = str(model.device)
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=model.device)
    if kind == "h2o":
        enable_h2o(model)
        cache = H2OCache(heavy=budget[0], recent=budget[1])
    else:
        disable_h2o(model)
        from transformers import DynamicCache
        cache = DynamicCache()
    _sync(device)
    start = time.perf_counter()
    model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    _sync(device)
    row = dict(case=f"prefill_{kind}", batch=1, context=context, seconds=time.perf_counter() - start,
               kv_gib=cache_bytes(cache) / GIB)
    del cache
    _free()
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--budget", type=float, default=0.2, help="kept fraction (half heavy, half recent)")
    parser.add_argument("--batch", type=int, default=8, help="batch of the equal-batch comparison")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--cap-gib", type=float, default=64.0)
    parser.add_argument("--tiny", action="store_true", help="tiny model, CPU-sized run")
    parser.add_argument("--out", default="benchmarks/results/h2o_decode.json")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tiny:
        args.context, args.batch, args.steps = min(args.context, 512), min(args.batch, 2), min(args.steps, 4)
    model = build_model(args.tiny, device)
    heavy = math.ceil(args.budget * args.context / 2)
    budget = (heavy, heavy)
    rows = [check_correctness(model)]
    print(rows[-1], flush=True)
    for kind in ("full", "h2o"):
        rows.append(run_case(model, kind, args.batch, args, budget))
        print(rows[-1], flush=True)
    if device == "cuda" and not args.tiny:
        weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
        torch.cuda.set_per_process_memory_fraction(
            args.cap_gib * GIB / torch.cuda.get_device_properties(0).total_memory)
        for kind, eq in (("full", rows[1]), ("h2o", rows[2])):
            row = largest_batch(model, kind, args, budget, eq["kv_gib"] / args.batch, weights_gib)
            row["case"] = f"{kind}_max_batch"
            rows.append(row)
            print(rows[-1], flush=True)
        torch.cuda.set_per_process_memory_fraction(1.0)
        for kind in ("full", "h2o"):
            rows.append(prefill_row(model, kind, args.context, budget))
            print(rows[-1], flush=True)
    by = {r["case"]: r for r in rows}
    ratios = dict(kv_memory=by["h2o"]["kv_gib"] / by["full"]["kv_gib"],
                  step_time_equal_batch=by["h2o"]["step_ms"] / by["full"]["step_ms"])
    if "h2o_max_batch" in by:
        ratios["tokens_per_s_max_batch"] = by["h2o_max_batch"]["tokens_per_s"] / by["full_max_batch"]["tokens_per_s"]
    _write(args, device, model, rows, ratios)


def _write(args, device: str, model, rows: list[dict], ratios: dict) -> None:
    import transformers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    result = dict(
        benchmark="h2o_decode", target="K8", date=datetime.datetime.now().isoformat(timespec="seconds"),
        command="python -m benchmarks.h2o_decode " + " ".join(sys.argv[1:]),
        gpu=torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        torch=torch.__version__, triton=triton_version, transformers=transformers.__version__,
        model=dict(params=sum(p.numel() for p in model.parameters()), dtype="bfloat16",
                   **{k: getattr(model.config, k) for k in ("hidden_size", "num_hidden_layers",
                                                            "num_attention_heads", "num_key_value_heads")}),
        settings=vars(args), rows=rows, ratios=ratios)
    print(json.dumps(ratios, indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
