"""LAWCAT's fused Triton kernels (petl/linear/kernel_*.py, fused.py) against PyTorch references.

On CPU the kernels run in Triton's interpreter: ``test_kernels_under_triton_interpreter`` starts
a child pytest of this file with ``TRITON_INTERPRET=1`` (set before Triton is imported there, so
no other test module sees it) and the ``child`` tests run inside it. With ``-m gpu`` the same
checks run compiled on CUDA, in bf16 and at larger shapes.

Tolerance rule (STYLE.md §7): each output/gradient of a kernel, and the same quantity from the
PyTorch path at the same precision, are compared with a float64 reference by relative L2 error;
the kernel must satisfy ``err_kernel <= 2 * err_torch (+ eps_float32 for float32 results)``. The
``eps`` term (one float32 unit, added only where the compared result is float32: g, den, z_T,
float32 layers) matters only there, where both errors are rounding noise of a few 1e-8 and their
ratio is meaningless.

Shapes are a named list (odd lengths, lengths that are not a multiple of the chunk or token
block, one token, feature widths that are not powers of 2, several feature blocks, several
steps of the carry scan, several backward programs per head so the du halo and the two-slot ring
are used). bf16 runs on CPU through :func:`bf16_interpreter`, which gives Triton's interpreter
the GPU's bf16 semantics (see there).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from tests.interpreter_child import HAS_TRITON, child_only, in_child, run_child_pytest

CHILD_ENV = "PETL_LAWCAT_TRITON_CHILD"
IN_CHILD = in_child(CHILD_ENV)
child = child_only(CHILD_ENV)
os.environ.setdefault("PETL_FLA_TUNING", "short")  # fla's first call compiles ~15 configs, not ~300


@pytest.mark.skipif(IN_CHILD or not HAS_TRITON, reason="parent of the interpreter run / no triton")
def test_kernels_under_triton_interpreter():
    run_child_pytest(__file__, CHILD_ENV, min_passed=15)


# ----------------------------------------------------------------------------- helpers
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _check(name: str, kernel: torch.Tensor, torch_same: torch.Tensor, ref: torch.Tensor, dtype) -> None:
    assert torch.isfinite(kernel).all(), f"{name}: non-finite values (unwritten output?)"
    ek, et = _rel(kernel, ref), _rel(torch_same, ref)
    bound = 2 * et + (torch.finfo(torch.float32).eps if kernel.dtype == torch.float32 else 0.0)
    assert ek <= bound, f"{name}: kernel error {ek:.3g} > 2 x torch error {et:.3g} + eps"


@pytest.fixture
def poison(monkeypatch):
    """Every kernel output starts as NaN, so an unwritten element fails the finiteness checks."""
    from petl.linear import kernel_features, kernel_normaliser

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kernel_features, "_empty", nan_empty)
    monkeypatch.setattr(kernel_normaliser, "_empty", nan_empty)


@pytest.fixture
def bf16_interpreter(monkeypatch):
    """GPU bf16 semantics for Triton's CPU interpreter, for this test only.

    The interpreter keeps bf16 values as raw uint16 bits: its ``tl.dot`` multiplies those bits as
    integers, and its float32 -> bf16 cast truncates. A GPU multiplies bf16 operands exactly with
    float32 accumulation and rounds casts to nearest-even; this fixture makes the interpreter do
    the same (via torch's own bf16 conversions), so the kernels' bf16 paths (the split dots of the
    feature-map backward) can be checked on CPU.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as it

    def to_f32(h):
        if h.dtype.scalar != tl.bfloat16:
            return h.data
        return torch.from_numpy(h.data.view(np.int16).copy()).view(torch.bfloat16).float().numpy()

    real_dot, real_cast = it.InterpreterBuilder.create_dot, it.InterpreterBuilder.cast_impl

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if tl.bfloat16 not in (a.dtype.scalar, b.dtype.scalar):
            return real_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        out = np.matmul(to_f32(a), to_f32(b), dtype=np.float32) + d.data
        return it.TensorHandle(out.astype(d.data.dtype), d.dtype.scalar)

    def cast_impl(self, src, dst_type):
        if dst_type.scalar == tl.bfloat16 and src.dtype.scalar != tl.bfloat16:
            t = torch.from_numpy(np.asarray(src.data, dtype=np.float32).copy()).to(torch.bfloat16)
            return it.TensorHandle(t.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        if src.dtype.scalar == tl.bfloat16 and dst_type.scalar != tl.bfloat16:
            return real_cast(self, it.TensorHandle(to_f32(src), tl.float32), dst_type)
        return real_cast(self, src, dst_type)

    monkeypatch.setattr(it.InterpreterBuilder, "create_dot", create_dot)
    monkeypatch.setattr(it.InterpreterBuilder, "cast_impl", cast_impl)


@pytest.fixture(autouse=True)
def row_scan(monkeypatch):
    """In the interpreter child: run ``tl.associative_scan`` one row at a time.

    Triton's interpreter evaluates a custom-combine scan one element at a time, a Python call
    per element. This runs the same combine in the same order along the scan axis, vectorised
    across the other axis, so the normaliser tests take seconds instead of minutes; the results
    are bitwise those of the element loop (elementwise float32 operations either way).
    """
    if not IN_CHILD:
        return
    import numpy as np
    from triton.runtime import interpreter as it

    def generic_scan(self, inputs):
        datas = [arg.handle.data for arg in inputs]
        outs = [np.empty_like(d) for d in datas]
        ax = self.axis
        row = lambda d, i: np.take(d, i, axis=ax)  # noqa: E731
        acc = [self.to_tensor(row(d, 0), arg.dtype) for d, arg in zip(datas, inputs)]
        for i in range(datas[0].shape[ax]):
            if i:
                cur = [self.to_tensor(row(d, i), arg.dtype) for d, arg in zip(datas, inputs)]
                ret = self.combine_fn.fn(*acc, *cur)
                acc = list(ret) if isinstance(ret, tuple) else [ret]
            for o, t in zip(outs, acc):
                idx = [slice(None)] * o.ndim
                idx[ax] = i
                o[tuple(idx)] = t.handle.data
        return [self.to_tensor(o, arg.dtype) for o, arg in zip(outs, inputs)]

    monkeypatch.setattr(it.ScanOps, "generic_scan", generic_scan)


def _gate_inputs(B, T, H, Hkv, K, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x = mk(B, T, Hkv, K) * 3
    q, k = mk(B, T, H, K).softmax(-1), mk(B, T, H, K).softmax(-1)
    z0 = mk(B, H, K).abs()
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[-1, : max(1, T // 7)] = False
    return [t.to(device) for t in (x, q, k, z0, valid)]


def _gate_reference(x, q, k, z0, valid, normalizer):
    """g, den, z_T from the recurrent reference with a ones column (naive.py)."""
    from petl.linear.naive import naive_recurrent_gla

    B, T, H, K = q.shape
    G = H // x.shape[2]
    g = (F.logsigmoid(x.to(torch.promote_types(x.dtype, torch.float32))) / normalizer).repeat_interleave(G, dim=2)
    if valid is not None:
        g = torch.where(valid[:, :, None, None], g, torch.zeros_like(g))
    ones = torch.ones(B, T, H, 1, dtype=q.dtype, device=q.device)
    o, s = naive_recurrent_gla(q, k, ones, g, z0[..., None] if z0 is not None else None)
    return g, o[..., 0].transpose(1, 2), s[..., 0]


def _run_gate_normaliser(device, dtype, B, T, H, Hkv, K, block_t, block_f=16, with_z0=True, with_valid=True):
    """Outputs g, den, z_T and the gradients of x, q, k, z0 (random upstream gradients on all
    three outputs, so the core's dg and the cache's dz_T paths are included) vs float64."""
    from petl.linear.kernel_normaliser import gate_normaliser

    x, q, k, z0, valid = _gate_inputs(B, T, H, Hkv, K, device)
    valid = valid if with_valid else None
    x, q, k = (t.to(dtype).double() for t in (x, q, k))  # the reference sees the rounded inputs
    leaves = [x, q, k] + ([z0] if with_z0 else [])
    ref_in = [t.clone().requires_grad_() for t in leaves]
    low = [x.to(dtype), q.to(dtype), k.to(dtype)] + ([z0.float()] if with_z0 else [])
    tin = [t.clone().requires_grad_() for t in low]
    kin = [t.clone().requires_grad_() for t in low]
    z = (lambda ins: ins[3] if with_z0 else None)  # noqa: E731
    ref = _gate_reference(*ref_in[:3], z(ref_in), valid, 16.0)
    same = _gate_reference(*tin[:3], z(tin), valid, 16.0)
    out = gate_normaliser(*kin[:3], z(kin), 16.0, valid, block_t=block_t, block_f=block_f)
    ups = [torch.randn_like(r) for r in ref]
    loss = lambda outs: sum((o.double() * u).sum() for o, u in zip(outs, ups))  # noqa: E731
    g_ref = torch.autograd.grad(loss(ref), ref_in)
    g_same = torch.autograd.grad(loss(same), tin)
    g_k = torch.autograd.grad(loss(out), kin)
    for name, a, b, r in zip(("g", "den", "z_T"), out, same, ref):
        _check(name, a, b, r, dtype)
    for name, a, b, r in zip(("dx", "dq", "dk", "dz0"), g_k, g_same, g_ref):
        _check(name, a, b, r, dtype)


def _run_division(device, dtype, B, T, H, V, block_t):
    from petl.linear.kernel_normaliser import normalise

    gen = torch.Generator(device="cpu").manual_seed(3)
    num = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64).to(dtype).double().to(device)
    den = (torch.rand(B, H, T, generator=gen, dtype=torch.float64) + 0.3).to(device)
    r_in = [num.clone().requires_grad_(), den.clone().requires_grad_()]
    s_in = [num.to(dtype).requires_grad_(), den.float().requires_grad_()]
    k_in = [t.detach().clone().requires_grad_() for t in s_in]
    f = lambda n, d: (n.to(torch.promote_types(n.dtype, torch.float32)) / (d.transpose(1, 2)[..., None] + 1e-10))  # noqa: E731
    ref, same = f(*r_in), f(*s_in).to(dtype)
    out = normalise(*k_in, 1e-10, dtype, block_t=block_t)
    do = torch.randn_like(ref)
    _check("o", out, same, ref, dtype)
    for name, a, b, r in zip(("dnum", "dden"), torch.autograd.grad((out.double() * do).sum(), k_in),
                             torch.autograd.grad((same.double() * do).sum(), s_in),
                             torch.autograd.grad((ref * do).sum(), r_in)):
        _check(name, a, b, r, dtype)


def _run_conv_feature_map(device, dtype, B, T, H, D, Fh, KS, blocks, with_state=True, with_valid=True):
    """phi and the gradients of x, the conv weight and the feature-map weight vs float64."""
    from petl.linear.kernel_features import conv_feature_map

    gen = torch.Generator(device="cpu").manual_seed(5)
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x, cw, fw, state = mk(B, T, H * D), mk(H * D, 1, KS) * 0.5, mk(H, D, Fh) * 0.6, mk(B, H * D, KS - 1)
    if not with_state:
        state = torch.zeros_like(state)
    valid = torch.ones(B, T, dtype=torch.bool)
    if with_valid:
        valid[0, :3] = False
    x, cw, fw, state = (t.to(dtype).double() for t in (x, cw, fw, state))  # rounded inputs for all
    x, cw, fw, state, valid = (t.to(device) for t in (x, cw, fw, state, valid))

    def torch_path(x, cw, fw):  # CausalDepthwiseConv + HedgehogFeatureMap, as in attention.py
        full = torch.cat([state.to(x.dtype), x.transpose(1, 2)], dim=-1)
        u = F.conv1d(full, cw.to(x.dtype), groups=H * D).transpose(1, 2).reshape(B, T, H, D)
        dt = torch.promote_types(x.dtype, torch.float32)
        z = torch.einsum("bthd,hdf->bthf", u.to(dt), fw.to(dt))
        phi = torch.cat([z.softmax(-1), (-z).softmax(-1)], -1).clamp_min(1e-12).to(x.dtype)
        return torch.where(valid[:, :, None, None], phi, torch.zeros_like(phi))

    r_in = [t.clone().requires_grad_() for t in (x, cw, fw)]
    s_in = [t.to(dtype).requires_grad_() for t in (x, cw, fw)]
    k_in = [t.detach().clone().requires_grad_() for t in s_in]
    ref, same = torch_path(*r_in), torch_path(*s_in)
    out = conv_feature_map(k_in[0], k_in[1], k_in[2], state.to(dtype) if with_state else None,
                           valid if with_valid else None, blocks)
    _check("phi", out, same, ref, dtype)
    dphi = torch.randn_like(ref)
    for name, a, b, r in zip(("dx", "dconv_w", "dfm_w"), torch.autograd.grad((out.double() * dphi).sum(), k_in),
                             torch.autograd.grad((same.double() * dphi).sum(), s_in),
                             torch.autograd.grad((ref * dphi).sum(), r_in)):
        _check(name, a, b, r, dtype)


def _tiny_layer(device, H=2, Hkv=1, d=16, **cfg):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    from petl.linear import LawcatAttention, LawcatConfig

    lcfg = LlamaConfig(hidden_size=H * d, num_attention_heads=H, num_key_value_heads=Hkv, head_dim=d,
                       num_hidden_layers=1, intermediate_size=32)
    torch.manual_seed(0)
    base = LlamaAttention(lcfg, layer_idx=0).double()
    layer = LawcatAttention(base, LawcatConfig(conv_init="random", feature_map_init="random", **cfg)).to(device)
    with torch.no_grad():  # move the gate and maps away from their identity/constant inits
        layer.lawcat_gate.up.weight.normal_(0, 0.5)
        layer.lawcat_gate.up.bias.normal_(0, 1)
    return lcfg, layer


def _layer_outputs(layer, dtype, x, mask, kernels, backend, dy):
    layer.to(dtype)
    layer.lawcat_config.kernels, layer.lawcat_config.backend = kernels, backend
    xi = x.to(dtype).clone().requires_grad_()
    o, _ = layer(xi, position_embeddings=None, attention_mask=mask)
    params = [p for n, p in layer.named_parameters() if "lawcat_" in n]
    grads = torch.autograd.grad((o.double() * dy).sum(), [xi] + params)
    names = ["x"] + [n for n, p in layer.named_parameters() if "lawcat_" in n]
    return o.detach(), dict(zip(names, grads))


def _run_layer(device, dtype, B, T, backend, blocks, monkeypatch):
    """Fused path (kernels on) vs the PyTorch path at the same dtype, both vs float64."""
    import petl.linear.attention as attention

    if blocks:
        real = attention.fused_attend
        monkeypatch.setattr(attention, "fused_attend", lambda *a: real(*a, blocks=blocks))
    _, layer = _tiny_layer(device, chunk_size=16, **({"H": 4, "Hkv": 2, "d": 128} if device == "cuda" else {}))
    layer.to(dtype).double()  # every path sees the same (rounded) parameters and inputs
    hidden = layer.q_proj.in_features
    x = torch.randn(B, T, hidden, dtype=torch.float64, device=device).to(dtype).double()
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    mask[-1, :4] = 0
    dy = torch.randn(B, T, hidden, dtype=torch.float64, device=device)
    ref, g_ref = _layer_outputs(layer, torch.float64, x, mask, "off", "reference", dy)
    same, g_same = _layer_outputs(layer, dtype, x, mask, "off", "chunked", dy)
    out, g_out = _layer_outputs(layer, dtype, x, mask, "on", backend, dy)
    _check("layer output", out, same, ref, dtype)
    for name in g_ref:
        _check(f"grad {name}", g_out[name], g_same[name], g_ref[name], dtype)


def _run_cache_continuation(device, dtype, backend):
    from petl.linear import LawcatCache

    lcfg, layer = _tiny_layer(device, chunk_size=16, backend=backend, kernels="on")
    layer.to(dtype)
    x = torch.randn(2, 19, layer.q_proj.in_features, device=device, dtype=dtype)
    with torch.no_grad():
        full, _ = layer(x, position_embeddings=None)
        cache = LawcatCache(lcfg, [0])
        pieces = [layer(x[:, a:b], position_embeddings=None, past_key_values=cache)[0]
                  for a, b in [(0, 9), (9, 10), (10, 12), (12, 19)]]  # prefill, decode step, pieces
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=2e-5 if dtype == torch.float32 else 2e-2,
                               atol=2e-5 if dtype == torch.float32 else 2e-2)
    assert cache.get_seq_length() == 19


# ----------------------------------------------------------------------------- CPU (interpreter child)
# (B, T, H, H_kv, K, chunk, block_f, z0, padding): T = 1; GQA with a partial last chunk; several
# feature blocks (K = 40 > 16) and 13 chunks; 19 chunks (two steps of the carry scan, which the
# test shortens to 16 summaries) without a cache state or padding.
GATE_SHAPES = {
    "t1": (2, 1, 2, 1, 20, 16, 16, True, True),
    "t37-gqa": (1, 37, 4, 2, 20, 16, 16, True, True),
    "t200-fblocks": (1, 200, 2, 2, 40, 16, 16, True, True),
    "t300-scan-steps": (1, 300, 1, 1, 16, 16, 16, False, False),
}


@child
@pytest.mark.parametrize("case", list(GATE_SHAPES))
def test_gate_normaliser_interpreted(case, poison, monkeypatch):
    from petl.linear import kernel_normaliser

    monkeypatch.setattr(kernel_normaliser, "SCAN_BLOCK", 16)
    B, T, H, Hkv, K, bt, bf, z0, pad = GATE_SHAPES[case]
    _run_gate_normaliser("cpu", torch.float32, B, T, H, Hkv, K, bt, bf, z0, pad)


@child
def test_gate_normaliser_bf16_interpreted(poison, bf16_interpreter):
    _run_gate_normaliser("cpu", torch.bfloat16, 1, 37, 4, 2, 20, 16)


@child
def test_division_interpreted(poison):
    _run_division("cpu", torch.float32, 2, 21, 3, 17, 16)  # V=17: masked columns


# (dtype, T, blocks, conv state, padding); d = 24, f = 12 (not powers of 2), K = 4. "bwd_blocks"
# sets the token blocks per backward program: 1 = every program needs the next one's halo; 2 with
# T = 70 = 4 * 16 + 6 walks the two-slot ring and ends on a partial block.
CONV_CASES = {
    "fp32-t37-halo": (torch.float32, 37, {"fwd": 16, "bwd": 16, "bwd_blocks": 1}, True, True),
    "fp16-t70-ring": (torch.float16, 70, {"fwd": 16, "bwd": 16, "bwd_blocks": 2}, True, True),
    "fp32-t1": (torch.float32, 1, {"fwd": 16, "bwd": 16}, True, False),
    "fp32-t33-nostate": (torch.float32, 33, {"fwd": 16, "bwd": 16, "bwd_blocks": 3}, False, False),
}


@child
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_feature_map_interpreted(case, poison):
    dtype, T, blocks, state, pad = CONV_CASES[case]
    _run_conv_feature_map("cpu", dtype, 2, T, 2, 24, 12, 4, blocks, state, pad)


@child
@pytest.mark.parametrize("dot", ["split", "bf16"])
def test_conv_feature_map_bf16_interpreted(dot, poison, bf16_interpreter):
    """bf16 backward dots: dz split into bf16 hi + lo, or rounded to bf16 (kernel_features.py)."""
    _run_conv_feature_map("cpu", torch.bfloat16, 2, 70, 2, 24, 12, 4,
                          {"fwd": 16, "bwd": 16, "bwd_blocks": 2, "bwd_dot": dot})


@child
def test_fused_layer_matches_pytorch_path_interpreted(poison, monkeypatch):
    blocks = {"fwd": 16, "bwd": 16, "bwd_blocks": 1, "norm": 16, "norm_f": 16}
    _run_layer("cpu", torch.float32, 2, 19, "chunked", blocks, monkeypatch)


@child
def test_fused_layer_cache_continuation_interpreted():
    _run_cache_continuation("cpu", torch.float32, "chunked")


@child
def test_dispatch_uses_fused_path(monkeypatch):
    import petl.linear.attention as attention

    calls = []
    real = attention.fused_attend
    monkeypatch.setattr(attention, "fused_attend", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, layer = _tiny_layer("cpu", backend="chunked", kernels="on")
    layer.float()
    x = torch.randn(1, 5, layer.q_proj.in_features)
    layer(x, position_embeddings=None)
    assert calls == [1]
    layer.lawcat_config.kernels = "off"
    layer(x, position_embeddings=None)
    layer.lawcat_config.kernels, layer.lawcat_config.window_size = "on", 2
    with pytest.raises(ValueError, match="position_embeddings"):  # windowed mode stays on the PyTorch path
        layer(x, position_embeddings=None)
    assert calls == [1]


@pytest.mark.skipif(IN_CHILD or not HAS_TRITON, reason="argument checks, no kernel runs / no triton")
def test_bad_arguments_get_one_line_errors():
    from petl.linear.kernel_features import conv_feature_map
    from petl.linear.kernel_normaliser import gate_normaliser

    x, q = torch.zeros(1, 5, 1, 16), torch.zeros(1, 5, 2, 16)
    with pytest.raises(ValueError, match="power of 2"):
        gate_normaliser(x, q, q, None, 16.0, block_t=24)
    with pytest.raises(ValueError, match="at least one token"):
        gate_normaliser(x[:, :0], q[:, :0], q[:, :0], None, 16.0)
    with pytest.raises(ValueError, match="H_kv dividing"):
        gate_normaliser(torch.zeros(1, 5, 3, 16), q, q, None, 16.0)
    xs, fw = torch.zeros(1, 5, 32), torch.zeros(2, 16, 8)
    with pytest.raises(ValueError, match="conv size 18"):
        conv_feature_map(xs, torch.zeros(32, 1, 18), fw)
    with pytest.raises(ValueError, match="backward token block"):
        conv_feature_map(xs, torch.zeros(32, 1, 4), fw, blocks={"bwd": 8})


# ----------------------------------------------------------------------------- GPU (compiled)
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 1000, 8, 2, 128, 64, 64), (1, 77, 4, 4, 64, 128, 64), (1, 2111, 2, 1, 128, 32, 128)],
                         ids=["gqa", "short", "long-gqa"])
def test_cuda_gate_normaliser(shape, poison):
    B, T, H, Hkv, K, bt, bf = shape
    _run_gate_normaliser("cuda", torch.bfloat16, B, T, H, Hkv, K, bt, bf)


@pytest.mark.gpu
def test_cuda_division(poison):
    _run_division("cuda", torch.bfloat16, 2, 1001, 4, 128, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [((4, 128, 64), {}), ((3, 80, 40), {}), ((4, 128, 64), {"bwd_blocks": 3}),
                                  ((4, 128, 64), {"bwd_dot": "bf16", "bwd_blocks": 2})],
                         ids=["d128", "d80", "d128-ring", "d128-bf16dot"])
def test_cuda_conv_feature_map(case, poison):
    (H, D, Fh), blocks = case
    _run_conv_feature_map("cuda", torch.bfloat16, 2, 999, H, D, Fh, 4, blocks)


@pytest.mark.gpu
def test_cuda_fused_layer_chunked_core(poison, monkeypatch):
    _run_layer("cuda", torch.bfloat16, 2, 333, "chunked", {}, monkeypatch)


@pytest.mark.gpu
def test_cuda_fused_layer_cache_continuation():
    _run_cache_continuation("cuda", torch.float32, "chunked")


def _fla_available() -> bool:
    from petl.linear.fla_backend import fla_available

    return torch.cuda.is_available() and fla_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _fla_available(), reason="flash-linear-attention not installed")
def test_cuda_fused_layer_fla_core(poison, monkeypatch):
    """The whole fast path (petl kernels + fla chunk_gla) vs float64, against the bf16 PyTorch path."""
    _run_layer("cuda", torch.bfloat16, 2, 333, "fla", {}, monkeypatch)


@pytest.mark.gpu
@pytest.mark.skipif(not _fla_available(), reason="flash-linear-attention not installed")
def test_cuda_fused_layer_fla_cache_continuation():
    _run_cache_continuation("cuda", torch.bfloat16, "fla")
