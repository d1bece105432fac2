"""K7 (shared/BENCHMARKS.md): a whole LAWCAT attention layer vs softmax attention, and decode state.

Rows, for B=1, H=32, head_dim 128, hidden 4096, bf16, N tokens:

* ``sdpa_core``      - ``F.scaled_dot_product_attention(is_causal=True)`` on q/k/v alone;
* ``softmax_layer``  - transformers' ``LlamaAttention`` (q/k/v/o projections, RoPE, SDPA);
* ``lawcat_layer``   - ``LawcatAttention`` around the same projections (conv, Hedgehog feature
  map, gate, normalised GLA), once per available backend (``fla``, ``chunked``);

each timed for prefill (forward under ``no_grad``) and forward+backward (all parameters and the
input require grad). Correctness is checked in the same run: the fla and chunked layers against
each other at every N and against the float32 recurrent reference at the smallest N. Then the
decode state of one LAWCAT layer after prefilling 8k..128k tokens (bytes held, and peak extra
memory over 16 decode steps) next to the KV cache a softmax layer would hold.

Run: ``python -m benchmarks.lawcat_layer [--lengths 2048 4096 ...] [--out PATH]``.
Writes ``benchmarks/results/lawcat_layer.json`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

RESULTS = os.path.join(os.path.dirname(__file__), "results", "lawcat_layer.json")


def _layers(heads: int, kv_heads: int, head_dim: int, dtype, device):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    from petl.linear import LawcatAttention, LawcatConfig

    cfg = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=head_dim, num_hidden_layers=1, intermediate_size=256,
                      max_position_embeddings=1 << 18)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    softmax = LlamaAttention(cfg, layer_idx=0).to(device, dtype)
    for lin in (softmax.q_proj, softmax.k_proj, softmax.v_proj, softmax.o_proj):
        torch.nn.init.normal_(lin.weight, std=head_dim ** -0.5 / 4)
    lawcat = LawcatAttention(softmax, LawcatConfig())
    return cfg, softmax, lawcat, LlamaRotaryEmbedding(cfg).to(device)


def _bench(fn, grad_to_none=None) -> float:
    """Median ms: triton's do_bench (CUDA events) on the GPU, a wall clock for the CPU smoke run."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=5, rep=40, grad_to_none=grad_to_none, return_mode="median"))
    import time

    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def run(lengths: list[int], decode_lengths: list[int], out_path: str, heads: int = 32,
        head_dim: int = 128, backends: list[str] | None = None) -> dict:
    import torch.nn.functional as F
    import transformers
    import triton

    from petl.linear import LawcatCache, fla_available

    os.environ.pop("PETL_LAWCAT_BACKEND", None)
    cuda = torch.cuda.is_available()
    dev, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    H, D = heads, head_dim
    cfg, softmax, lawcat, rope = _layers(H, H, D, dtype, dev)
    available = (["fla"] if fla_available() else []) + ["chunked"]
    backends = [b for b in (backends or available) if b in available]
    result = {
        "benchmark": "lawcat_layer", "target": "K7",
        "gpu": torch.cuda.get_device_name() if cuda else "cpu (smoke run, not a result)", "torch": torch.__version__, "triton": triton.__version__,
        "transformers": transformers.__version__, "fla_available": fla_available(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, "-m", "benchmarks.lawcat_layer"] + sys.argv[1:]),
        "shape": {"B": 1, "H": H, "kv_heads": H, "head_dim": D, "hidden": H * D, "dtype": str(dtype)},
        "prefill": [], "checks": [], "decode": [],
    }

    def save():
        os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
        with open(out_path, "w") as fh:
            json.dump(result, fh, indent=1)

    params = list(softmax.parameters()) + [p for n, p in lawcat.named_parameters() if "lawcat_" in n]
    for N in lengths:
        gen = torch.Generator(device=dev).manual_seed(N)
        x = torch.randn(1, N, H * D, device=dev, dtype=dtype, generator=gen)
        dy = torch.randn_like(x)
        pos = torch.arange(N, device=dev)[None]
        pe = rope(x, pos)
        q, k, v = (torch.randn(1, H, N, D, device=dev, dtype=dtype, generator=gen).requires_grad_()
                   for _ in range(3))
        flops = 4 * H * D * N * (N + 1) / 2
        rows: dict[str, dict] = {}

        def core_fb():
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(dy.view(1, N, H, D).transpose(1, 2))

        with torch.no_grad():
            rows["sdpa_core"] = {"fwd_ms": _bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))}
            rows["softmax_layer"] = {"fwd_ms": _bench(lambda: softmax(x, position_embeddings=pe)[0])}
        rows["sdpa_core"]["fwd_bwd_ms"] = _bench(core_fb, grad_to_none=[q, k, v])
        xg = x.detach().clone().requires_grad_()
        rows["softmax_layer"]["fwd_bwd_ms"] = _bench(
            lambda: softmax(xg, position_embeddings=pe)[0].backward(dy), grad_to_none=params + [xg])
        outs = {}
        for be in backends:
            print(f"N={N}: timing lawcat_layer[{be}] (fla's first call autotunes ~15 Triton kernels: minutes)",
                  flush=True)
            lawcat.lawcat_config.backend = be
            with torch.no_grad():
                outs[be] = lawcat(x, position_embeddings=pe)[0]
                fwd = _bench(lambda: lawcat(x, position_embeddings=pe)[0])
            fb = _bench(lambda: lawcat(xg, position_embeddings=pe)[0].backward(dy), grad_to_none=params + [xg])
            rows[f"lawcat_layer[{be}]"] = {"fwd_ms": fwd, "fwd_bwd_ms": fb}
        if N == min(lengths):
            lawcat.lawcat_config.backend = "reference"
            with torch.no_grad():
                ref = lawcat(x, position_embeddings=pe)[0]
            for be, o in outs.items():
                result["checks"].append({"N": N, "what": f"{be} vs float32 reference", "rel_err": _rel(o, ref)})
        if {"fla", "chunked"} <= set(outs):
            result["checks"].append({"N": N, "what": "fla vs chunked", "rel_err": _rel(outs["fla"], outs["chunked"])})
        for name, r in rows.items():
            r.update(N=N, impl=name, sdpa_tflops_fwd=flops / r["fwd_ms"] / 1e9,
                     speedup_fwd_vs_sdpa_core=rows["sdpa_core"]["fwd_ms"] / r["fwd_ms"],
                     speedup_fwd_bwd_vs_sdpa_core=rows["sdpa_core"]["fwd_bwd_ms"] / r["fwd_bwd_ms"],
                     speedup_fwd_vs_softmax_layer=rows["softmax_layer"]["fwd_ms"] / r["fwd_ms"],
                     speedup_fwd_bwd_vs_softmax_layer=rows["softmax_layer"]["fwd_bwd_ms"] / r["fwd_bwd_ms"])
            result["prefill"].append(r)
            print(f"N={N:6d} {name:22s} fwd {r['fwd_ms']:8.2f} ms  fwd+bwd {r['fwd_bwd_ms']:8.2f} ms  "
                  f"x sdpa(fwd) {r['speedup_fwd_vs_sdpa_core']:5.2f}  x softmax-layer(fwd) "
                  f"{r['speedup_fwd_vs_softmax_layer']:5.2f}  (fwd+bwd {r['speedup_fwd_bwd_vs_softmax_layer']:5.2f})",
                  flush=True)
        del x, dy, xg, q, k, v, outs
        if cuda:
            torch.cuda.empty_cache()
        save()

    lawcat.lawcat_config.backend = backends[0]
    for N in decode_lengths:
        cache = LawcatCache(cfg, [0])
        with torch.no_grad():
            piece = min(N, 16384)  # chunked prefill through the cache bounds activation memory
            for start in range(0, N, piece):
                x = torch.randn(1, min(piece, N - start), H * D, device=dev, dtype=dtype)
                pos = torch.arange(start, start + x.shape[1], device=dev)[None]
                lawcat(x, position_embeddings=rope(x, pos), cache=cache)
            del x
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if cuda else 0
            sizes = []
            for t in range(16):
                x1 = torch.randn(1, 1, H * D, device=dev, dtype=dtype)
                lawcat(x1, position_embeddings=rope(x1, torch.tensor([[N + t]], device=dev)), cache=cache)
                sizes.append(cache.lawcat_state_nbytes())
        row = {"N": N, "state_bytes": sizes[-1], "state_constant_over_steps": len(set(sizes)) == 1,
               "decode_peak_extra_bytes": (torch.cuda.max_memory_allocated() - base) if cuda else None,
               "softmax_kv_cache_bytes": 2 * N * H * D * 2, "seq_len_seen": cache.get_seq_length()}
        result["decode"].append(row)
        peak = row["decode_peak_extra_bytes"] or 0
        print(f"decode N={N:7d} state {row['state_bytes'] / 2**20:6.2f} MiB  peak extra {peak / 2**20:7.2f} MiB"
              f"  (softmax KV {row['softmax_kv_cache_bytes'] / 2**20:8.1f} MiB)", flush=True)
        save()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--decode-lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--backends", nargs="+", choices=["fla", "chunked"], default=None,
                    help="LAWCAT backends to time (default: every available one)")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    if not torch.cuda.is_available() and args.out == RESULTS:
        raise SystemExit("benchmarks.lawcat_layer measures on CUDA; on CPU only a smoke run with --out elsewhere")
    run(args.lengths, args.decode_lengths, args.out, args.heads, args.head_dim, args.backends)


if __name__ == "__main__":
    main()
