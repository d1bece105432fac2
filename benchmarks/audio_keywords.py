"""Offline PETL-AST experiment: pretrain a small AST on 20 spoken words, adapt it to 10 unseen words.

    apt-get install espeak-ng
    python -m benchmarks.audio_keywords              # CPU, a few minutes; writes benchmarks/results/audio_keywords.json

1. ``tools/make_keyword_audio.py`` synthesises the keyword set with espeak-ng (deterministic; not
   shipped, regenerated into ``--work``/data).
2. A 3-layer AST (width 64, 128 mel x 100 frames) is trained from scratch on the 20 pretraining
   words (full training, best validation epoch kept) and saved: the stand-in for AudioSet's AST.
3. Every PETL-AST method adapts it to the 10 held-out words through the real recipe
   ``audio/keywords-conformer`` (the method swapped by overrides; mean pooling, as in
   pretraining), with best-on-validation selection and test accuracy on speakers (voice variants)
   unseen in training. Baselines: full fine-tuning of the pretrained AST, and the same AST trained
   from scratch on the adaptation data.

Every row records test / validation accuracy and trainable parameters; the JSON also records the
data manifest digest, versions and the command.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "audio_keywords.json"
RECIPE = "audio/keywords-conformer"
FRAMES = 100
TINY_AST = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128, max_length=FRAMES)

#: method -> (adapter.options, learning rate). The paper's learning rates; widths scaled to D=64
#: (bottleneck / Conformer / ConvPass width 8 = RR 8, LoRA rank 4 = RR 16, 8 prompt / prefix tokens).
METHODS = {
    "linear_probe": ({"method": "linear_probe"}, 1e-3),
    "bitfit": ({"method": "bitfit"}, 5e-3),
    "lora": ({"method": "lora", "reduction_rate": 16, "lora_alpha": 8}, 5e-3),
    "prefix": ({"method": "prefix", "num_tokens": 8}, 1e-2),
    "prompt_shallow": ({"method": "prompt", "num_tokens": 8, "deep": False}, 1e-2),
    "prompt_deep": ({"method": "prompt", "num_tokens": 8, "deep": True}, 1e-2),
    "bottleneck_pfeiffer": ({"method": "bottleneck", "reduction_rate": 8}, 5e-3),
    "bottleneck_houlsby": ({"method": "bottleneck", "adapter_type": "houlsby", "reduction_rate": 8}, 5e-3),
    "bottleneck_sequential": ({"method": "bottleneck", "placement": "sequential", "position": "after",
                               "reduction_rate": 8}, 5e-3),
    "conformer_pfeiffer": ({"method": "conformer", "reduction_rate": 8, "kernel_size": 31}, 5e-3),
    "convpass": ({"method": "convpass", "reduction_rate": 8}, 5e-3),
}


def make_data(work: Path) -> dict:
    spec = importlib.util.spec_from_file_location("make_keyword_audio", ROOT / "tools" / "make_keyword_audio.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data = work / "data"
    if not (data / "manifest.json").is_file():
        print(f"[keywords] synthesising the data set into {data} (espeak-ng) ...", flush=True)
        module.generate(data, seed=0)
    return json.loads((data / "manifest.json").read_text())


def featurize(folder: Path):
    """{split: (features [N, frames, mel], labels [N])} and the label names of a folder corpus."""
    from petl.audio.clips import ClipDataset, collate_clips
    from petl.audio.datasets import load_corpus
    from petl.audio.features import AstFeaturizer

    corpus = load_corpus("folder", str(folder))
    featurizer = AstFeaturizer(max_frames=FRAMES)
    out = {}
    for split in ("train", "validation", "test"):
        clips = ClipDataset([e for e in corpus.examples if e.group == split], featurizer)
        batch = collate_clips([clips[i] for i in range(len(clips))])
        out[split] = (batch["input_values"], batch["labels"])
    return out, corpus.label_names


def mean_pooled_logits(model, x: torch.Tensor) -> torch.Tensor:
    """The head on the mean of all output tokens (the pooling every PETL-AST run here uses)."""
    return model.classifier(model.audio_spectrogram_transformer(input_values=x).last_hidden_state.mean(1))


def accuracy(model, feats, labels, batch: int = 128) -> float:
    model.eval()
    with torch.no_grad():
        preds = torch.cat([mean_pooled_logits(model, feats[i:i + batch]).argmax(-1)
                           for i in range(0, len(feats), batch)])
    return float((preds == labels).float().mean())


def train_full(model, data, epochs: int, lr: float, batch: int = 32, seed: int = 0) -> dict:
    """Train every parameter (AdamW, 1 warm-up epoch + cosine, clipping, SpecAugment, mean pooling);
    keep the weights of the best validation epoch."""
    from petl.audio.augment import SpecAugment

    torch.manual_seed(seed)
    feats, labels = data["train"]
    per_epoch = math.ceil(len(feats) / batch)
    steps = epochs * per_epoch
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.05}, {"params": vectors, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / per_epoch) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    augment = SpecAugment(freq_mask=12, time_mask=10)
    best = (-1.0, None, 0)
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(feats)).split(batch):
            x = torch.stack([augment(f) for f in feats[idx]])
            loss = torch.nn.functional.cross_entropy(mean_pooled_logits(model, x), labels[idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
        val = accuracy(model, *data["validation"])
        print(f"[keywords]   epoch {epoch + 1}/{epochs}: validation accuracy {val:.3f}", flush=True)
        if val > best[0]:
            best = (val, copy.deepcopy(model.state_dict()), epoch + 1)
    model.load_state_dict(best[1])
    return {"validation_accuracy": best[0], "test_accuracy": accuracy(model, *data["test"]), "best_epoch": best[2],
            "trainable_parameters": sum(p.numel() for p in model.parameters()),
            "total_parameters": sum(p.numel() for p in model.parameters())}


def tiny_ast(labels: list[str], seed: int):
    """A fresh small AST. CLS / distillation / positional embeddings start at N(0, 0.02) rather than
    transformers' zeros (all-zero tokens make the first LayerNorm's gradient explode), and the
    LayerNorm eps is 1e-6 (AST's 1e-12 is fine for a trained model, not for one starting from scratch)."""
    from transformers import ASTConfig, ASTForAudioClassification

    torch.manual_seed(seed)
    config = ASTConfig(**TINY_AST, layer_norm_eps=1e-6, num_labels=len(labels), id2label=dict(enumerate(labels)),
                       label2id={n: i for i, n in enumerate(labels)})
    model = ASTForAudioClassification(config)
    embeddings = model.audio_spectrogram_transformer.embeddings
    with torch.no_grad():
        for table in (embeddings.cls_token, embeddings.distillation_token, embeddings.position_embeddings):
            table.normal_(0.0, 0.02)
    return model


def pretrain(work: Path, epochs: int) -> dict:
    target = work / "pretrained-ast"
    info = target / "pretraining.json"
    if info.is_file():
        return json.loads(info.read_text())
    data, labels = featurize(work / "data" / "pretrain")
    model = tiny_ast(labels, seed=0)
    start = time.time()
    result = train_full(model, data, epochs=epochs, lr=1e-3)
    result["seconds"] = round(time.time() - start, 1)
    model.save_pretrained(str(target))
    info.write_text(json.dumps(result, indent=2))
    return result


def adapt(work: Path, method: str, epochs: int) -> dict:
    from petl.train.recipe_io import load_recipe
    from petl.train.runner import run_recipe

    options, lr = METHODS[method]
    overrides = [f"model.name={work / 'pretrained-ast'}", f"audio.source={work / 'data' / 'adapt'}",
                 f"adapter.options={json.dumps(options)}", f"train.lr={lr}", f"audio.epochs={epochs}",
                 f"output.dir={work / 'adapt' / method}", "output.overwrite=true", "train.logging_steps=50"]
    start = time.time()
    metrics = run_recipe(load_recipe(RECIPE, overrides))
    run = metrics["runs"][0]
    return {"test_accuracy": run["test_accuracy"], "validation_accuracy": run["validation_accuracy"],
            "selected_step": run["selected_step"], "trainable_parameters": run["trainable_parameters"],
            "total_parameters": run["total_parameters"], "lr": lr, "options": options,
            "seconds": round(time.time() - start, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "keywords", help="data, models and runs")
    parser.add_argument("--pretrain-epochs", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=15, help="adaptation epochs per method")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscribing a shared CPU)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    manifest = make_data(args.work)
    pre = pretrain(args.work, args.pretrain_epochs)
    print(f"[keywords] pretrained AST: test accuracy {pre['test_accuracy']:.3f} on the 20 pretraining words",
          flush=True)
    rows = []
    for method in args.methods:
        row = {"method": method, **adapt(args.work, method, args.epochs)}
        rows.append(row)
        print(f"[keywords] {method:>22}: test {row['test_accuracy']:.3f}  val {row['validation_accuracy']:.3f}  "
              f"trainable {row['trainable_parameters']:,}", flush=True)
    data, labels = featurize(args.work / "data" / "adapt")
    from transformers import ASTForAudioClassification

    full = ASTForAudioClassification.from_pretrained(str(args.work / "pretrained-ast"), num_labels=len(labels),
                                                     ignore_mismatched_sizes=True)
    rows.append({"method": "full_finetune (baseline)", "lr": 5e-4, **train_full(full, data, args.epochs, lr=5e-4)})
    rows.append({"method": "from_scratch (baseline)", "lr": 1e-3,
                 **train_full(tiny_ast(labels, seed=1), data, args.epochs, lr=1e-3)})
    for row in rows[-2:]:
        print(f"[keywords] {row['method']:>22}: test {row['test_accuracy']:.3f}", flush=True)
    for row in rows:
        row["trainable_percent"] = round(100 * row["trainable_parameters"] / row["total_parameters"], 3)
    import peft
    import transformers

    result = {
        "benchmark": "audio_keywords",
        "command": " ".join(["python -m benchmarks.audio_keywords", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.date.today().isoformat(), "device": f"CPU ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads)", "gpu": None,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "python": platform.python_version(), "espeak_ng": manifest["espeak_ng"]},
        "data": {k: manifest[k] for k in ("seed", "clips", "digest", "sizes", "pretrain_words", "adapt_words")},
        "model": {**TINY_AST, "num_mel_bins": 128, "patch_size": 16, "stride": 10},
        "recipe": RECIPE, "adapt_epochs": args.epochs, "pretraining": pre,
        "rows": rows,
        "notes": "test accuracy on 160 clips (16 per word) spoken by espeak-ng voice variants absent from the "
                 "adaptation training and validation data; one seed, binomial standard error ~4 points. PETL rows "
                 "run the recipe (AdamW 0.9/0.98, eps 1e-6, wd 0.1, cosine, batch 16, mean pooling, best "
                 "validation epoch); the two baselines train every parameter with the pretraining loop (AdamW, "
                 "wd 0.05 on matrices, 1 warm-up epoch + cosine, clipping 1.0, SpecAugment 12/10, batch 32).",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"[keywords] wrote {args.out}")


if __name__ == "__main__":
    main()
