"""K7 (shared/BENCHMARKS.md): LAWCAT's attention (conv + feature map + gate + normalised GLA) vs
SDPA causal, the GLA core vs fla's ``chunk_gla``, and the decode state.

Rows, for B=1, H=32, head_dim 128, hidden 4096, bf16, N tokens (fwd under ``no_grad``; fwd+bwd
with q, k, v, x and the LAWCAT parameters requiring grad, random upstream gradient):

* ``sdpa_core``            - ``F.scaled_dot_product_attention(q, k, v, is_causal=True)``: what a
  softmax layer computes between its projections;
* ``fla_chunk_gla_core``   - fla's ``chunk_gla`` alone on Hedgehog-like features (K = V = 128);
* ``petl_prefill_core``    - petl's forward-only prefill kernels alone (kernel_prefill.py: gate,
  normaliser, GLA and division from the raw gate logits) on the same features, V = 128;
* ``lawcat[prefill]``      - ``LawcatAttention.attend(x, q, k, v)`` under ``no_grad``: conv + feature
  map kernels, gate Linear layers, then the prefill kernels (what generation's prefill runs);
* ``lawcat[fused+fla]``    - the fused path with fla's ``chunk_gla`` (the training path; its forward
  row is timed with the prefill kernels switched off): petl's Triton kernels (conv + feature map,
  gate + normaliser, division) around fla's ``chunk_gla``;
* ``lawcat[torch+fla]``    - the same with ``kernels="off"``: PyTorch pre/post-processing, fla
  core over ``[v, 1]`` padded to 144 columns (N <= ``--slow-max``);
* ``lawcat[torch+chunked]`` - the pure PyTorch path (chunked core), the fallback without fla
  (N <= ``--slow-max``);
* ``softmax_layer`` / ``lawcat_layer[fused+fla]`` - whole modules with q/k/v/o projections (the
  LAWCAT module's forward row runs under ``no_grad``, hence through the prefill kernels).

Correctness is checked in the same run, before timing: at the smallest N every LAWCAT row and
the core against the float32 recurrent reference (the same layer with ``backend="reference"``),
and at every N the fused path against the PyTorch chunked path. Then the decode state of one
layer after prefilling 8k..128k tokens (bytes held, peak extra memory over 16 decode steps).

fla autotunes ~10 kernels on first use; ``--fla-tuning short`` (default here) restricts them to
one or two configurations each (petl/linear/fla_backend.py), ``full`` keeps fla's lists.

Run: ``python -m benchmarks.lawcat_layer [--lengths 2048 ...] [--out PATH]``. ``--prefill-sweep N ...``
times kernel_prefill.py's launch-table variants per pass instead; ``--prefill-table sweep`` then runs
the layer rows with the fastest of them (recorded as ``prefill_table`` in the results).
``--prefill-layer N ...`` times K7's forward row (the whole no-grad ``attend``) per launch-table
variant (``LAYER_VARIANTS``) against SDPA, stored as ``prefill_layer``.
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
    with torch.no_grad():  # data-dependent gates (the init gives every token the same gate)
        lawcat.lawcat_gate.up.weight.normal_(0.0, 0.05)
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


def _gla_flops(N: int, H: int, K: int, V: int, C: int = 64) -> float:
    """Forward FLOPs of chunked GLA: state update + inter-chunk output (4KV per token) and the
    causal in-chunk scores and their product with v (C(K+V) per token)."""
    return float(H) * N * (4 * K * V + C * (K + V))


def run(lengths: list[int], decode_lengths: list[int], out_path: str, heads: int = 32,
        head_dim: int = 128, slow_max: int = 32768) -> dict:
    import torch.nn.functional as F
    import transformers
    import triton

    from petl.linear import LawcatCache
    from petl.linear.fla_backend import fla_available, fla_chunk_gla, tuning_mode
    from petl.linear.fused import fused_attend

    os.environ.pop("PETL_LAWCAT_BACKEND", None)
    cuda = torch.cuda.is_available()
    dev, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    H, D = heads, head_dim
    cfg, softmax, lawcat, rope = _layers(H, H, D, dtype, dev)
    lcfg = lawcat.lawcat_config
    has_fla = cuda and fla_available()
    result = {
        "benchmark": "lawcat_layer", "target": "K7",
        "gpu": torch.cuda.get_device_name() if cuda else "cpu (smoke run, not a result)",
        "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
        "fla_available": has_fla, "fla_tuning": tuning_mode(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, "-m", "benchmarks.lawcat_layer"] + sys.argv[1:]),
        "shape": {"B": 1, "H": H, "kv_heads": H, "head_dim": D, "feature_dim": lawcat.feature_size,
                  "hidden": H * D, "dtype": str(dtype)},
        "prefill": [], "checks": [], "decode": [],
    }
    from petl.linear import kernel_prefill as kp

    result["prefill_table"] = {"chunk": kp.CHUNK, "state_mode": kp.STATE_MODE, "state_bk": kp.STATE_BK,
                               "state_bv": kp.STATE_BV, "update_bv": kp.UPDATE_BV, "out_bv": kp.OUT_BV,
                               "warps": dict(kp.WARPS), "stages": dict(kp.STAGES),
                               "state_dtype": str(kp.STATE_DTYPE or "the inputs' dtype"), "state_split": kp.STATE_SPLIT}
    if has_fla:
        import fla

        result["fla_version"] = fla.__version__

    kept = {}  # what other commands stored in the file (--components, GPU test logs) survives a rerun
    if os.path.isfile(out_path):
        with open(out_path) as fh:
            kept = {key: val for key, val in json.load(fh).items()
                    if key in ("components", "components_previous", "gpu_tests", "prefill_sweep",
                               "prefill_previous")}

    def save():
        os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
        with open(out_path, "w") as fh:
            json.dump({**kept, **result}, fh, indent=1)

    def configure(kernels: str, backend: str) -> None:
        lcfg.kernels, lcfg.backend = kernels, backend

    lawcat_params = [p for n, p in lawcat.named_parameters() if "lawcat_" in n]
    softmax_params = list(softmax.parameters())
    variants = ([("fused+fla", "on", "fla")] if has_fla else []) + [("torch+chunked", "off", "chunked")]
    if has_fla:
        variants.append(("torch+fla", "off", "fla"))
    if cuda and not has_fla:
        variants.insert(0, ("fused+chunked", "on", "chunked"))
    Fd = lawcat.feature_size
    for N in lengths:
        gen = torch.Generator(device=dev).manual_seed(N)
        rnd = lambda *s: torch.randn(*s, device=dev, dtype=dtype, generator=gen)  # noqa: E731
        x = rnd(1, N, H * D)
        q, k, v = (rnd(1, N, H, D) for _ in range(3))
        dy = rnd(1, N, H, D)
        pe = rope(x, torch.arange(N, device=dev)[None])
        rows: dict[str, dict] = {}
        outs: dict[str, torch.Tensor] = {}

        # ---- SDPA: q, k, v in its [B, H, N, D] layout
        qs, ks, vs = (t.transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
        dys = dy.transpose(1, 2).contiguous()
        with torch.no_grad():
            fwd = _bench(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
        fb = _bench(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).backward(dys),
                    grad_to_none=[qs, ks, vs])
        rows["sdpa_core"] = {"fwd_ms": fwd, "fwd_bwd_ms": fb, "tflops_fwd": 4 * H * D * N * (N + 1) / 2 / fwd / 1e9}
        del qs, ks, vs, dys

        # ---- fla chunk_gla alone, on Hedgehog-like positive features
        if has_fla:
            fq, fk = (torch.randn(1, N, H, Fd, device=dev, generator=gen).softmax(-1).to(dtype).requires_grad_()
                      for _ in range(2))
            fg = (F.logsigmoid(torch.randn(1, N, H, Fd, device=dev, generator=gen) + 3) / 16).requires_grad_()
            fv = v.detach().clone().requires_grad_()
            with torch.no_grad():
                fwd = _bench(lambda: fla_chunk_gla(fq, fk, fv, fg, output_final_state=False))
            fb = _bench(lambda: fla_chunk_gla(fq, fk, fv, fg, output_final_state=False)[0].backward(dy),
                        grad_to_none=[fq, fk, fv, fg])
            rows["fla_chunk_gla_core"] = {"fwd_ms": fwd, "fwd_bwd_ms": fb,
                                          "tflops_fwd": _gla_flops(N, H, Fd, D) / fwd / 1e9}
            if N == min(lengths):
                from petl.linear.chunked import chunked_gla

                with torch.no_grad():
                    o_fla = fla_chunk_gla(fq, fk, fv, fg, output_final_state=False)[0]
                    o_ref = chunked_gla(fq.float(), fk.float(), fv.float(), fg)[0]
                result["checks"].append({"N": N, "what": "fla chunk_gla vs float32 chunked form on the same inputs",
                                         "rel_err": _rel(o_fla, o_ref)})
        # ---- petl's prefill kernels alone: the same features, raw gate logits instead of g
        from petl.linear.chunked import chunked_gla
        from petl.linear.kernel_prefill import lawcat_prefill

        pq, pk = (torch.randn(1, N, H, Fd, device=dev, generator=gen).softmax(-1).to(dtype) for _ in range(2))
        plog = (torch.randn(1, N, H, Fd, device=dev, generator=gen) + 3).to(dtype)
        with torch.no_grad():
            fwd = _bench(lambda: lawcat_prefill(pq, pk, v, plog, 16.0, out_dtype=dtype))
            rows["petl_prefill_core"] = {"fwd_ms": fwd, "fwd_bwd_ms": None,
                                         "tflops_fwd": _gla_flops(N, H, Fd, D) / fwd / 1e9}
            if N == min(lengths):
                o_k = lawcat_prefill(pq, pk, v, plog, 16.0, out_dtype=dtype)[0]
                v1 = torch.cat([v.float(), torch.ones_like(v[..., :1]).float()], -1)      # [v, 1]
                num, _ = chunked_gla(pq.float(), pk.float(), v1, F.logsigmoid(plog.float()) / 16.0)
                result["checks"].append({"N": N, "what": "petl_prefill_core vs float32 chunked form (ones column)",
                                         "rel_err": _rel(o_k, num[..., :-1] / (num[..., -1:] + 1e-10))})
                del num
        del pq, pk, plog
        if has_fla:
            del fq, fk, fg, fv

        # ---- LAWCAT attention variants (LawcatAttention.attend)
        qg, kg, vg, xg = (t.detach().clone().requires_grad_() for t in (q, k, v, x))
        for name, kernels, backend in variants:
            if name.startswith("torch") and N > slow_max:
                continue
            configure(kernels, backend)
            print(f"N={N}: lawcat[{name}]", flush=True)
            with torch.no_grad():  # fwd of the training path: prefill kernels off
                attend = (lambda: fused_attend(lawcat, x, q, k, v, None, None, backend, {"prefill": False})
                          ) if kernels == "on" else (lambda: lawcat.attend(x, q, k, v))
                outs[name] = attend()
                fwd = _bench(attend)
            fb = _bench(lambda: lawcat.attend(xg, qg, kg, vg).backward(dy), grad_to_none=[qg, kg, vg, xg] + lawcat_params)
            rows[f"lawcat[{name}]"] = {"fwd_ms": fwd, "fwd_bwd_ms": fb,
                                       "tflops_fwd": _gla_flops(N, H, Fd, D) / fwd / 1e9}
        configure(*variants[0][1:])
        print(f"N={N}: lawcat[prefill]", flush=True)
        with torch.no_grad():
            outs["prefill"] = lawcat.attend(x, q, k, v)
            fwd = _bench(lambda: lawcat.attend(x, q, k, v))
        rows["lawcat[prefill]"] = {"fwd_ms": fwd, "fwd_bwd_ms": None, "tflops_fwd": _gla_flops(N, H, Fd, D) / fwd / 1e9}
        if N == min(lengths):
            configure("off", "reference")
            with torch.no_grad():  # bf16 -> fp32 -> bf16 leaves the weights unchanged
                ref = lawcat.float().attend(x.float(), q.float(), k.float(), v.float())
            lawcat.to(dtype)
            for name, o in outs.items():
                result["checks"].append({"N": N, "what": f"lawcat[{name}] ({dtype}) vs float32 recurrent reference",
                                         "rel_err": _rel(o, ref)})
            del ref
        for name in outs:
            if name != "torch+chunked" and "torch+chunked" in outs:
                result["checks"].append({"N": N, "what": f"lawcat[{name}] vs lawcat[torch+chunked]",
                                         "rel_err": _rel(outs[name], outs["torch+chunked"])})
        for c in result["checks"]:
            if c["N"] == N:
                print(f"  check N={N}: {c['what']}: rel err {c['rel_err']:.2e}", flush=True)

        # ---- whole modules (projections included)
        with torch.no_grad():
            rows["softmax_layer"] = {"fwd_ms": _bench(lambda: softmax(x, position_embeddings=pe)[0])}
            configure(*variants[0][1:])
            rows[f"lawcat_layer[{variants[0][0]}]"] = {"fwd_ms": _bench(lambda: lawcat(x, position_embeddings=pe)[0])}
        dyh = dy.reshape(1, N, H * D)
        rows["softmax_layer"]["fwd_bwd_ms"] = _bench(
            lambda: softmax(xg, position_embeddings=pe)[0].backward(dyh), grad_to_none=softmax_params + [xg])
        rows[f"lawcat_layer[{variants[0][0]}]"]["fwd_bwd_ms"] = _bench(
            lambda: lawcat(xg, position_embeddings=pe)[0].backward(dyh), grad_to_none=lawcat_params + softmax_params + [xg])

        base = rows["sdpa_core"]
        ratio = lambda a, b: a / b if a is not None and b is not None else None  # noqa: E731  (forward-only rows)
        fmt = lambda val, spec: "-" if val is None else format(val, spec)  # noqa: E731
        for name, r in rows.items():
            r.update(N=N, impl=name, speedup_fwd_vs_sdpa=base["fwd_ms"] / r["fwd_ms"],
                     speedup_fwd_bwd_vs_sdpa=ratio(base["fwd_bwd_ms"], r["fwd_bwd_ms"]))
            if "fla_chunk_gla_core" in rows:
                r["fwd_vs_fla_core"] = rows["fla_chunk_gla_core"]["fwd_ms"] / r["fwd_ms"]
                r["fwd_bwd_vs_fla_core"] = ratio(rows["fla_chunk_gla_core"]["fwd_bwd_ms"], r["fwd_bwd_ms"])
            result["prefill"].append(r)
            print(f"N={N:6d} {name:28s} fwd {r['fwd_ms']:9.3f} ms  fwd+bwd {fmt(r['fwd_bwd_ms'], '9.3f')} ms  "
                  f"x sdpa: fwd {r['speedup_fwd_vs_sdpa']:6.2f}  fwd+bwd {fmt(r['speedup_fwd_bwd_vs_sdpa'], '6.2f')}",
                  flush=True)
        del x, q, k, v, dy, qg, kg, vg, xg, outs
        if cuda:
            torch.cuda.empty_cache()
        save()

    configure(*variants[0][1:])
    result["decode_path"] = variants[0][0]
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
            base_mem = torch.cuda.memory_allocated() if cuda else 0
            sizes = []
            for t in range(16):
                x1 = torch.randn(1, 1, H * D, device=dev, dtype=dtype)
                lawcat(x1, position_embeddings=rope(x1, torch.tensor([[N + t]], device=dev)), cache=cache)
                sizes.append(cache.lawcat_state_nbytes())
        row = {"N": N, "state_bytes": sizes[-1], "state_constant_over_steps": len(set(sizes)) == 1,
               "decode_peak_extra_bytes": (torch.cuda.max_memory_allocated() - base_mem) if cuda else None,
               "softmax_kv_cache_bytes": 2 * N * H * D * 2, "seq_len_seen": cache.get_seq_length()}
        result["decode"].append(row)
        peak = row["decode_peak_extra_bytes"] or 0
        print(f"decode N={N:7d} state {row['state_bytes'] / 2**20:6.2f} MiB  peak extra {peak / 2**20:7.2f} MiB"
              f"  (softmax KV {row['softmax_kv_cache_bytes'] / 2**20:8.1f} MiB)", flush=True)
        save()
    return result


def _component_checks(dev, dtype, H: int, D: int, gate, conv_w, fm_w, n: int = 2048) -> list[dict]:
    """Correctness of petl's kernels before timing them: outputs and input gradients at n tokens
    (bf16 kernels) against the same maths in float32 PyTorch (the chunked GLA with a ones column
    for the normaliser, conv1d + einsum + softmax for the feature map)."""
    import torch.nn.functional as F

    from petl.linear.chunked import chunked_gla
    from petl.linear.kernel_features import conv_feature_map
    from petl.linear.kernel_normaliser import gate_normaliser

    gen = torch.Generator(device=dev).manual_seed(7)
    checks = []

    def record(what, pairs):
        for name, a, b in pairs:
            checks.append({"N": n, "what": f"{what}: {name} vs float32 PyTorch", "rel_err": _rel(a.detach(), b.detach())})

    def grads(out, ups, leaves):
        return torch.autograd.grad(sum((o.float() * u).sum() for o, u in zip(out, ups)), leaves)

    xs = torch.randn(1, n, H * D, device=dev, generator=gen).to(dtype)
    with torch.no_grad():
        lg = gate.logits(torch.randn(1, n, H * D, device=dev, generator=gen).to(dtype))
    pq, pk = (torch.randn(1, n, H, 2 * (fm_w.shape[-1]), device=dev, generator=gen).softmax(-1).to(dtype)
              for _ in range(2))
    ups = [torch.randn(1, n, H, pq.shape[-1], device=dev, generator=gen), torch.randn(1, H, n, device=dev, generator=gen),
           torch.randn(1, H, pq.shape[-1], device=dev, generator=gen)]
    kin = [t.detach().clone().requires_grad_() for t in (lg, pq, pk)]
    rin = [t.detach().float().requires_grad_() for t in (lg, pq, pk)]
    out = gate_normaliser(*kin, None, 16.0)
    g = F.logsigmoid(rin[0]) / 16.0
    o, s = chunked_gla(rin[1], rin[2], torch.ones(1, n, H, 1, device=dev), g)
    ref = (g, o[..., 0].transpose(1, 2), s[..., 0])
    record("gate_normaliser", list(zip(("g", "den", "z_T"), out, ref)) +
           list(zip(("dlogits", "dq", "dk"), grads(out, ups, kin), grads(ref, ups, rin))))

    def torch_fm(x, cw, fw):
        C = x.shape[-1]
        u = F.conv1d(F.pad(x.transpose(1, 2), (cw.shape[-1] - 1, 0)), cw, groups=C).transpose(1, 2)
        z = torch.einsum("bthd,hdf->bthf", u.reshape(1, n, H, D), fw)
        return torch.cat([z.softmax(-1), (-z).softmax(-1)], -1).clamp_min(1e-12)

    dphi = torch.randn(1, n, H, 2 * fm_w.shape[-1], device=dev, generator=gen)
    kin = [t.detach().clone().requires_grad_() for t in (xs, conv_w, fm_w)]
    rin = [t.detach().float().requires_grad_() for t in (xs, conv_w, fm_w)]
    for name, blocks in (("default", {}), ("bwd_dot=bf16", {"bwd_dot": "bf16"})):
        out = conv_feature_map(*kin, blocks=blocks)
        ref = torch_fm(*rin)
        record(f"conv_feature_map[{name}]", [("phi", out, ref)] +
               list(zip(("dx", "dconv_w", "dfm_w"), grads([out], [dphi], kin), grads([ref], [dphi], rin))))
    return checks


def components(N: int, out_path: str, heads: int = 32, head_dim: int = 128) -> dict:
    """Time each stage of the fused path at N tokens (fwd, and fwd+bwd where it has a backward),
    with variants of petl's launch tables (kernel_features.py, kernel_normaliser.py): what the
    fused layer's time is made of, and which table entries to keep. Correctness first."""
    import triton

    from petl.linear import kernel_normaliser
    from petl.linear.fla_backend import fla_chunk_gla
    from petl.linear.kernel_features import conv_feature_map
    from petl.linear.kernel_normaliser import gate_normaliser, normalise

    dev, dtype, H, D = torch.device("cuda"), torch.bfloat16, heads, head_dim
    _, _, lawcat, _ = _layers(H, H, D, dtype, dev)
    conv_w, fm_w, gate = lawcat.lawcat_conv_q.weight, lawcat.lawcat_feature_map_q.weight, lawcat.lawcat_gate
    Fd = lawcat.feature_size
    checks = _component_checks(dev, dtype, H, D, gate, conv_w, fm_w)
    for c in checks:
        print(f"  check N={c['N']}: {c['what']}: rel err {c['rel_err']:.2e}", flush=True)
    bad = [c for c in checks if not c["rel_err"] < 5e-2]     # bf16 noise is ~5e-3
    if bad:
        raise SystemExit(f"kernel check failed, not timing: {bad}")
    gen = torch.Generator(device=dev).manual_seed(1)
    x, q, k, v, dy = (torch.randn(1, N, *s, device=dev, dtype=dtype, generator=gen)
                      for s in ((H * D,), (H, D), (H, D), (H, D), (H, D)))
    rows = []

    def add(stage, variant, fwd_fn, fb_fn=None, grads=(), bytes_fwd=None, bytes_bwd=None):
        try:
            with torch.no_grad():
                fwd = _bench(fwd_fn)
            fb = _bench(fb_fn, grad_to_none=list(grads)) if fb_fn is not None else None
        except Exception as exc:  # a table entry that does not compile (e.g. out of shared memory)
            rows.append({"stage": stage, "variant": variant, "error": f"{type(exc).__name__}: {exc}"[:300]})
            print(f"N={N} {stage:18s} {variant:34s} FAILED {type(exc).__name__}", flush=True)
            return
        row = {"stage": stage, "variant": variant, "fwd_ms": fwd, "fwd_bwd_ms": fb}
        if bytes_fwd:  # the kernel's own traffic model (docs/lawcat.md), as achieved bandwidth
            row["fwd_TBps"] = bytes_fwd / fwd / 1e9
            if fb is not None and bytes_bwd:
                row["bwd_TBps"] = bytes_bwd / max(fb - fwd, 1e-6) / 1e9
        rows.append(row)
        print(f"N={N} {stage:18s} {variant:34s} fwd {fwd:8.3f} ms  fwd+bwd {fb if fb is None else round(fb, 3)}"
              + (f"  ({row['fwd_TBps']:.2f} / {row.get('bwd_TBps', 0):.2f} TB/s)" if bytes_fwd else ""), flush=True)

    xq = q.reshape(1, N, H * D)
    xg = xq.detach().clone().requires_grad_()
    dphi = torch.randn(1, N, H, Fd, device=dev, dtype=dtype, generator=gen)
    with torch.no_grad():
        phi_q = conv_feature_map(xq, conv_w, fm_w)
        phi_k = conv_feature_map(k.reshape(1, N, H * D), lawcat.lawcat_conv_k.weight, fm_w)
        logits = gate.logits(x)
    add("gate_logits", "2 Linear", lambda: gate.logits(x))
    # conv + feature map, per call: fwd reads x, writes phi; bwd reads x and dphi, writes dx
    fm_bytes = (2 * N * H * D + 2 * N * H * Fd, 2 * (2 * N * H * D + N * H * Fd))
    for name, blocks in (("table (BT=64/64 warps=4/8 split)", {}), ("fwd BT=128 warps=8", {"fwd": 128, "fwd_warps": 8}),
                         ("bwd warps=4", {"bwd_warps": 4}), ("bwd BT=128 warps=8", {"bwd": 128, "bwd_warps": 8}),
                         ("bwd BT=32 warps=4", {"bwd": 32, "bwd_warps": 4}), ("bwd stages=2", {"bwd_stages": 2}),
                         ("bwd dot=bf16", {"bwd_dot": "bf16"}), ("bwd 4 blocks/program", {"bwd_blocks": 4}),
                         ("bwd 32 blocks/program", {"bwd_blocks": 32})):
        add("conv_feature_map", name, lambda b=blocks: conv_feature_map(xq, conv_w, fm_w, blocks=b),
            None if "fwd BT" in name else (lambda b=blocks: conv_feature_map(xg, conv_w, fm_w, blocks=b).backward(dphi)),
            [xg, conv_w, fm_w], *fm_bytes)
    pq, pk, lg = (t.detach().clone().requires_grad_() for t in (phi_q, phi_k, logits))
    dden = torch.randn(1, H, N, device=dev, generator=gen)
    # chunk-parallel normaliser: fwd = summaries (x, k; g float32) + den (q, k, x); bwd = sums (q, x)
    # + main (q, k, x; dq, dk, dx); 2 bytes per bf16 element, the chunk states are ~1% on top
    nb = N * H * Fd
    norm_bytes = (nb * (2 * 5 + 4), nb * 2 * 8)
    for chunk, bf, warps in ((32, 64, None), (32, 128, None), (64, 64, None), (16, 128, None), (64, 128, None),
                             (32, 64, {"bwd": 4}), (32, 64, {"summary": 8, "den": 8})):
        kw = {"block_t": chunk, "block_f": bf}
        old = dict(kernel_normaliser.WARPS)
        kernel_normaliser.WARPS.update(warps or {})
        name = f"C={chunk} BF={bf}" + (f" warps {warps}" if warps else "") + (" (table)" if (chunk, bf, warps) == (
            kernel_normaliser.CHUNK, kernel_normaliser.BLOCK_F, None) else "")
        add("gate_normaliser", name, lambda kw=kw: gate_normaliser(logits, phi_q, phi_k, None, 16.0, **kw),
            lambda kw=kw: gate_normaliser(lg, pq, pk, None, 16.0, **kw)[1].backward(dden), [lg, pq, pk], *norm_bytes)
        kernel_normaliser.WARPS.clear()
        kernel_normaliser.WARPS.update(old)
    with torch.no_grad():
        g, den, _ = gate_normaliser(logits, phi_q, phi_k, None, 16.0)
    gq, gk_, gv, gg = (t.detach().clone().requires_grad_() for t in (phi_q, phi_k, v, g))
    add("fla_chunk_gla", "V=128, short tuning", lambda: fla_chunk_gla(phi_q, phi_k, v, g, output_final_state=False),
        lambda: fla_chunk_gla(gq, gk_, gv, gg, output_final_state=False)[0].backward(dy), [gq, gk_, gv, gg])
    with torch.no_grad():
        num = fla_chunk_gla(phi_q, phi_k, v, g, output_final_state=False)[0]
    gnum, gden = num.detach().clone().requires_grad_(), den.detach().clone().requires_grad_()
    add("normalise", "BT=64", lambda: normalise(num, den, 1e-10, dtype),
        lambda: normalise(gnum, gden, 1e-10, dtype).backward(dy), [gnum, gden])
    lawcat.lawcat_config.kernels, lawcat.lawcat_config.backend = "on", "fla"
    qg, kg, vg, xg2 = (t.detach().clone().requires_grad_() for t in (q, k, v, x))
    params = [p for n, p in lawcat.named_parameters() if "lawcat_" in n]
    add("attend", "fused+fla (total)", lambda: lawcat.attend(x, q, k, v),
        lambda: lawcat.attend(xg2, qg, kg, vg).backward(dy), [qg, kg, vg, xg2] + params)
    qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    add("sdpa", "causal (the K7 baseline)",
        lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
    copy_src = torch.empty(N * H * D * 4, dtype=torch.float32, device=dev)
    copy_dst = torch.empty_like(copy_src)
    copy_ms = _bench(lambda: copy_dst.copy_(copy_src))
    result = {"N": N, "H": H, "head_dim": D, "gpu": torch.cuda.get_device_name(), "triton": triton.__version__,
              "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([sys.executable, "-m", "benchmarks.lawcat_layer"] + sys.argv[1:]),
              "copy_bandwidth_TBps": 2 * copy_src.numel() * 4 / copy_ms / 1e9, "checks": checks, "stages": rows}
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    full = {}
    if os.path.isfile(out_path):  # keep the prefill/decode rows of an earlier full run
        with open(out_path) as fh:
            full = json.load(fh)
    if "components" in full:  # the previous kernels' stage times, for reference (another run)
        full["components_previous"] = full["components"]
    full["components"] = result
    with open(out_path, "w") as fh:
        json.dump(full, fh, indent=1)
    print(f"device copy {result['copy_bandwidth_TBps']:.2f} TB/s", flush=True)
    return result


#: launch-table variants timed by ``--prefill-sweep`` (keys of lawcat_prefill's ``blocks``)
PREFILL_VARIANTS = [
    ("table", {}),
    ("recurrent state pass (bk32 bv64)", {"state_mode": "recurrent"}),
    ("scan bk16 bv64", {"state_bk": 16, "state_bv": 64}),
    ("scan bk32 bv32", {"state_bk": 32, "state_bv": 32}),
    ("update bv64", {"update_bv": 64}),
    ("bf16 chunk states", {"state_dtype": "bfloat16"}),
    ("chunk 128", {"chunk": 128}),
    ("chunk 128, out 8 warps", {"chunk": 128, "out_warps": 8}),
    ("chunk 128, out bv64 8 warps", {"chunk": 128, "out_bv": 64, "out_warps": 8}),
]


def _prefill_blocks(table: dict) -> dict:
    return {key: (getattr(torch, val) if key == "state_dtype" else val) for key, val in table.items()}


def _store_section(out_path: str, key: str, result: dict) -> None:
    """Write ``result`` under ``key`` of the results file, keeping its other sections."""
    full = {}
    if os.path.isfile(out_path):
        with open(out_path) as fh:
            full = json.load(fh)
    full[key] = result
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as fh:
        json.dump(full, fh, indent=1)


def prefill_sweep(lengths: list[int], out_path: str, heads: int = 32, head_dim: int = 128) -> dict:
    """Time petl's prefill kernels (kernel_prefill.py) per pass for each launch-table variant,
    bf16, F = V = head_dim, after checking each variant against the float32 chunked form at the
    smallest N. Stored under ``prefill_sweep`` in --out with the fastest variant at the largest N."""
    import torch.nn.functional as F
    import triton

    from petl.linear import kernel_prefill as kp
    from petl.linear.chunked import chunked_gla

    H, Fd, V = heads, head_dim, head_dim
    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)  # CPU: an interpreter smoke run
    rows = []
    for N in lengths:
        gen = torch.Generator(device=dev).manual_seed(N)
        pq, pk = (torch.randn(1, N, H, Fd, device=dev, generator=gen).softmax(-1).to(dtype) for _ in range(2))
        v = torch.randn(1, N, H, V, device=dev, generator=gen).to(dtype)
        lg = (torch.randn(1, N, H, Fd, device=dev, generator=gen) + 3).to(dtype)
        ref = None
        if N == min(lengths):
            v1 = torch.cat([v.float(), torch.ones_like(v[..., :1]).float()], -1)          # [v, 1]
            num, _ = chunked_gla(pq.float(), pk.float(), v1, F.logsigmoid(lg.float()) / 16.0)
            ref = num[..., :-1] / (num[..., -1:] + 1e-10)
            del num
        args = (pq, pk, v, lg, None, 1 / 16.0)
        for name, table in PREFILL_VARIANTS:
            b = _prefill_blocks(table)
            try:
                with torch.no_grad():
                    err = None
                    if ref is not None:
                        err = _rel(kp.lawcat_prefill(pq, pk, v, lg, 16.0, blocks=b)[0], ref)
                        if not err < 1e-2:
                            raise RuntimeError(f"rel err {err:.3g} vs float32 chunked form")
                    total = _bench(lambda: kp.lawcat_prefill(pq, pk, v, lg, 16.0, blocks=b))
                    state = _bench(lambda: kp._state_pass(*args, None, None, False, b))
                    hs, zs, _, _ = kp._state_pass(*args, None, None, False, b)
                    out = _bench(lambda: kp._output_pass(*args, hs, zs, 1e-10, dtype, b))
                    del hs, zs
                row = {"N": N, "variant": name, "blocks": table, "total_ms": total, "state_ms": state,
                       "out_ms": out, "rel_err_vs_f32": err}
                print(f"N={N} {name:34s} total {total:.3f} ms  state {state:.3f}  out {out:.3f}  err {err}", flush=True)
            except Exception as exc:  # a variant that does not compile or fails its check
                row = {"N": N, "variant": name, "blocks": table, "error": f"{type(exc).__name__}: {exc}"[:300]}
                print(f"N={N} {name:34s} FAILED {row['error']}", flush=True)
            rows.append(row)
        del pq, pk, v, lg, ref
        if cuda:
            torch.cuda.empty_cache()
    timed = [r for r in rows if r["N"] == max(lengths) and "total_ms" in r]
    best = min(timed, key=lambda r: r["total_ms"]) if timed else {"blocks": {}, "variant": "table"}
    result = {"gpu": torch.cuda.get_device_name() if cuda else "cpu (smoke run, not a result)",
              "torch": torch.__version__, "triton": triton.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([sys.executable, "-m", "benchmarks.lawcat_layer"] + sys.argv[1:]),
              "H": H, "F": Fd, "V": V, "rows": rows, "best": best["blocks"], "best_variant": best["variant"]}
    _store_section(out_path, "prefill_sweep", result)
    print(f"fastest at N={max(lengths)}: {best['variant']} {best['blocks']}", flush=True)
    return result


