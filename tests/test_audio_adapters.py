"""PETL-AST adapters against a naive float64 re-computation of the adapted AST, and the paper's
trainable-parameter table (adapters.md §2.7)."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from peft import PeftModel, get_peft_model

from petl.adapters.audio import AudioAdapterConfig

from .adapter_matrix import perturb_adapter
from .test_audio_adapter_matrix import tiny_ast

# ----------------------------------------------------------------- naive reference (float64)


def lin(x, m):
    return x @ m.weight.T + m.bias


def norm(x, m):
    return F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)


def qgelu(x):
    return x * torch.sigmoid(1.702 * x)


def ref_bottleneck(block, a):
    return lin(F.gelu(lin(a, block.down)), block.up)


def ref_conformer(block, a):
    h = norm(a, block.norm) if block.apply_norm else a  # [B, S, D]
    h = torch.einsum("bsd,cd->bsc", h, block.pointwise_in.weight[:, :, 0]) + block.pointwise_in.bias
    half = h.shape[-1] // 2
    h = h[..., :half] * torch.sigmoid(h[..., half:])  # GLU
    k = block.depthwise.weight.shape[-1]
    padded = F.pad(h, (0, 0, k // 2, k // 2))  # zero 'same' padding along the token axis
    h = sum(padded[:, j:j + h.shape[1]] * block.depthwise.weight[:, 0, j] for j in range(k)) + block.depthwise.bias
    bn = block.batch_norm
    h = (h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    h = F.silu(h)
    return h @ block.pointwise_out.weight[:, :, 0].T + block.pointwise_out.bias


def ref_convpass(block, a):
    f, t = block.grid
    h = qgelu(lin(a, block.down))  # [B, S, b]
    special = h.shape[1] - f * t
    w, bias = block.conv.weight, block.conv.bias  # [b, b, 3, 3]
    grid = h[:, special:].reshape(h.shape[0], f, t, -1)  # row-major frequency x time
    out = torch.zeros_like(grid)
    for i in range(f):
        for j in range(t):
            acc = bias.clone().expand(h.shape[0], -1)
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    if 0 <= i + di < f and 0 <= j + dj < t:
                        acc = acc + grid[:, i + di, j + dj] @ w[:, :, 1 + di, 1 + dj].T
            out[:, i, j] = acc
    head = h[:, :special] @ w[:, :, 1, 1].T + bias
    h = qgelu(torch.cat([head, out.reshape(h.shape[0], f * t, -1)], dim=1))
    return block.scale * lin(h, block.up)


def ref_attention(x, attn, q_delta=None, v_delta=None, prefix=None):
    batch, seq, hidden = x.shape
    heads = attn.config.num_attention_heads
    wq = attn.q_proj.weight + (q_delta if q_delta is not None else 0)
    wv = attn.v_proj.weight + (v_delta if v_delta is not None else 0)
    q = x @ wq.T + attn.q_proj.bias
    k = lin(x, attn.k_proj)
    v = x @ wv.T + attn.v_proj.bias
    if prefix is not None:
        pk, pv = (p.expand(batch, -1, -1) for p in prefix)
        k = torch.cat([k[:, :1], pk, k[:, 1:]], 1)
        v = torch.cat([v[:, :1], pv, v[:, 1:]], 1)
    split = lambda z: z.reshape(batch, z.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    scores = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return lin((scores @ v).transpose(1, 2).reshape(batch, seq, hidden), attn.o_proj)


def ref_mlp(x, mlp):
    return lin(F.gelu(lin(x, mlp.fc1)), mlp.fc2)


def _ad(fn, block, a, residual):
    return fn(block, a) + (a if residual else 0)


def ref_sublayer(f, x, fn, block, cfg):
    """The placement table of layer.Placement, written out."""
    if cfg.placement == "parallel" or cfg.method == "convpass":
        a = x if (cfg.position == "before" or cfg.method == "convpass") else f(x)
        return f(x) + _ad(fn, block, a, cfg.residual and cfg.method != "convpass")
    if cfg.position == "before":
        return f(_ad(fn, block, x, cfg.residual))
    return _ad(fn, block, f(x), cfg.residual)


def reference_logits(peft_model, cfg, input_values):
    """Logits of the adapted tiny AST computed from its parameters with plain float64 tensor maths."""
    model = peft_model.base_model.model
    ast = model.audio_spectrogram_transformer
    h = ast.embeddings(input_values)  # the frozen patch embedding is not under test
    fns = {"bottleneck": ref_bottleneck, "conformer": ref_conformer, "convpass": ref_convpass}
    for i, layer in enumerate(ast.layers):
        if cfg.method == "prompt":
            prompts = layer.audio_adapter_prompt["default"] if hasattr(layer, "audio_adapter_prompt") else None
            if prompts is not None:
                skip = 2 if i == 0 else 1 + prompts.shape[0]
                h = torch.cat([h[:, :1], prompts.expand(h.shape[0], -1, -1), h[:, skip:]], 1)
            layer = layer.base_layer if hasattr(layer, "base_layer") else layer
        attn, mlp = layer.attention, layer.mlp
        q_delta = v_delta = prefix = None
        if cfg.method == "lora":
            s = cfg.lora_alpha / cfg.reduction_rate
            q_delta = s * attn.q_proj.audio_adapter_lora_B["default"] @ attn.q_proj.audio_adapter_lora_A["default"]
            v_delta = s * attn.v_proj.audio_adapter_lora_B["default"] @ attn.v_proj.audio_adapter_lora_A["default"]
        if cfg.method == "prefix":
            prefix = (attn.audio_adapter_prefix_key["default"], attn.audio_adapter_prefix_value["default"])
        plain_attn = _Plain(attn.base_layer if hasattr(attn, "base_layer") else attn)
        plain_mlp = _Plain(mlp.base_layer if hasattr(mlp, "base_layer") else mlp)
        plain = _Plain(layer)
        f_mhsa = lambda z: ref_attention(z, plain_attn, q_delta, v_delta, prefix)  # noqa: E731
        f_ffn = lambda z: ref_mlp(z, plain_mlp)  # noqa: E731
        if hasattr(attn, "audio_adapter_block"):
            f_mhsa = _bind(f_mhsa, fns[cfg.method], attn.audio_adapter_block["default"], cfg)
        if hasattr(mlp, "audio_adapter_block"):
            f_ffn = _bind(f_ffn, fns[cfg.method], mlp.audio_adapter_block["default"], cfg)
        h = h + f_mhsa(norm(h, plain.layernorm_before))
        h = h + f_ffn(norm(h, plain.layernorm_after))
    h = norm(h, ast.layernorm.get_base_layer())
    pooled = {"mean": h.mean(1), "cls": h[:, 0], "native": (h[:, 0] + h[:, 1]) / 2}[cfg.pooling]
    return lin(norm(pooled, model.classifier.layernorm), model.classifier.dense)


def _bind(f, fn, block, cfg):
    return lambda z: ref_sublayer(f, z, fn, block, cfg)


class _Plain:
    """Attribute view of a module with every petl BitFit / LoRA wrapper folded in by hand."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        child = getattr(self._module, name)
        if hasattr(child, "audio_adapter_bias"):
            return _BiasFolded(child)
        if hasattr(child, "audio_adapter_lora_A"):
            return child.base_layer  # LoRA deltas are added in ref_attention
        return child


