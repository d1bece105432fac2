"""LAWCAT on tiny Llama / Mistral / Qwen2 models: conversion, the three computation forms through
the real model (full forward vs chunked vs token-by-token decoding with the Cache API),
``generate``, padding, constant decode state, and save/reload."""
from __future__ import annotations

import inspect

import pytest
import torch

from petl.linear import (
    LawcatAttention,
    LawcatCache,
    LawcatCacheLayer,
    LawcatConfig,
    convert_to_lawcat,
    get_lawcat_config,
    lawcat_layers,
    load_lawcat,
    naive_recurrent_lawcat,
    save_lawcat,
)
from petl.linear.attention import apply_rope, key_padding
from petl.linear.ops import ENV_VAR
from petl.testing import tiny_causal_lm

ARCHS = ["llama", "mistral", "qwen2"]


def _cache_kw(model) -> str:
    """transformers 5.24 calls the cache argument `cache`, 5.17 `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _randomise(model, seed=0):
    """Move LAWCAT parameters off their near-identity init so every piece matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lawcat_" in name:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)


def _model(arch="llama", window=0, layers=None, seed=0, **cfg):
    model = tiny_causal_lm(arch, dtype=torch.float64, attn_implementation="sdpa", seed=seed)
    convert_to_lawcat(model, LawcatConfig(window_size=window, layers=layers, **cfg))
    _randomise(model, seed)
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_conversion_all_and_subset(arch):
    model = tiny_causal_lm(arch)
    q_weight = model.model.layers[1].self_attn.q_proj.weight
    convert_to_lawcat(model, LawcatConfig(layers=[1]))
    assert lawcat_layers(model) == [1]
    assert not isinstance(model.model.layers[0].self_attn, LawcatAttention)
    attn = model.model.layers[1].self_attn
    assert attn.q_proj.weight is q_weight                      # shared, not copied
    assert attn.num_heads == 4 and attn.num_kv_heads == 2 and attn.feature_size == attn.head_dim
    convert_to_lawcat(model)
    assert lawcat_layers(model) == [0, 1]
    assert get_lawcat_config(model).layers == [0, 1]
    with pytest.raises(ValueError, match="layers"):
        convert_to_lawcat(tiny_causal_lm(arch), LawcatConfig(layers=[5]))


@pytest.mark.parametrize("arch,window", [("llama", 0), ("mistral", 3), ("qwen2", 0), ("qwen2", 4)])
def test_module_matches_reference_maths(arch, window):
    """The model's LAWCAT layer computes naive_recurrent_lawcat on its own q/k/v/gates."""
    model = _model(arch, window=window, layers=[0])
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 13, 64, dtype=torch.float64)
    pos = torch.arange(13)[None].expand(2, -1)
    cos, sin = model.model.rotary_emb(x, pos)
    out, _ = attn(x, position_embeddings=(cos, sin))
    B, T, H, d, G = 2, 13, attn.num_heads, attn.head_dim, attn.num_key_value_groups
    q = attn.q_proj(x).view(B, T, H, d)
    k = attn.k_proj(x).view(B, T, -1, d).repeat_interleave(G, 2)
    v = attn.v_proj(x).view(B, T, -1, d).repeat_interleave(G, 2)
    qc, _ = attn.lawcat_conv_q(q.reshape(B, T, -1))
    kc, _ = attn.lawcat_conv_k(k.reshape(B, T, -1))
    fm_k = attn.lawcat_feature_map_k or attn.lawcat_feature_map_q
    phi_q, phi_k = attn.lawcat_feature_map_q(qc.view(B, T, H, d)), fm_k(kc.view(B, T, H, d))
    g = attn.lawcat_gate(x).repeat_interleave(G, 2)
    kw = {}
    if window:
        kw = dict(window=window, q_rope=apply_rope(q, cos, sin), k_rope=apply_rope(k, cos, sin),
                  window_factor=torch.sigmoid(attn.lawcat_window_factor), scale=attn.scaling)
    o = naive_recurrent_lawcat(phi_q, phi_k, v, g, **kw)
    torch.testing.assert_close(out, attn.o_proj(o.reshape(B, T, -1)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [0, 3])
def test_reference_chunked_and_decoding_agree(window, monkeypatch):
    """Full forward (reference loop) == chunked form == prefill + token-by-token decoding; and
    gradients of reference and chunked forms agree. T=21 is not a multiple of the chunk (8)."""
    model = _model("llama", window=window, chunk_size=8)
    ids = torch.randint(0, 128, (2, 21), generator=torch.Generator().manual_seed(0))
    monkeypatch.setenv(ENV_VAR, "reference")
    ref = model(ids, use_cache=False).logits
    ref.sum().backward()
    grads_ref = {n: p.grad.clone() for n, p in model.named_parameters() if "lawcat_" in n}
    model.zero_grad()
    monkeypatch.setenv(ENV_VAR, "chunked")
    chunked = model(ids, use_cache=False).logits
    chunked.sum().backward()
    torch.testing.assert_close(chunked, ref, rtol=1e-10, atol=1e-10)
    for n, p in model.named_parameters():
        if "lawcat_" in n:
            torch.testing.assert_close(p.grad, grads_ref[n], rtol=1e-8, atol=1e-10, msg=n)
    kw = _cache_kw(model)
    with torch.no_grad():
        out = model(ids[:, :10], use_cache=True)          # chunked prefill of 10 tokens
        cache, steps = getattr(out, kw, None) or out.past_key_values, [out.logits]
        for t in range(10, 21):
            out = model(ids[:, t:t + 1], use_cache=True, **{kw: cache})
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), ref.detach(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("arch,layers,window", [("llama", None, 0), ("mistral", [1], 2), ("qwen2", [0], 0)])
def test_generate_matches_full_forward_greedy(arch, layers, window):
    model = _model(arch, window=window, layers=layers)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                             do_sample=False, pad_token_id=0)
        seq = ids
        for _ in range(10):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(gen, seq)


