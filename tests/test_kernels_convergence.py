"""Convergence on a mini Llama: 30 AdamW steps with petl's fused kernels on and off (GPU).

Both runs start from the same weights, LoRA factors (peft LoRA r=8 on every linear layer plus
LoRA+ trainable embeddings and norms) and batches, and must give the same per-step losses:

* float32: the fused path differs from peft only in summation order, so losses agree to 1e-4
  relative over all 30 steps;
* bfloat16: rounding differs (the kernels round once where PyTorch rounds per op), so the
  trajectories drift apart slowly; losses agree to 2e-2 relative (Liger's bf16 convergence tests
  use 1e-2 / 5e-2), and both runs must actually learn (last loss < 0.85 x first).
"""
from __future__ import annotations

import pytest
import torch

STEPS = 30


def _train(dtype: torch.dtype, kernels: str) -> list[float]:
    from peft import LoraConfig, get_peft_model

    from petl.kernels import fuse_lora
    from petl.testing import tiny_causal_lm

    model = tiny_causal_lm("llama", seed=0, attn_implementation="sdpa", dtype=dtype, vocab_size=256,
                           hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2).cuda().train()
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                             modules_to_save=["embed_tokens", "norm"], init_lora_weights=True))
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layer in model.base_model.model.model.layers[:2]:  # half the layers run without checkpointing
        layer.gradient_checkpointing = False
    fuse_lora(model, kernels=kernels)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    gen = torch.Generator().manual_seed(3)
    # learnable data: tokens come from a fixed subset of 16 ids, so the loss falls quickly
    vocab = torch.randperm(256, generator=gen)[:16]
    losses = []
    for step in range(STEPS):
        ids = vocab[torch.randint(0, 16, (4, 128), generator=gen)].cuda()
        labels = ids.clone()
        labels[:, :3] = -100
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_fused_training_matches_unfused(dtype, rtol):
    fused, plain = _train(dtype, "on"), _train(dtype, "off")
    for step, (a, b) in enumerate(zip(fused, plain)):
        assert abs(a - b) <= rtol * abs(b), f"step {step}: fused {a:.5f} vs unfused {b:.5f}"
    assert fused[-1] < 0.85 * fused[0] and plain[-1] < 0.85 * plain[0]
