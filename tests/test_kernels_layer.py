"""The self-checkpointing fused decoder layer (petl.kernels.lora_layer, fuse_lora(layer_checkpoint=...)).

CPU, float64, PyTorch element-wise ops (``triton=False``) so no interpreter is needed: a tiny
Llama / Mistral / Qwen2 with peft LoRA on all seven projections and gradient checkpointing on.
Loss and every trainable gradient of the one-Function layer are compared with the unfused peft
model and with fuse_lora's per-module path. Tolerance: transformers' RMSNorm normalises in float32
even in a float64 model, and the layer's hand-derived norm backward does not replay autograd's op
order, so the paths agree to float32 rounding (rtol 1e-5 on gradients, 1e-7 on the loss); a wrong
term changes gradients by O(1). One test runs the layer with the Triton kernels in Triton's
interpreter, in a child pytest (tests/interpreter_child.py) so TRITON_INTERPRET does not leak into
other test modules.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from petl.kernels import fuse_lora, is_fused, unfuse_lora
from petl.kernels.lora_layer import DecoderLayerFunction, FusedDecoderLayer
from petl.testing import tiny_causal_lm
from tests.interpreter_child import HAS_TRITON, child_only, in_child, run_child_pytest

F64 = torch.float64
CHILD_ENV = "PETL_LAYER_KERNELS_CHILD"
IN_CHILD = in_child(CHILD_ENV)
TINY = dict(vocab_size=96, hidden_size=48, num_heads=4, num_kv_heads=2)


def _tiny_peft(arch: str, lora_plus: bool = False, dropout: float = 0.0, num_layers: int = 2, **config):
    from peft import LoraConfig, get_peft_model

    model = tiny_causal_lm(arch, dtype=F64, attn_implementation="sdpa", num_layers=num_layers,
                           **{**TINY, **config}).train()
    extra = {"modules_to_save": ["embed_tokens", "norm"]} if lora_plus else {}
    cfg = LoraConfig(r=4, lora_alpha=9, target_modules="all-linear", init_lora_weights=False, lora_dropout=dropout,
                     **extra)
    model = get_peft_model(model, cfg)
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _loss_and_grads(model, ids, labels, mask=None):
    logits = model(input_ids=ids, attention_mask=mask).logits
    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())  # float64
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _assert_close(a: dict, b: dict, rtol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        scale = b[key].abs().max().item() + 1e-30
        assert (a[key] - b[key]).abs().max().item() <= rtol * scale, key


@pytest.fixture(autouse=True)
def _fresh_warn_once(monkeypatch):
    """warn_once remembers messages process-wide: give each test its own memory and leave the global one as it was."""
    from petl.kernels import lora_modules

    monkeypatch.setattr(lora_modules, "_WARNED", set())


class _Calls:
    """Counts DecoderLayerFunction forwards (to prove which path ran)."""

    def __enter__(self):
        self.n, self._orig = 0, DecoderLayerFunction.forward

        def counted(ctx, *args):
            self.n += 1
            return self._orig(ctx, *args)

        DecoderLayerFunction.forward = staticmethod(counted)
        return self

    def __exit__(self, *exc):
        DecoderLayerFunction.forward = staticmethod(self._orig)


@pytest.mark.parametrize("arch,lora_plus,padded", [("llama", False, False), ("llama", True, True),
                                                   ("mistral", False, True), ("qwen2", True, False)])
def test_layer_matches_peft_and_per_module_path(arch, lora_plus, padded):
    torch.manual_seed(0)
    model = _tiny_peft(arch, lora_plus)  # GQA: 4 query heads, 2 kv heads
    ids = torch.randint(0, 96, (2, 13))
    labels = ids.clone()
    mask = None
    if padded:  # left padding on row 1
        mask = torch.ones_like(ids)
        mask[1, :4] = 0
        labels[1, :4] = -100
    keys = list(model.state_dict())
    ref_loss, ref_grads = _loss_and_grads(model, ids, labels, mask)
    fuse_lora(model, kernels="on", triton=False, fused_loss=False, layer_checkpoint=False)
    mod_loss, mod_grads = _loss_and_grads(model, ids, labels, mask)
    fuse_lora(model, kernels="on", triton=False, fused_loss=False)  # layer_checkpoint="auto": on under GC
    with _Calls() as calls:
        loss, grads = _loss_and_grads(model, ids, labels, mask)
    assert calls.n == 2  # one Function per layer, no second (transformers) checkpoint around it
    assert list(model.state_dict()) == keys and is_fused(model)
    assert any("lora_A" in k for k in grads) and (not lora_plus or any("norm" in k for k in grads))
    for other_loss, other in ((ref_loss, ref_grads), (mod_loss, mod_grads)):
        torch.testing.assert_close(loss, other_loss, rtol=1e-7, atol=0)
        _assert_close(grads, other)
    unfuse_lora(model)
    layer = model.base_model.model.model.layers[0]
    assert not is_fused(model) and type(layer).__module__.startswith("transformers.")
    assert layer.gradient_checkpointing is True  # transformers' flag is back on the plain layer


def test_layer_checkpoint_modes_and_transformers_flag():
    torch.manual_seed(1)
    model = _tiny_peft("llama")
    ids = torch.randint(0, 96, (1, 9))
    fuse_lora(model, kernels="on", triton=False, fused_loss=False)
    layer = model.base_model.model.model.layers[0]
    assert isinstance(layer, FusedDecoderLayer) and type(layer).__name__ == "LlamaDecoderLayer"
    assert layer.gradient_checkpointing is False and layer._petl_gc is True
    base = model.base_model.model  # transformers' is_activation_checkpointing rule (DDP's find_unused reads it)
    assert any(getattr(m, "gradient_checkpointing", False) for m in base.modules())
    model.base_model.model.gradient_checkpointing_disable()
    assert layer._petl_gc is False
    with _Calls() as calls:  # auto without gradient checkpointing: the per-module path
        _loss_and_grads(model, ids, ids)
    assert calls.n == 0
    fuse_lora(model, kernels="on", triton=False, fused_loss=False, layer_checkpoint=True)
    with _Calls() as calls:
        _loss_and_grads(model, ids, ids)
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)  # no gradients: never the Function
    assert calls.n == 2
    with pytest.raises(ValueError, match="layer_checkpoint='yes' is not one of True, False, 'auto'"):
        fuse_lora(model, layer_checkpoint="yes")


@pytest.mark.parametrize("dropout, message", [
    (dict(dropout=0.1), "LoRA dropout 0.1 has no fused kernel"),
    (dict(attention_dropout=0.2), "attention dropout 0.2 cannot be recomputed"),
], ids=["lora-dropout", "attention-dropout"])
def test_dropout_falls_back_with_one_warning(dropout, message):
    torch.manual_seed(2)
    model = _tiny_peft("llama", **dropout)
    ids = torch.randint(0, 96, (1, 8))
    fuse_lora(model, kernels="on", triton=False, fused_loss=False)
    with _Calls() as calls, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _loss_and_grads(model, ids, ids)
    assert calls.n == 0
    assert any(message in str(w.message) for w in caught)


def test_save_load_merge_after_layer_training_step(tmp_path):
    from tests.test_kernels_lora import check_save_load_merge

    torch.manual_seed(4)
    model = fuse_lora(_tiny_peft("llama", lora_plus=True), kernels="on", triton=False)
    ids = torch.randint(0, 96, (1, 10))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    check_save_load_merge(model, ids, tmp_path)


@pytest.mark.skipif(IN_CHILD or not HAS_TRITON, reason="parent of the interpreter run / no triton")
def test_layer_under_triton_interpreter():
    run_child_pytest(__file__, CHILD_ENV, min_passed=1, timeout=300, keyword="interpreted")


@child_only(CHILD_ENV)
def test_layer_with_triton_kernels_interpreted():
    """The layer Function with the Triton RMSNorm / RoPE / SwiGLU kernels (in the interpreter)."""
    torch.manual_seed(5)
    model = _tiny_peft("llama", lora_plus=True)
    ids = torch.randint(0, 96, (2, 11))
    ref_loss, ref_grads = _loss_and_grads(model, ids, ids)
    fuse_lora(model, kernels="on", fused_loss=False)
    loss, grads = _loss_and_grads(model, ids, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-7, atol=0)
    _assert_close(grads, ref_grads)


def test_hf_trainer_gradient_checkpointing_runs_the_layer_function(tmp_path):
    """The user's order: fuse_lora on the peft model, then HF Trainer with gradient_checkpointing=True
    (Trainer enables it, with its own kwargs). The layer Function runs, and three AdamW steps leave
    the same trainable weights as the unfused model trained by the same Trainer settings."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    def peft_model():
        torch.manual_seed(7)
        base = tiny_causal_lm("llama", dtype=F64, attn_implementation="sdpa", num_layers=2, **TINY).train()
        return get_peft_model(base, LoraConfig(r=4, lora_alpha=9, target_modules="all-linear",
                                               init_lora_weights=False))

    gen = torch.Generator().manual_seed(8)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 96, (6, 12), generator=gen)]

    def train(model, out):
        args = TrainingArguments(output_dir=str(tmp_path / out), max_steps=3, per_device_train_batch_size=2,
                                 learning_rate=1e-2, gradient_checkpointing=True, logging_steps=1, report_to="none",
                                 save_strategy="no", use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0)
        Trainer(model=model, args=args, train_dataset=rows).train()
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    ref = train(peft_model(), "ref")
    fused = fuse_lora(peft_model(), kernels="on", triton=False, fused_loss=False)
    with _Calls() as calls:
        got = train(fused, "fused")
    assert calls.n == 3 * 2  # every step, every layer
    _assert_close(got, ref, rtol=1e-6)
    assert any((got[k] - v).abs().max() > 0 for k, v in peft_model().named_parameters() if k in got)  # it trained


