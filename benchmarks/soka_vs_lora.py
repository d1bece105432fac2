"""SoKA vs peft LoRA vs peft PiSSA at matched trainable parameters (issue 6 item 7), on the CPU.

Task: adapt petl's embedded Shakespeare Llama (5 layers, d=256, native context 256) to its held-out
plays (Hamlet, Twelfth Night, The Tempest, in that order, never seen in pretraining).

Split (documented, deterministic): ``heldout.txt`` is tokenized once with the embedded tokenizer;
the first ``--train-frac`` (default 70%) of the token stream is the training text, cut into
non-overlapping 256-token blocks; the remaining 30% (the end of Twelfth Night and The Tempest) is
the evaluation text, scored with :func:`petl.eval.perplexity` in the sliding protocol (length 256,
stride 128; ``--max-windows N`` scores only the first N windows of it, i.e. its first ~128*N
tokens). No training block overlaps the evaluation tokens.

Methods, all on q/k/v/o of every layer, same seed, steps, batch, AdamW lr and cosine schedule:

* ``lora``: ``LoraConfig(r=R, lora_alpha=R)`` (B = 0 at init; the model starts unchanged);
* ``pissa``: the same ``LoraConfig`` with ``init_lora_weights="pissa"`` (top-R singular triplets
  trainable, the residual frozen);
* ``soka``: ``SokaConfig(init_weights="weight", rank_selection="energy", r_max=...)`` with
  ``param_budget`` = LoRA's trainable count, so the global budget trims the Kronecker terms until
  SoKA has at most as many trainable parameters (terms come in chunks of 256-512 here, so the counts
  match within ~2%; both exact counts are reported).

Run: ``python -m benchmarks.soka_vs_lora`` (writes benchmarks/results/soka_vs_lora.json); the
shipped result used ``--steps 80`` (all evaluation windows), about 10 CPU minutes on an idle 2-core machine.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
BLOCK = 256


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def _load_base():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from petl.embedded import embedded_model_path

    path = embedded_model_path()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                 attn_implementation="sdpa")
    return model, AutoTokenizer.from_pretrained(str(path))


def split_tokens(tokenizer, train_frac: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of heldout.txt split at ``train_frac``: (train ``[Nt]``, eval ``[Ne]``)."""
    from petl.embedded import heldout_text_path

    text = heldout_text_path().read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    cut = int(len(ids) * train_frac)
    return ids[:cut], ids[cut:]


def _adapter_config(method: str, rank: int, budget: int | None, soka_r_max: int):
    from peft import LoraConfig

    from petl.adapters.soka import SokaConfig

    if method == "lora":
        return LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, lora_dropout=0.0,
                          task_type="CAUSAL_LM")
    if method == "pissa":
        return LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, lora_dropout=0.0,
                          init_lora_weights="pissa", task_type="CAUSAL_LM")
    if method == "soka":
        return SokaConfig(target_modules=TARGETS, init_weights="weight", rank_selection="energy",
                          energy_threshold=0.99, r_max=soka_r_max, param_budget=budget,
                          task_type="CAUSAL_LM")
    raise ValueError(f"unknown method {method!r}; use lora, pissa or soka")


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _eval_ppl(model, eval_ids: torch.Tensor, max_windows: int | None) -> float:
    from petl.eval import perplexity

    out = perplexity(model, eval_ids, lengths=[BLOCK], mode="sliding", stride=BLOCK // 2,
                     batch_size=8, max_windows=max_windows, progress=False)
    return float(out[BLOCK]["ppl"])


