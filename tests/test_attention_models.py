"""petl_s2 / petl_sf inside real (tiny) transformers models: train sparse, infer dense."""
from __future__ import annotations

import json

import pytest
import torch

from petl.attention import active_pattern, use_attention
from petl.testing import TINY_ARCHITECTURES, tiny_causal_lm

LENGTH = 64


def tokens(batch: int = 2, length: int = LENGTH, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def attention_grads(model: torch.nn.Module) -> list[torch.Tensor]:
    names = ("q_proj", "k_proj", "query_key_value")
    return [p.grad for n, p in model.named_parameters() if any(k in n for k in names) and p.grad is not None]


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_train_sparse_eval_dense(arch: str) -> None:
    model = tiny_causal_lm(arch, attn_implementation="sdpa", max_position_embeddings=256)
    x = tokens()
    with torch.no_grad():
        dense_eval = model.eval()(x).logits
        dense_train = model.train()(x).logits
    for pattern in ("s2", "sf"):
        use_attention(model, pattern)
        assert model.config._attn_implementation == f"petl_{pattern}"
        with torch.no_grad():
            assert torch.equal(model.eval()(x).logits, dense_eval), "eval mode must be exactly SDPA"
        out = model.train()(x, labels=x)
        out.loss.backward()
        assert not torch.allclose(out.logits, dense_train, atol=1e-4), "training must use the sparse pattern"
        grads = attention_grads(model)
        assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
        model.zero_grad()
    # one group spanning the sequence and no shifted head is plain causal attention
    use_attention(model, "s2", group_ratio=1.0, shift_head_fraction=0.0)
    with torch.no_grad():
        torch.testing.assert_close(model.train()(x).logits, dense_train, atol=1e-5, rtol=1e-5)
    use_attention(model, "full")
    assert model.config._attn_implementation == "sdpa" and not hasattr(model.config, "petl_attention")


@pytest.mark.parametrize("arch,pattern", [("llama", "sf"), ("gpt_neox", "s2"), ("qwen3", "sf")])
def test_packed_documents_equal_separate_runs(arch: str, pattern: str) -> None:
    """Documents packed in one row (position_ids restart) train exactly as if run alone.

    With a fixed group_size dividing the first document, groups line up, so the only thing
    keeping documents apart is the document rule (and sinks are per document).
    """
    model = tiny_causal_lm(arch, attn_implementation="sdpa", max_position_embeddings=256).train()
    use_attention(model, pattern, group_size=16)
    a, b = tokens(1, 32, seed=1), tokens(1, 40, seed=2)
    pos = torch.cat([torch.arange(32), torch.arange(40)])[None]
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), position_ids=pos, use_cache=False).logits
        torch.testing.assert_close(packed[:, :32], model(a).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed[:, 32:], model(b).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pattern,params", [("s2", {}), ("s2", {"cyclic": True}), ("sf", {})])
def test_padded_batch_equals_samples_alone(pattern: str, params: dict) -> None:
    """Right and left padding: each sample's segments come from its own valid length."""
    model = tiny_causal_lm("mistral", attn_implementation="sdpa", max_position_embeddings=256).train()
    use_attention(model, pattern, **params)
    a, b = tokens(1, 40, seed=3), tokens(1, 56, seed=4)
    with torch.no_grad():
        alone_a, alone_b = model(a).logits, model(b).logits
        right_mask = torch.ones(2, 56)
        right_mask[0, 40:] = 0
        right = model(torch.cat([torch.cat([a, torch.zeros(1, 16, dtype=torch.long)], 1), b]),
                      attention_mask=right_mask).logits
        left_mask = torch.cat([torch.zeros(1, 16), torch.ones(1, 40)], 1)
        left = model(torch.cat([torch.zeros(1, 16, dtype=torch.long), a], 1), attention_mask=left_mask,
                     position_ids=(left_mask.cumsum(-1) - 1).clamp(min=0).long()).logits
    torch.testing.assert_close(right[:1, :40], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(right[1:], alone_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left[:, 16:], alone_a, atol=1e-5, rtol=1e-5)


def test_generate_is_dense() -> None:
    model = tiny_causal_lm("llama", attn_implementation="sdpa", max_position_embeddings=256)
    prompt = tokens(1, 20)
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False)
    use_attention(model, "sf")
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_training_step(dtype: torch.dtype) -> None:
    model = tiny_causal_lm("qwen2", attn_implementation="sdpa", dtype=dtype, max_position_embeddings=256)
    use_attention(model, "sf")
    out = model.train()(tokens(), labels=tokens())
    out.loss.backward()
    assert out.logits.dtype == dtype and torch.isfinite(out.loss)
    assert all(torch.isfinite(g.float()).all() for g in attention_grads(model))


def test_from_config_name_and_errors() -> None:
    model = tiny_causal_lm("llama", attn_implementation="petl_s2", max_position_embeddings=256)
    assert active_pattern(model).group_ratio == 0.25  # defaults without use_attention
    with pytest.raises(ValueError, match="unknown attention pattern 'dense'"):
        use_attention(model, "dense")
    with pytest.raises(ValueError, match="group_size must be an even int"):
        use_attention(model, "s2", group_size=5)
    with pytest.raises(ValueError, match="pattern 'full' takes no parameters"):
        use_attention(model, "full", n_sink=4)
    with pytest.raises(TypeError, match="needs a transformers PreTrainedModel"):
        use_attention(torch.nn.Linear(2, 2), "s2")
    use_attention(model, "sf", n_sink=2)
    model.set_attn_implementation("petl_s2")  # mismatch between stored parameters and function
    with pytest.raises(ValueError, match="holds 'sf' parameters but the model runs petl_s2"):
        model.train()(tokens())
    use_attention(model, "s2")
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    with pytest.raises(ValueError, match="does not implement attention dropout"):
        model.train()(tokens())


@pytest.mark.parametrize("pattern", ["s2", "sf"])
def test_train_sparse_reload_stock_and_generate(tmp_path, pattern: str) -> None:
    """Train LoRA with the pattern, save, reload with plain transformers + peft, generate."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = tiny_causal_lm("llama", attn_implementation="sdpa", max_position_embeddings=256)
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    use_attention(model, pattern)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = tokens()
    model.train()
    losses = []
    for _ in range(4):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = model.eval()(x).logits

    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(stock, tmp_path / "adapter").eval()
    assert reloaded.config._attn_implementation == "sdpa"
    assert "petl" not in json.dumps(json.loads((tmp_path / "adapter" / "adapter_config.json").read_text()))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, expected, atol=1e-5, rtol=1e-5)
    out = reloaded.generate(x[:1, :8], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 13)
