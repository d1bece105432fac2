"""petl inside your own Hugging Face Trainer script.

Everything `petl finetune` does is a library call you can make yourself. This script extends
petl's embedded Llama (native 256 tokens) to 1024 tokens with:
  * petl.extend_context      - linear RoPE interpolation (LongLoRA's position interpolation)
  * petl.adapters.lora       - peft LoRA + LongLoRA's trainable embeddings and norms ("LoRA+")
  * petl.attention           - S2-Attn while training; full attention at evaluation/generation
  * petl.data                - packing text into 1024-token blocks with document boundaries
  * petl.eval.perplexity     - held-out perplexity by context length

Run (CPU, about a minute):  python examples/own_trainer.py --max-steps 20
Swap in your own model with --model (hub id or folder) and your own text with --train-file.
"""
from __future__ import annotations

import argparse

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import petl
from petl.adapters.lora import LORA_PLUS_MODULES, lora_config
from petl.attention import use_attention
from petl.data import DataCollatorForCausalLM, load_text_dataset, pack_for_causal_lm
from petl.embedded import embedded_model_path, heldout_text_path, train_text_path
from petl.eval import load_eval_tokens, perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(embedded_model_path()))
    parser.add_argument("--train-file", default=str(train_text_path()))
    parser.add_argument("--eval-file", default=str(heldout_text_path()))
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--max-windows", type=int, default=8, help="evaluation windows per length")
    parser.add_argument("--output-dir", default="runs/own_trainer")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, use_safetensors=True)
    petl.extend_context(model, args.context, method="linear")
    use_attention(model, "s2", group_ratio=0.25)          # sparse while training, dense in eval mode
    model = get_peft_model(model, lora_config(r=8, alpha=16, trainable_modules=LORA_PLUS_MODULES,
                                              tie_embeddings=model.config.tie_word_embeddings))
    model.print_trainable_parameters()

    blocks = pack_for_causal_lm(load_text_dataset(args.train_file), tokenizer, block_size=args.context)
    model.config.use_cache = False                         # keep packed documents apart while training
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=2,
                               learning_rate=2e-3, warmup_steps=2, logging_steps=5, report_to="none",
                               remove_unused_columns=False, save_strategy="no", use_cpu=not torch.cuda.is_available()),
        train_dataset=blocks,
        data_collator=DataCollatorForCausalLM(tokenizer),
    )
    trainer.train()
    model.save_pretrained(f"{args.output_dir}/adapter")

    tokens = load_eval_tokens(args.eval_file, tokenizer)
    result = perplexity(model, tokens, lengths=[256, args.context], max_windows=args.max_windows)
    for length, row in result.items():
        print(f"held-out perplexity at {length} tokens: {row['ppl']:.2f}")


if __name__ == "__main__":
    main()
