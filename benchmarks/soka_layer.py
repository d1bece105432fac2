"""SoKA benchmarks K9 and K10 (shared/BENCHMARKS.md).

K9: one adapted linear layer, forward + backward (input gradient included, as inside a network),
bf16 base weight and activations, float32 adapter weights (peft's default), versus peft LoRA with
the same number of trainable parameters. Also timed: the frozen base layer alone (the floor), SoKA
with the ``weight`` init (trainable + frozen Kronecker sums) and with the ``zero``/``grad`` inits
(trainable sum only), and the same Kronecker matvec through plain autograd einsum (what the custom
autograd Function replaces). ``saved_MiB`` is the memory held between forward and backward.

K10: wall time of ``get_peft_model`` with SoKA (KPSVD init, energy+elbow ranks) on every q, k, v,
o, gate, up, down projection of a randomly initialised Llama-2-7B-shaped model in bf16 on the GPU.

Run: ``python -m benchmarks.soka_layer`` (writes benchmarks/results/soka_layer.json).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from petl.adapters.soka import SokaConfig  # importing it registers SOKA with peft

SHAPES = {"attn_4096x4096": (4096, 4096), "mlp_up_11008x4096": (11008, 4096), "mlp_down_4096x11008": (4096, 11008),
          "smoke_96x64": (96, 64)}
DEFAULT_SHAPES = "attn_4096x4096,mlp_up_11008x4096,mlp_down_4096x11008"


class _Holder(nn.Module):
    def __init__(self, d_out: int, d_in: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


DEVICE = "cuda"


def _base(d_out: int, d_in: int) -> _Holder:
    torch.manual_seed(0)
    holder = _Holder(d_out, d_in).to(DEVICE)
    nn.init.normal_(holder.proj.weight, std=0.02)
    return holder.to(torch.bfloat16).requires_grad_(False)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _bench(fn, inputs: list[torch.Tensor], params: list[torch.Tensor], reps: int = 30) -> tuple[float, float]:
    """Median ms of fwd+bwd over rotating inputs, and MiB held between forward and backward.

    The forward-only median (no grad) is left in ``_bench.last_fwd_ms``.
    """
    gy = torch.randn(fn(inputs[0]).shape, device=DEVICE, dtype=torch.bfloat16)
    for x in inputs:  # warm-up
        fn(x).backward(gy)
    times = []
    for rep in range(reps):
        x = inputs[rep % len(inputs)]
        for t in [x] + params:
            t.grad = None
        _sync()
        start = time.perf_counter()
        fn(x).backward(gy)
        _sync()
        times.append((time.perf_counter() - start) * 1e3)
    for t in inputs + params:
        t.grad = None
    with torch.no_grad():
        fwd = []
        for rep in range(reps):
            _sync()
            start = time.perf_counter()
            fn(inputs[rep % len(inputs)])
            _sync()
            fwd.append((time.perf_counter() - start) * 1e3)
    _bench.last_fwd_ms = statistics.median(fwd)
    if DEVICE != "cuda":
        return statistics.median(times), float("nan")
    before = torch.cuda.memory_allocated()
    y = fn(inputs[0])
    saved = (torch.cuda.memory_allocated() - before) / 2**20
    y.backward(gy)
    inputs[0].grad = None
    return statistics.median(times), saved


def _einsum_soka(layer, name: str = "default"):
    """The same SoKA output through autograd einsum (saves the R*n1*m2-per-token intermediate)."""
    from petl.adapters.soka.kpsvd import KronShape

    shape: KronShape = layer.soka_shape[name]

    def run(x: torch.Tensor) -> torch.Tensor:
        X = x.reshape(-1, shape.n1, shape.n2)
        out = layer.base_layer(x)
        for A, B, sign in ((layer.soka_A[name], layer.soka_B[name], 1.0), (layer.soka_A0[name], layer.soka_B0[name], -1.0)):
            Z = torch.einsum("nij,rkj->nirk", X, B.to(x.dtype))
            Y = torch.einsum("rli,nirk->nlk", A.to(x.dtype), Z)
            out = out + sign * Y.reshape(out.shape)
        return out
    return run


class _Rows(list):
    """Rows printed as they arrive, so a crash late in the run still shows the numbers."""

    def append(self, row: dict) -> None:
        super().append(row)
        _print_row(row)


def k9_rows(tokens: int, ranks: list[int], shapes: list[str]) -> list[dict]:
    from peft import LoraConfig, get_peft_model

    rows = _Rows()
    for shape_name in shapes:
        d_out, d_in = SHAPES[shape_name]
        gen = torch.Generator(device=DEVICE).manual_seed(1)
        inputs = [torch.randn(tokens, d_in, device=DEVICE, dtype=torch.bfloat16, generator=gen).requires_grad_()
                  for _ in range(3)]
        base = _base(d_out, d_in)
        ms, saved = _bench(base, inputs, [])
        rows.append(dict(target="K9", shape=shape_name, tokens=tokens, variant="base_linear_frozen", rank=0,
                         trainable_params=0, ms=ms, fwd_ms=_bench.last_fwd_ms, saved_MiB=saved))
        for r in ranks:
            results = {}
            for init in ("weight", "zero"):
                model = get_peft_model(_base(d_out, d_in), SokaConfig(
                    target_modules=["proj"], init_weights=init, rank_selection="fixed", r=r))
                params = [p for p in model.parameters() if p.requires_grad]
                n_params = sum(p.numel() for p in params)
                layer = model.base_model.model.proj
                with torch.no_grad():  # move off the init so the check below sees a real delta
                    for p in params:
                        p.add_(0.01 * torch.randn_like(p))
                    x = inputs[0][:64].detach()
                    dense = (x.float() @ (layer.base_layer.weight.float() + layer.get_delta_weight("default").float()).T)
                    rel = float((model(x).float() - dense).norm() / dense.norm())
                ms, saved = _bench(model, inputs, params)
                results[init] = ms
                rows.append(dict(target="K9", shape=shape_name, tokens=tokens, variant=f"soka_{init}_init", rank=r,
                                 trainable_params=n_params, ms=ms, fwd_ms=_bench.last_fwd_ms, saved_MiB=saved,
                                 rel_err_vs_dense=rel))
                if init == "weight":
                    ms_e, saved_e = _bench(_einsum_soka(layer), inputs, params)
                    rows.append(dict(target="K9", shape=shape_name, tokens=tokens, variant="soka_weight_einsum_autograd",
                                     rank=r, trainable_params=n_params, ms=ms_e, fwd_ms=_bench.last_fwd_ms,
                                     saved_MiB=saved_e))
                del model, layer, params
            r_lora = max(1, round(n_params / (d_out + d_in)))
            lora = get_peft_model(_base(d_out, d_in), LoraConfig(r=r_lora, lora_alpha=r_lora, target_modules=["proj"],
                                                                  init_lora_weights=False))
            params = [p for p in lora.parameters() if p.requires_grad]
            ms_l, saved_l = _bench(lora, inputs, params)
            rows.append(dict(target="K9", shape=shape_name, tokens=tokens, variant="peft_lora", rank=r_lora,
                             trainable_params=sum(p.numel() for p in params), ms=ms_l, fwd_ms=_bench.last_fwd_ms,
                             saved_MiB=saved_l))
            for init, ms in results.items():
                rows.append(dict(target="K9", shape=shape_name, tokens=tokens, variant=f"ratio_soka_{init}_over_lora",
                                 rank=r, ratio=ms / ms_l, meets_1_2x=ms / ms_l <= 1.2))
            del lora
    return rows


def k10_rows(layers: int, param_budget: int | None, hidden: int = 4096, intermediate: int = 11008,
             vocab: int = 32000) -> list[dict]:
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=vocab, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, vocab, (1, 64), device=DEVICE)
    with torch.no_grad():
        base_logits = model(ids).logits
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    rows = _Rows()
    for budget in (None, param_budget):
        # r_min=0 under a budget: at one term per module all 224 projections already hold 2.36M parameters
        soka = SokaConfig(target_modules=targets, r_max=16, param_budget=budget, r_min=0 if budget else 1)
        _sync()
        start = time.perf_counter()
        peft_model = get_peft_model(model, soka)
        _sync()
        seconds = time.perf_counter() - start
        with torch.no_grad():
            logits = peft_model(ids).logits.float()
            init_rel_err = float((logits - base_logits.float()).norm() / base_logits.float().norm())
        ranks = list(soka.rank_pattern.values())
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        rows.append(dict(target="K10", variant="kpsvd_init_7b_shape", layers=layers, modules=len(ranks),
                         seconds=seconds, meets_30s=seconds < 30, param_budget=budget, trainable_params=trainable,
                         rank_min=min(ranks), rank_max=max(ranks), rank_mean=sum(ranks) / len(ranks),
                         init_output_rel_err_vs_base=init_rel_err))
        model = peft_model.unload()  # SoKA never writes the base weights: the same base serves again
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--ranks", default="1,2,4,8")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"comma list of {sorted(SHAPES)}")
    parser.add_argument("--k10-layers", type=int, default=32)
    parser.add_argument("--k10-budget", type=int, default=990_000)
    parser.add_argument("--k10-hidden", type=int, default=4096)
    parser.add_argument("--k10-intermediate", type=int, default=11008)
    parser.add_argument("--skip-k10", action="store_true")
    parser.add_argument("--skip-k9", action="store_true")
    parser.add_argument("--device", default="cuda", help="cpu only for a smoke run of the script")
    parser.add_argument("--out", default="benchmarks/results/soka_layer.json")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks.soka_layer needs a CUDA GPU (--device cpu only smoke-tests the script)")
    import peft
    import transformers
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = dict(benchmark="soka_layer",
                gpu=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke run)",
                torch=torch.__version__, triton=triton_version, transformers=transformers.__version__,
                peft=peft.__version__, python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                command="python -m benchmarks.soka_layer " + " ".join(argv if argv is not None else sys.argv[1:]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = _Rows() if args.skip_k9 else _Rows(k9_rows(args.tokens, [int(r) for r in args.ranks.split(",")],
                                                       args.shapes.split(",")))
    out.write_text(json.dumps(dict(meta, rows=rows), indent=1))  # K9 is kept even if K10 is cut short
    if not args.skip_k10:
        try:
            rows += k10_rows(args.k10_layers, args.k10_budget, args.k10_hidden, args.k10_intermediate)
        except Exception as err:  # keep the K9 rows when the large model does not fit
            rows.append(dict(target="K10", error=f"{type(err).__name__}: {err}"))
        out.write_text(json.dumps(dict(meta, rows=rows), indent=1))
    print("summary:", flush=True)
    for row in rows:
        if "ratio" in row or row.get("target") == "K10":
            _print_row(row)


def _print_row(row: dict) -> None:
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                   if k not in ("target", "tokens")), flush=True)


if __name__ == "__main__":
    main()
