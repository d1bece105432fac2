"""Where the no-grad LAWCAT ``attend`` spends its GPU time: CUDA time per kernel (torch.profiler).

K7's forward row (benchmarks/lawcat_layer.py ``--prefill-layer``) times the whole call; this names
its parts (the conv + feature-map kernel twice, the gate's two Linear layers, the prefill
kernels), which is what decides where the next millisecond comes from.

Run: ``python -m benchmarks.lawcat_profile 8192 [--blocks '{"prefill_state_mode": "scan"}']``
(CUDA only; B = 1, H = 32, head dim 128, bf16, 20 calls after 5 warm-up calls). Prints the
profiler's table, sorted by CUDA time.
"""
from __future__ import annotations

import argparse
import json

import torch


def profile_attend(N: int, blocks: dict, heads: int = 32, head_dim: int = 128, calls: int = 20) -> str:
    """The profiler table of ``calls`` no-grad ``fused_attend`` calls at N tokens."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.lawcat_layer import _layers
    from petl.linear.fused import fused_attend

    dev, dtype, H, D = torch.device("cuda"), torch.bfloat16, heads, head_dim
    _, _, lawcat, _ = _layers(H, H, D, dtype, dev)
    lawcat.lawcat_config.kernels, lawcat.lawcat_config.backend = "on", "chunked"
    x, q, k, v = (torch.randn(1, N, *s, device=dev, dtype=dtype) for s in ((H * D,), (H, D), (H, D), (H, D)))
    with torch.no_grad():
        for _ in range(5):
            fused_attend(lawcat, x, q, k, v, None, None, "chunked", blocks)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fused_attend(lawcat, x, q, k, v, None, None, "chunked", blocks)
            torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("N", type=int)
    ap.add_argument("--blocks", default="{}", help="fused_attend launch-table overrides as JSON")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.lawcat_profile profiles CUDA kernels; run it on a GPU machine")
    print(profile_attend(args.N, json.loads(args.blocks)))


if __name__ == "__main__":
    main()