class _BiasFolded:
    def __init__(self, wrapper):
        base = wrapper.base_layer
        self.weight, self.bias = base.weight, base.bias + wrapper.audio_adapter_bias["default"]
        self.normalized_shape, self.eps = getattr(base, "normalized_shape", None), getattr(base, "eps", None)


CASES = {
    "conformer-parallel-before": dict(reduction_rate=8, kernel_size=5),
    "conformer-faithful-houlsby": dict(reduction_rate=8, kernel_size=3, faithful=True, adapter_type="houlsby"),
    "bottleneck-parallel-after": dict(method="bottleneck", position="after", reduction_rate=8),
    "bottleneck-parallel-before-residual": dict(method="bottleneck", residual=True, reduction_rate=8),
    "bottleneck-sequential-before-mhsa": dict(method="bottleneck", placement="sequential", location="mhsa",
                                              reduction_rate=8),
    "bottleneck-sequential-after-noresidual": dict(method="bottleneck", placement="sequential", position="after",
                                                   residual=False, reduction_rate=8, pooling="cls"),
    "convpass": dict(method="convpass", reduction_rate=8, convpass_scale=0.7),
    "prompt-deep": dict(method="prompt", num_tokens=3),
    "prompt-shallow": dict(method="prompt", num_tokens=4, deep=False, pooling="cls"),
    "prefix": dict(method="prefix", num_tokens=4),
    "lora": dict(method="lora", reduction_rate=8, lora_alpha=3.0),
    "bitfit": dict(method="bitfit", pooling="native"),
    "linear-probe": dict(method="linear_probe"),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_adapted_model_matches_naive_reference(name, attn):
    cfg = AudioAdapterConfig(modules_to_save=[], **CASES[name])
    base = tiny_ast().double()
    base.set_attn_implementation(attn)
    model = get_peft_model(base, cfg)
    perturb_adapter(model, size=0.3)
    with torch.no_grad():
        for m in model.modules():  # non-trivial BatchNorm statistics
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(2, 100, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model(input_values=x).logits
        want = reference_logits(model, cfg, x)
    # float64 throughout, except that transformers' eager attention computes its softmax in float32.
    tol = 1e-9 if attn == "sdpa" else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * 1e-1)


def test_default_init_is_identity_and_faithful_init_is_not():
    """petl's init leaves the model unchanged at step 0; the reference's effective init does not."""
    x = torch.randn(2, 100, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = tiny_ast()(input_values=x).logits
        for method in ("bottleneck", "conformer", "convpass", "lora"):
            kwargs = dict(method=method, reduction_rate=8, pooling="native", modules_to_save=[])
            out = get_peft_model(tiny_ast(), AudioAdapterConfig(**kwargs))(input_values=x).logits
            torch.testing.assert_close(out, base_logits, rtol=0, atol=0)
            faithful = get_peft_model(tiny_ast(), AudioAdapterConfig(faithful=True, **kwargs))
            assert not torch.equal(faithful(input_values=x).logits, base_logits), method
    block = get_peft_model(tiny_ast(), AudioAdapterConfig(method="bottleneck", faithful=True, reduction_rate=2))
    down = block.base_model.model.audio_spectrogram_transformer.layers[0].mlp.audio_adapter_block["default"].down
    assert abs(float(down.weight.detach().std()) - 0.02) < 0.004  # transformers' N(0, 0.02) (cut at +-2)


def test_faithful_conformer_layernorm_gets_no_gradient():
    model = get_peft_model(tiny_ast(), AudioAdapterConfig(faithful=True, reduction_rate=8, kernel_size=3))
    model.train()
    x = torch.randn(3, 100, 128)
    model(input_values=x, labels=torch.tensor([0, 1, 2])).loss.backward()
    block = model.base_model.model.audio_spectrogram_transformer.layers[0].mlp.audio_adapter_block["default"]
    assert block.norm.weight.requires_grad and block.norm.weight.grad is None
    assert block.pointwise_in.weight.grad is not None


def test_convpass_mixes_neighbours_on_the_frequency_time_grid():
    """A change at patch (f, t) reaches exactly the 3x3 neighbourhood in the 2-D grid (not the 1-D sequence)."""
    from petl.adapters.audio import ConvPass2d

    torch.manual_seed(0)
    block = ConvPass2d(hidden=16, width=4, grid=(5, 7), dropout=0.0)
    torch.nn.init.normal_(block.conv.weight)
    torch.nn.init.normal_(block.up.weight)
    x = torch.randn(1, 2 + 35, 16)
    poke = x.clone()
    f, t = 2, 6  # the last time column: its 1-D sequence neighbour (3, 0) is not a grid neighbour
    poke[0, 2 + f * 7 + t] += 1.0
    changed = (block(poke) - block(x)).abs().sum(-1)[0, 2:].reshape(5, 7) > 1e-7
    expected = torch.zeros(5, 7, dtype=torch.bool)
    expected[f - 1:f + 2, t - 1:t + 1] = True
    assert torch.equal(changed, expected)
    assert (block(poke) - block(x))[0, :2].abs().max() == 0  # CLS / distillation only see themselves


def test_prompt_sequence_layout():
    """Shallow prompts replace the distillation token: S = 1 + N + F*T in every layer."""
    model = get_peft_model(tiny_ast(), AudioAdapterConfig(method="prompt", num_tokens=5, modules_to_save=[]))
    lengths = []
    for layer in model.base_model.model.audio_spectrogram_transformer.layers:
        layer.base_layer.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    with torch.no_grad():
        model(input_values=torch.randn(1, 100, 128))
    assert lengths == [1 + 5 + 12 * 9] * 2


def test_lora_rank_and_paper_scaling():
    model = get_peft_model(tiny_ast(), AudioAdapterConfig(method="lora", reduction_rate=8, lora_alpha=8.0))
    q = model.base_model.model.audio_spectrogram_transformer.layers[1].attention.q_proj
    assert q.audio_adapter_lora_A["default"].shape == (32 // 8, 32)
    assert q.audio_adapter_scaling["default"] == 8.0 / 8  # alpha / RR, not alpha / r


def test_saved_adapter_reloads_with_head_and_pooling(tmp_path):
    model = get_peft_model(tiny_ast(), AudioAdapterConfig(reduction_rate=8, kernel_size=3, pooling="cls"))
    perturb_adapter(model)
    x = torch.randn(2, 100, 128)
    with torch.no_grad():
        want = model(input_values=x).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_ast(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_values=x).logits, want)
    assert loaded.peft_config["default"].pooling == "cls"


def test_rejects_non_ast_models_and_bad_options():
    from petl.testing import tiny_causal_lm

    with pytest.raises(ValueError, match="Audio Spectrogram Transformers"):
        get_peft_model(tiny_causal_lm("llama"), AudioAdapterConfig())
    with pytest.raises(ValueError, match="odd"):
        AudioAdapterConfig(method="prefix", num_tokens=5)
    with pytest.raises(ValueError, match="pooling"):
        AudioAdapterConfig(method="prompt", pooling="native")
    with pytest.raises(ValueError, match="method"):
        AudioAdapterConfig(method="ia3")


# ----------------------------------------------------------------- the paper's parameter table

#: (config, adapter + per-layer LayerNorm parameters) at AST-B (D=768, L=12), adapters.md §2.7.
TABLE = [
    (dict(method="bottleneck", reduction_rate=64), 230_544 + 18_432),
    (dict(method="bottleneck", reduction_rate=96), 156_768 + 18_432),
    (dict(method="bottleneck", reduction_rate=64, adapter_type="houlsby"), 461_088 + 2 * 18_432),
    (dict(), 252_288 + 18_432),  # the default: Conformer, Pfeiffer, RR=96, k=31 (0.29 %)
    (dict(faithful=True), 252_288 + 18_432),
    (dict(reduction_rate=64), 364_608 + 18_432),
    (dict(method="lora"), 442_368),
    (dict(method="prefix"), 221_184),
    (dict(method="prompt"), 230_400),
]
#: the classifier's LayerNorm, trained by every method (the role of the reference's final LN).
FINAL_LN = 1_536
#: the head Linear(768 -> C) per data set: (C, 768 C + C).
HEADS = {"ESC-50": (50, 38_450), "US8K": (10, 7_690), "GSC": (35, 26_915), "FSC": (31, 23_839)}


def _trainable_ast_b(config: AudioAdapterConfig, num_labels: int) -> int:
    from transformers import ASTConfig, ASTForAudioClassification

    with torch.device("meta"):  # AST-B without allocating 86M parameters
        model = ASTForAudioClassification(ASTConfig(max_length=500, num_labels=num_labels))
    model = get_peft_model(model, config)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(("kwargs", "expected"), TABLE, ids=[str(k) or "default" for k, _ in TABLE])
def test_trainable_parameters_match_the_paper_table(kwargs, expected):
    assert _trainable_ast_b(AudioAdapterConfig(**kwargs), 50) == expected + FINAL_LN + HEADS["ESC-50"][1]


def test_head_parameters_per_dataset():
    for classes, head in HEADS.values():
        assert _trainable_ast_b(AudioAdapterConfig(method="linear_probe"), classes) == FINAL_LN + head
