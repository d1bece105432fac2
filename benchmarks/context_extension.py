"""Evidence for issue 4: how much of full attention's context-extension gain S2 and SF recover.

Extends petl's embedded model 4x (256 -> 1024 tokens) three times under the same budget (LoRA+,
linear RoPE interpolation, same data, steps, seed and learning rate), training with full attention,
S2-Attn and SF-Attn, and evaluates each with full attention: held-out perplexity at 1x and 4x and
passkey accuracy. SinkLoRA's headline claim is that S2 recovers 39% and SF 92% of the perplexity
improvement of full attention; here

    recovered(pattern) = (ppl_base - ppl_pattern) / (ppl_base - ppl_full)     at 4x length.

Run:  python -m benchmarks.context_extension [--steps 150] [--device cpu|cuda]
Writes benchmarks/results/context_extension.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "context_extension.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-windows", type=int, default=64)
    parser.add_argument("--passkey-tests", type=int, default=20)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--summarize", default=None,
                        help="only summarise the finished runs in this folder (full/, s2/, sf/ with metrics.json)")
    args = parser.parse_args()

    import transformers

    import petl

    rows = {}
    work = Path(args.summarize or tempfile.mkdtemp(prefix="petl_ctx_"))
    for pattern in ("full", "s2", "sf"):
        if args.summarize:
            rows[pattern] = json.loads((work / pattern / "metrics.json").read_text())
            continue
        recipe = petl.load_recipe("quickstart", [
            f"attention.pattern={pattern}", f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}",
            f"train.lr={args.lr}", "train.save_steps=0", "train.precision=auto", f"eval.max_windows={args.max_windows}",
            "eval.perplexity_lengths=[256,1024]", "eval.passkey_lengths=[256,1024]",
            f"eval.passkey_num_tests={args.passkey_tests}", f"output.dir={work / pattern}",
            f"eval.before_training={'true' if pattern == 'full' else 'false'}"])
        print(f"== training with {pattern} attention ==", flush=True)
        rows[pattern] = petl.run_recipe(recipe)

    base = rows["full"]["before"]
    ppl = {"base": {k: v["ppl"] for k, v in base["perplexity"].items()}}
    key = {"base": base["passkey"]["accuracy"]}
    for pattern, metrics in rows.items():
        ppl[pattern] = {k: v["ppl"] for k, v in metrics["after"]["perplexity"].items()}
        key[pattern] = metrics["after"]["passkey"]["accuracy"]
    target = "1024"
    gain_full = ppl["base"][target] - ppl["full"][target]
    recovered = {p: (ppl["base"][target] - ppl[p][target]) / gain_full for p in ("s2", "sf")}
    result = {
        "benchmark": "context_extension", "date": datetime.date.today().isoformat(),
        "command": "python -m benchmarks.context_extension " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "petl": petl.__version__},
        "settings": vars(args), "perplexity": ppl, "passkey_accuracy": key,
        "recovered_fraction_of_full_attention_gain_at_4x": recovered,
        "train_runtime_s": {p: m["train"]["train_runtime"] for p, m in rows.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({"perplexity": ppl, "passkey": key, "recovered": recovered}, indent=2))


if __name__ == "__main__":
    main()