#: ``--prefill-layer`` variants: fused_attend ``blocks`` (``prefill_<key>`` for kernel_prefill's
#: launch table, ``fwd`` / ``fwd_warps`` for the conv + feature-map kernel's forward)
LAYER_VARIANTS = [
    ("table", {}),
    ("scan state pass", {"prefill_state_mode": "scan"}),
    ("grouped 8", {"prefill_state_mode": "grouped", "prefill_group": 8}),
    ("grouped 32", {"prefill_state_mode": "grouped", "prefill_group": 32}),
    ("update 2 stages", {"prefill_update_stages": 2}),
    ("out 2 stages", {"prefill_out_stages": 2}),
    ("group bk 32", {"prefill_group_bk": 32}),
]


def prefill_layer(lengths: list[int], out_path: str, heads: int = 32, head_dim: int = 128) -> dict:
    """K7's forward row per launch-table variant: ``LawcatAttention.attend`` under no_grad (conv +
    feature maps, gate Linear layers, prefill kernels) for each ``LAYER_VARIANTS`` entry, against
    SDPA causal in the same run. Every variant is checked against the table's output at every N,
    and at the smallest N the table against the float32 PyTorch path (chunked core). Stored under
    ``prefill_layer`` in --out with the fastest variant per N."""
    import torch.nn.functional as F
    import transformers
    import triton

    from petl.linear.fused import fused_attend

    cuda = torch.cuda.is_available()
    dev, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    H, D = heads, head_dim
    _, _, lawcat, _ = _layers(H, H, D, dtype, dev)
    lawcat.lawcat_config.kernels, lawcat.lawcat_config.backend = "on", "chunked"
    rows, checks, best = [], [], {}
    for N in lengths:
        gen = torch.Generator(device=dev).manual_seed(N)
        rnd = lambda *s: torch.randn(*s, device=dev, dtype=dtype, generator=gen)  # noqa: E731
        x, q, k, v = rnd(1, N, H * D), rnd(1, N, H, D), rnd(1, N, H, D), rnd(1, N, H, D)
        with torch.no_grad():
            qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))
            sdpa = _bench(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
            del qs, ks, vs
            print(f"N={N:6d} {'sdpa causal':40s} {sdpa:8.3f} ms", flush=True)
            rows.append({"N": N, "impl": "sdpa_core", "fwd_ms": sdpa})
            table = fused_attend(lawcat, x, q, k, v, None, None, "chunked")
            if N == min(lengths):
                lawcat.lawcat_config.kernels = "off"   # bf16 -> fp32 -> bf16 leaves the weights unchanged
                ref = lawcat.float().attend(x.float(), q.float(), k.float(), v.float())
                lawcat.to(dtype)
                lawcat.lawcat_config.kernels = "on"
                checks.append({"N": N, "what": f"table ({dtype}) vs float32 PyTorch path (chunked)",
                               "rel_err": _rel(table, ref)})
                del ref
            for name, blocks in LAYER_VARIANTS:
                shown = {key: str(val).replace("torch.", "") for key, val in blocks.items()}
                try:
                    err = _rel(fused_attend(lawcat, x, q, k, v, None, None, "chunked", blocks), table)
                    checks.append({"N": N, "what": f"{name} vs table", "rel_err": err})
                    if not err < 1e-2:
                        raise RuntimeError(f"rel err {err:.3g} vs the table's output")
                    fwd = _bench(lambda: fused_attend(lawcat, x, q, k, v, None, None, "chunked", blocks))
                    row = {"N": N, "impl": f"lawcat[prefill] {name}", "blocks": shown, "fwd_ms": fwd,
                           "speedup_fwd_vs_sdpa": sdpa / fwd, "rel_err_vs_table": err}
                    print(f"N={N:6d} {name:40s} {fwd:8.3f} ms  x sdpa {sdpa / fwd:5.2f}  err {err:.2e}", flush=True)
                except Exception as exc:  # a variant that does not compile or fails its check
                    row = {"N": N, "impl": f"lawcat[prefill] {name}", "blocks": shown,
                           "error": f"{type(exc).__name__}: {exc}"[:300]}
                    print(f"N={N:6d} {name:40s} FAILED {row['error']}", flush=True)
                rows.append(row)
            del table
        timed = [r for r in rows if r["N"] == N and "speedup_fwd_vs_sdpa" in r]
        if timed:
            top = min(timed, key=lambda r: r["fwd_ms"])
            best[str(N)] = {"impl": top["impl"], "blocks": top["blocks"], "speedup_fwd_vs_sdpa": top["speedup_fwd_vs_sdpa"]}
        del x, q, k, v
        if cuda:
            torch.cuda.empty_cache()
    result = {"gpu": torch.cuda.get_device_name() if cuda else "cpu (smoke run, not a result)",
              "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([sys.executable, "-m", "benchmarks.lawcat_layer"] + sys.argv[1:]),
              "shape": {"B": 1, "H": H, "head_dim": D, "dtype": str(dtype)}, "rows": rows, "checks": checks,
              "best": best}
    _store_section(out_path, "prefill_layer", result)
    return result


def _set_prefill_table(table: dict) -> None:
    """Apply launch-table overrides to petl/linear/kernel_prefill.py for this process (sweeps)."""
    from petl.linear import kernel_prefill as kp

    names = {"chunk": "CHUNK", "state_bk": "STATE_BK", "state_bv": "STATE_BV", "out_bv": "OUT_BV",
             "state_split": "STATE_SPLIT", "state_mode": "STATE_MODE", "update_bv": "UPDATE_BV"}
    for key, val in table.items():
        if key in names:
            setattr(kp, names[key], val)
        elif key == "state_dtype":
            kp.STATE_DTYPE = getattr(torch, val)
        elif key.endswith(("_warps", "_stages")):
            (kp.WARPS if key.endswith("_warps") else kp.STAGES)[key.split("_")[0]] = int(val)
        else:
            raise SystemExit(f"--prefill-table key {key!r} is not a kernel_prefill table entry")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768, 65536])
    ap.add_argument("--decode-lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--slow-max", type=int, default=32768, help="longest N for the PyTorch-path rows")
    ap.add_argument("--fla-tuning", choices=["short", "full"], default="short",
                    help="fla autotuning: petl's short config lists (default) or fla's full lists")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--prefill-table", default="",
                    help="JSON overrides of kernel_prefill's launch table for this run, e.g. "
                         "'{\"chunk\": 64, \"out_warps\": 4}' (keys as lawcat_prefill's blocks), or "
                         "'sweep': the fastest variant of an earlier --prefill-sweep stored in --out")
    ap.add_argument("--prefill-sweep", type=int, nargs="*", default=None,
                    help="instead: time kernel_prefill's launch-table variants per pass at these N "
                         "(stored under 'prefill_sweep' in --out)")
    ap.add_argument("--prefill-layer", type=int, nargs="*", default=None,
                    help="instead: time the no-grad attend (K7's forward row) per launch-table variant at "
                         "these N, vs SDPA (stored under 'prefill_layer' in --out)")
    ap.add_argument("--components", type=int, default=0,
                    help="instead: time each stage of the fused path at this N (stored under "
                         "'components' in --out, next to an earlier full run's rows)")
    args = ap.parse_args()
    os.environ["PETL_FLA_TUNING"] = args.fla_tuning
    if args.prefill_sweep:
        prefill_sweep(args.prefill_sweep, args.out, args.heads, args.head_dim)
        return
    if args.prefill_layer:
        if not torch.cuda.is_available() and args.out == RESULTS:
            raise SystemExit("--prefill-layer measures on CUDA; on CPU only a smoke run with --out elsewhere")
        prefill_layer(args.prefill_layer, args.out, args.heads, args.head_dim)
        return
    if args.prefill_table == "sweep":
        with open(args.out) as fh:
            _set_prefill_table(json.load(fh)["prefill_sweep"]["best"])
    elif args.prefill_table:
        _set_prefill_table(json.loads(args.prefill_table))
    if args.components:
        components(args.components, args.out, args.heads, args.head_dim)
        return
    if not torch.cuda.is_available() and args.out == RESULTS:
        raise SystemExit("benchmarks.lawcat_layer measures on CUDA; on CPU only a smoke run with --out elsewhere")
    run(args.lengths, args.decode_lengths, args.out, args.heads, args.head_dim, args.slow_max)


if __name__ == "__main__":
    main()