def test_generate_with_explicit_lawcat_cache_and_constant_state():
    model = _model("qwen2", window=3, layers=[0])
    cache = LawcatCache.from_model(model)
    assert isinstance(cache.layers[0], LawcatCacheLayer) and not isinstance(cache.layers[1], LawcatCacheLayer)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(2))
    kw = _cache_kw(model)
    sizes = []
    with torch.no_grad():
        out = model(ids, use_cache=True, **{kw: cache})
        for t in range(40):
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(nxt, use_cache=True, **{kw: cache})
            sizes.append(cache.lawcat_state_nbytes())
    assert cache.get_seq_length() == 48
    assert len(set(sizes)) == 1 and sizes[0] > 0                 # constant while the sequence grows
    assert cache.layers[1].get_seq_length() == 48                 # the softmax layer's KV grows
    with pytest.raises(RuntimeError, match="LAWCAT"):
        cache.layers[0].update(torch.zeros(1), torch.zeros(1))


@pytest.mark.parametrize("window", [0, 3])
def test_left_padding_matches_unpadded(window):
    model = _model("llama", window=window)
    short = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(3))
    long = torch.randint(1, 128, (1, 9), generator=torch.Generator().manual_seed(4))
    ids = torch.cat([long, torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1)])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp_min(0)  # as generate does; RoPE tables are float32
        batch = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        alone = model(short, use_cache=False).logits
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        gen_alone = model.generate(short, max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(batch[1:, 4:], alone, rtol=1e-10, atol=1e-10)
    assert torch.equal(gen[1, 9:], gen_alone[0, 5:])


def test_key_padding_reads_every_mask_layout():
    valid = torch.tensor([[False, True, True], [True, True, True]])
    bool4d = torch.tril(torch.ones(3, 3, dtype=torch.bool))[None, None] & valid[:, None, None, :]
    add4d = torch.where(bool4d, 0.0, torch.finfo(torch.float32).min)
    assert torch.equal(key_padding(bool4d, 3), valid)
    assert torch.equal(key_padding(add4d, 3), valid)
    assert torch.equal(key_padding(valid.long(), 3), valid)
    assert key_padding(None, 3) is None
    assert key_padding(torch.ones(2, 1, 3, 3, dtype=torch.bool), 3) is None


def test_save_and_reload_roundtrip(tmp_path):
    model = _model("qwen2", window=2, layers=[1], tie_feature_maps=False).float()
    save_lawcat(model, tmp_path)
    again = load_lawcat(tmp_path, dtype=torch.float32)
    assert lawcat_layers(again) == [1] and get_lawcat_config(again).tie_feature_maps is False
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="save_lawcat"):
        load_lawcat(tmp_path / "missing")


def test_config_validation():
    with pytest.raises(ValueError, match="window_size"):
        LawcatConfig(window_size=-1)
    with pytest.raises(ValueError, match="backend"):
        LawcatConfig(backend="cuda")
    with pytest.raises(ValueError, match="unknown LawcatConfig keys"):
        LawcatConfig.from_dict({"conv": 4})
    assert LawcatConfig.from_dict(LawcatConfig(layers=[3, 1, 1]).to_dict()).layers == [1, 3]