def train(model, blocks: torch.Tensor, *, steps: int, batch: int, lr: float, warmup: int,
          seed: int) -> list[float]:
    """AdamW + linear warmup + cosine decay on ``blocks`` ``[Nb, 256]``; returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(blocks), generator=gen)
    losses = []
    model.train()
    for step in range(steps):
        idx = order[(torch.arange(batch) + step * batch) % len(order)]
        x = blocks[idx]                                           # [B, 256]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def run_method(method: str, args, train_blocks: torch.Tensor, eval_ids: torch.Tensor,
               budget: int | None) -> dict:
    from peft import get_peft_model

    torch.manual_seed(args.seed)
    base, _ = _load_base()
    t0 = time.perf_counter()
    model = get_peft_model(base, _adapter_config(method, args.lora_r, budget, args.soka_r_max))
    init_s = time.perf_counter() - t0
    n_train = _trainable(model)
    ppl_init = _eval_ppl(model, eval_ids, args.max_windows)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    losses = train(model, train_blocks, steps=args.steps, batch=args.batch, lr=args.lr,
                   warmup=args.warmup, seed=args.seed)
    train_s = time.perf_counter() - t0
    ppl_after = _eval_ppl(model, eval_ids, args.max_windows)
    row = {"method": method, "trainable_params": n_train, "init_s": round(init_s, 3),
           "ppl_at_init": round(ppl_init, 4), "ppl_after": round(ppl_after, 4),
           "train_s": round(train_s, 2), "s_per_step": round(train_s / args.steps, 4),
           "first_loss": round(losses[0], 4), "last10_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4)}
    if method == "soka":
        row["rank_pattern"] = dict(model.peft_config["default"].rank_pattern)
    print(json.dumps({k: v for k, v in row.items() if k != "rank_pattern"}), flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora-r", type=int, default=4)
    p.add_argument("--soka-r-max", type=int, default=64)
    p.add_argument("--train-frac", type=float, default=0.7)
    p.add_argument("--max-windows", type=int, default=None,
                   help="Score only the first N eval windows (default: all).")
    p.add_argument("--methods", default="lora,pissa,soka")
    p.add_argument("--out", default="benchmarks/results/soka_vs_lora.json")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    base, tokenizer = _load_base()
    train_ids, eval_ids = split_tokens(tokenizer, args.train_frac)
    n_blocks = len(train_ids) // BLOCK
    train_blocks = train_ids[: n_blocks * BLOCK].view(n_blocks, BLOCK)  # [Nb, 256]
    ppl_base = _eval_ppl(base, eval_ids, args.max_windows)
    print(f"train tokens {len(train_ids)} ({n_blocks} blocks), eval tokens {len(eval_ids)}, "
          f"base ppl {ppl_base:.3f}", flush=True)
    del base

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows: list[dict] = []
    lora_params = None
    for method in ["lora"] + [m for m in methods if m != "lora"]:
        row = run_method(method, args, train_blocks, eval_ids, lora_params)
        if method == "lora":
            lora_params = row["trainable_params"]
        rows.append(row)
    for row in rows:
        row["params_vs_lora"] = round(row["trainable_params"] / lora_params, 4)
    result = {
        "benchmark": "soka_vs_lora",
        "command": "python -m benchmarks.soka_vs_lora " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"cpu ({platform.processor() or platform.machine()}, "
                  f"{torch.get_num_threads()} threads)",
        "versions": _versions(),
        "model": "petl/shakespeare-llama (embedded, native context 256)",
        "split": {"text": "heldout.txt (Hamlet, Twelfth Night, The Tempest)",
                  "train": f"first {args.train_frac:.0%} of the token stream, {n_blocks} blocks "
                           f"of {BLOCK}", "eval": f"last {1 - args.train_frac:.0%}, "
                                                   f"{len(eval_ids)} tokens, sliding ppl "
                                                   f"length {BLOCK} stride {BLOCK // 2}",
                  "train_tokens": int(len(train_ids)), "eval_tokens": int(len(eval_ids))},
        "settings": {"steps": args.steps, "batch": args.batch, "lr": args.lr,
                     "warmup": args.warmup, "schedule": "linear warmup + cosine to 0",
                     "optimizer": "AdamW, weight_decay 0", "seed": args.seed,
                     "targets": TARGETS, "lora_r": args.lora_r, "soka_r_max": args.soka_r_max,
                     "soka_param_budget": lora_params},
        "ppl_base": round(ppl_base, 4),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