def test_layer_with_s2_attention_matches_peft():
    """The registered petl attention (S2, shifted groups) runs inside the layer Function unchanged."""
    from petl.attention import use_attention

    torch.manual_seed(6)
    model = use_attention(_tiny_peft("llama"), "s2", group_size=4)
    ids = torch.randint(0, 96, (2, 16))
    ref_loss, ref_grads = _loss_and_grads(model, ids, ids)
    fuse_lora(model, kernels="on", triton=False, fused_loss=False)
    with _Calls() as calls:
        loss, grads = _loss_and_grads(model, ids, ids)
    assert calls.n == 2
    torch.testing.assert_close(loss, ref_loss, rtol=1e-7, atol=0)
    _assert_close(grads, ref_grads)
    use_attention(model, "full")
    full_loss, _ = _loss_and_grads(model, ids, ids)
    assert abs(full_loss.item() - loss.item()) > 1e-6  # S2 really changed the attention


# ----------------------------------------------------------------------------------------- GPU, bf16


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def _bf16_layer_vs_references(device: str, triton: bool | None) -> None:
    """Tolerance rule: the layer's bf16 error against the float64 peft model is at most twice peft's own bf16 error
    (plus 1e-6 for exact cases), for the loss and every LoRA gradient; random upstream gradient on the logits."""
    import copy

    torch.manual_seed(0)
    model = tiny_causal_lm("llama", attn_implementation="sdpa", num_layers=2, vocab_size=512, hidden_size=256,
                           num_heads=4, num_kv_heads=2).to(device).train()
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(0, 512, (2, 257), device=device)
    weights = torch.randn(2, 257, 512, device=device)

    def run(dtype, fused):
        m = copy.deepcopy(model).to(dtype)
        m.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if fused:
            fuse_lora(m, kernels="on", triton=triton, fused_loss=False)
        with _Calls() as calls:
            loss = (m(input_ids=ids).logits.double() * weights.double()).sum() / ids.numel()
            loss.backward()
        assert calls.n == (2 if fused else 0)
        return [loss.detach()] + [p.grad for n, p in sorted(m.named_parameters()) if p.requires_grad]

    layer, plain, ref = run(torch.bfloat16, True), run(torch.bfloat16, False), run(F64, False)
    assert len(layer) == 1 + 2 * 7 * 2
    for i, (a, t, r) in enumerate(zip(layer, plain, ref)):
        assert _rel(a, r) <= 2 * _rel(t, r) + 1e-6, f"[{i}]: layer {_rel(a, r):.2e}, peft bf16 {_rel(t, r):.2e}"


@pytest.mark.gpu
def test_gpu_layer_bf16_triton():
    _bf16_layer_vs_references("cuda", None)
