"""LAWCAT distillation: stage-1 attention transfer (loop and Trainer) and stage-2 LoRA with a
save/reload round trip, on tiny models."""
from __future__ import annotations

import torch

from petl.distill import (
    AttentionTransferTrainer,
    attention_transfer_loss,
    attention_transfer_mode,
    attention_transfer_step,
    prepare_attention_transfer,
    prepare_lora_finetune,
    set_attention_transfer,
)
from petl.linear import LawcatConfig, convert_to_lawcat, lawcat_parameters, load_lawcat, save_lawcat
from petl.testing import tiny_causal_lm


def _pair(arch="llama", layers=None, window=0):
    teacher = tiny_causal_lm(arch, attn_implementation="sdpa")
    student = tiny_causal_lm(arch, attn_implementation="sdpa")
    convert_to_lawcat(student, LawcatConfig(layers=layers, window_size=window))
    return teacher, student


def _capture_o_proj_input(model, layer=0):
    seen = []
    hook = model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].detach()))
    return seen, hook


def test_distill_mode_passes_teacher_output_and_reports_true_mse():
    teacher, student = _pair("qwen2")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t_seen, h1 = _capture_o_proj_input(teacher)
        ref_logits = teacher(ids, use_cache=False).logits
        s_seen, h2 = _capture_o_proj_input(student)
        student(ids, use_cache=False)
        h1.remove(), h2.remove()
        loss, per_layer = attention_transfer_loss(student, {"input_ids": ids})
        with attention_transfer_mode(student):
            distill_logits = student(ids, use_cache=False).logits
    # In distill mode the teacher's attention output flows on: the model is the teacher.
    torch.testing.assert_close(distill_logits, ref_logits, rtol=1e-5, atol=1e-5)
    # Layer 0 sees identical inputs in both runs, so its MSE is checkable by hand.
    torch.testing.assert_close(per_layer[0], (s_seen[0] - t_seen[0]).pow(2).mean(), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(loss, 1000 * torch.stack(list(per_layer.values())).mean())
    flags = lambda: [m.lawcat_distill for m in student.modules() if hasattr(m, "lawcat_distill")]  # noqa: E731
    assert all(flags())                       # left on, so a checkpointed backward recomputes alike
    set_attention_transfer(student, False)
    assert not any(flags())


def test_attention_transfer_with_gradient_checkpointing_matches():
    _, student = _pair("llama")
    prepare_attention_transfer(student)
    student.train()
    batch = {"input_ids": torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(5))}
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with attention_transfer_mode(student):
            loss, _ = attention_transfer_loss(student, batch)
            loss.backward()
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
        student.zero_grad()
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-8)


def test_attention_transfer_reduces_every_layer_mse():
    torch.manual_seed(0)
    _, student = _pair("llama", window=0)
    n = prepare_attention_transfer(student)
    assert n == sum(p.numel() for _, p in lawcat_parameters(student))
    assert all(not p.requires_grad for name, p in student.named_parameters() if "lawcat_" not in name)
    frozen = {k: v.clone() for k, v in student.state_dict().items() if "lawcat_" not in k}
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    batch = {"input_ids": torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(1))}
    first = attention_transfer_step(student, batch, opt)
    for _ in range(14):
        last = attention_transfer_step(student, batch, opt)
    assert last.loss < 0.5 * first.loss
    for i in first.per_layer:
        assert last.per_layer[i] < 0.7 * first.per_layer[i], (i, first.per_layer, last.per_layer)
    for k, v in student.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k


def test_attention_transfer_trainer_logs_per_layer(tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    _, student = _pair("mistral", layers=[1], window=2)
    data = Dataset.from_dict({"input_ids": torch.randint(0, 128, (8, 24)).tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
                             learning_rate=1e-2, logging_steps=2, report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer = AttentionTransferTrainer(model=student, args=args, train_dataset=data)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all("distill_mse/layer_1" in h for h in logs)
    assert abs(logs[0]["loss"] - 1000 * logs[0]["distill_mse/layer_1"]) < 1e-3 * logs[0]["loss"]
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lawcat_" in n for n in changed)


def test_stage2_lora_trains_saves_and_reloads(tmp_path):
    from peft import PeftModel

    _, student = _pair("qwen2", layers=[0], window=0)
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    save_lawcat(student, base_dir)
    model = prepare_lora_finetune(student, r=4, lora_alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("self_attn.q_proj" in n for n in trainable) and any("o_proj" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(5):
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < losses[0]
    model.save_pretrained(adapter_dir)
    model.eval()
    reloaded = PeftModel.from_pretrained(load_lawcat(base_dir), adapter_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=1e-6, atol=1e-6)
