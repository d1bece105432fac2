"""LAWCAT core maths: recurrent reference vs chunked form vs a dense float64 formula (CPU), and
the same forms against each other on CUDA (``-m gpu``), fla's ``chunk_gla`` included."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from petl.linear import chunked_gla, naive_recurrent_gla, naive_recurrent_lawcat
from petl.linear.modules import CausalDepthwiseConv, GlaGate, HedgehogFeatureMap
from petl.linear.ops import ENV_VAR, fla_available, gla, resolve_backend
from petl.linear.window import delayed_keys, window_terms

os.environ.setdefault("PETL_FLA_TUNING", "short")  # before fla is first loaded: seconds, not minutes

# (B, T, H, F, V, chunk, sub_chunk): odd lengths, T below / above / not a multiple of the chunk.
SHAPES = [
    (1, 1, 1, 4, 3, 8, 4),
    (2, 7, 3, 8, 5, 8, 4),
    (1, 37, 2, 8, 9, 16, 4),
    (2, 65, 2, 6, 4, 64, 16),
    (1, 100, 1, 16, 17, 32, 8),
]


def _inputs(B, T, H, F_, V, dtype=torch.float64, device="cpu", gate_scale=1.0, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k = mk(B, T, H, F_).softmax(-1), mk(B, T, H, F_).softmax(-1)     # positive like Hedgehog
    v = mk(B, T, H, V)
    g = F.logsigmoid(mk(B, T, H, F_) * 2) * gate_scale
    h0 = mk(B, H, F_, V).abs()
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, g, h0)]


def dense_lawcat(phi_q, phi_k, v, g, window=0, q_rope=None, k_rope=None, factor=None, scale=1.0,
                 eps=1e-10):
    """Independent float64 formula: full T x T weight matrices, no recurrence."""
    phi_q, phi_k, v, g = (t.double() for t in (phi_q, phi_k, v, g))
    T = v.shape[1]
    G = g.cumsum(1)                                                            # [B, T, H, F]
    t_idx, s_idx = torch.arange(T)[:, None], torch.arange(T)[None, :]
    lin_mask = s_idx <= t_idx - window                                         # [T, S]
    diff = (G[:, :, None] - G[:, None, :]).masked_fill(~lin_mask[None, :, :, None, None], -torch.inf)
    w = torch.einsum("bthf,bshf,btshf->bhts", phi_q, phi_k, diff.exp())
    if window > 0:
        sc = torch.einsum("bthd,bshd->bhts", q_rope.double(), k_rope.double()) * scale
        win_mask = (s_idx <= t_idx) & (s_idx > t_idx - window)
        sc = sc.masked_fill(~win_mask, -torch.inf)
        e = (sc - sc.amax(-1, keepdim=True)).exp() * factor.double()[None, :, None, None]
        w = w + e
    num = torch.einsum("bhts,bshd->bthd", w, v)
    den = w.sum(-1).transpose(1, 2)[..., None]
    return num / (den + eps)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_chunked_matches_reference_outputs_and_grads(shape):
    B, T, H, F_, V, C, c = shape
    q, k, v, g, h0 = _inputs(B, T, H, F_, V)
    ins = [t.clone().requires_grad_() for t in (q, k, v, g, h0)]
    ins2 = [t.clone().requires_grad_() for t in (q, k, v, g, h0)]
    o1, s1 = naive_recurrent_gla(*ins)
    o2, s2 = chunked_gla(*ins2, chunk_size=C, sub_chunk_size=c)
    torch.testing.assert_close(o2, o1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, s1, rtol=1e-10, atol=1e-10)
    do, ds = torch.randn_like(o1), torch.randn_like(s1)
    g1 = torch.autograd.grad((o1 * do).sum() + (s1 * ds).sum(), ins)
    g2 = torch.autograd.grad((o2 * do).sum() + (s2 * ds).sum(), ins2)
    for name, a, b in zip("q k v g h0".split(), g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"grad {name}")


def test_chunked_is_stable_with_strong_decay():
    # Per-step log gates down to -60: a naive exp(-G) factorisation overflows float32 here.
    q, k, v, g, h0 = _inputs(1, 50, 2, 8, 4, dtype=torch.float32)
    g = -torch.rand_like(g) * 60
    o1, s1 = naive_recurrent_gla(q.double(), k.double(), v.double(), g.double(), h0.double())
    o2, s2 = chunked_gla(q, k, v, g, h0, chunk_size=16, sub_chunk_size=4)
    assert torch.isfinite(o2).all() and torch.isfinite(s2).all()
    torch.testing.assert_close(o2.double(), o1, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window", [0, 1, 3, 8])
def test_reference_matches_dense_formula(window):
    B, T, H, F_, D = 2, 19, 2, 6, 5
    q, k, v, g, _ = _inputs(B, T, H, F_, D, seed=1)
    qr, kr = torch.randn(B, T, H, 4, dtype=torch.float64), torch.randn(B, T, H, 4, dtype=torch.float64)
    fac = torch.rand(H, dtype=torch.float64)
    kw = dict(window=window, q_rope=qr, k_rope=kr, window_factor=fac, scale=0.5) if window else {}
    ref = naive_recurrent_lawcat(q, k, v, g, **kw)
    dense = dense_lawcat(q, k, v, g, window, qr, kr, fac, 0.5)
    torch.testing.assert_close(ref, dense, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [1, 4, 9])
def test_window_composition_in_pieces_matches_reference(window):
    """window_terms + delayed_keys + GLA over pieces of 1..8 tokens == the reference loop."""
    B, T, H, F_, D = 2, 23, 2, 6, 5
    q, k, v, g, _ = _inputs(B, T, H, F_, D, seed=2)
    qr, kr = torch.randn(B, T, H, 4, dtype=torch.float64), torch.randn(B, T, H, 4, dtype=torch.float64)
    fac = torch.rand(H, dtype=torch.float64)
    ref = naive_recurrent_lawcat(q, k, v, g, window=window, q_rope=qr, k_rope=kr, window_factor=fac, scale=0.5)
    v_aug = torch.cat([v, torch.ones_like(v[..., :1])], -1)
    outs, state, past = [], None, {}
    for a, b in zip([0, 8, 9, 10, 17], [8, 9, 10, 17, 23]):
        cur = {"k": kr[:, a:b], "v": v_aug[:, a:b], "p": k[:, a:b], "g": g[:, a:b]}
        ext = {n: torch.cat([past[n], t], 1) if past else t for n, t in cur.items()}
        win = window_terms(qr[:, a:b], ext["k"], ext["v"], None, window, 0.5)
        kd, vd = delayed_keys(ext["p"], ext["v"], ext["g"], window, b - a)
        lin, state = chunked_gla(q[:, a:b], kd, vd, g[:, a:b], state, chunk_size=4, sub_chunk_size=2)
        num = lin + fac[None, None, :, None] * win
        outs.append(num[..., :D] / (num[..., D:] + 1e-10))
        past = {n: t[:, -window:] for n, t in ext.items()}
    torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=1e-10, atol=1e-10)


def test_modules_initial_values_by_hand():
    conv = CausalDepthwiseConv(3, kernel_size=4, init="identity", eps=1e-3).double()
    x = torch.arange(1.0, 16.0, dtype=torch.float64).view(1, 5, 3)
    y, state = conv(x)
    # y_t = x_t + 1e-3 * (x_{t-1} + x_{t-2} + x_{t-3})
    expect = x.clone()
    for t in range(5):
        expect[:, t] += 1e-3 * x[:, max(0, t - 3):t].sum(1)
    torch.testing.assert_close(y, expect)
    torch.testing.assert_close(state, x[:, -3:].transpose(1, 2))
    fm = HedgehogFeatureMap(2, 4, 2, init="identity")
    u = torch.randn(1, 3, 2, 4)
    torch.testing.assert_close(fm(u), torch.cat([u[..., :2].softmax(-1), (-u[..., :2]).softmax(-1)], -1))
    gate = GlaGate(8, 2, 4)
    g = gate(torch.randn(1, 5, 8))
    assert g.shape == (1, 5, 2, 4)
    torch.testing.assert_close(g.exp(), torch.full_like(g, 0.5 ** (1 / 16)))  # 0.95760...


def test_conv_state_continues_exactly():
    conv = CausalDepthwiseConv(4, kernel_size=4, init="random").double()
    x = torch.randn(2, 11, 4, dtype=torch.float64)
    full, _ = conv(x)
    y1, s = conv(x[:, :6])
    y2, s = conv(x[:, 6:7], s)
    y3, _ = conv(x[:, 7:], s)
    torch.testing.assert_close(torch.cat([y1, y2, y3], 1), full)


def test_backend_dispatch(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend("auto", torch.device("cpu")) == "reference"
    assert resolve_backend("chunked", torch.device("cpu")) == "chunked"
    monkeypatch.setenv(ENV_VAR, "chunked")
    assert resolve_backend("reference", torch.device("cpu")) == "chunked"
    monkeypatch.setenv(ENV_VAR, "fla")
    with pytest.raises(RuntimeError, match="CUDA"):
        resolve_backend("auto", torch.device("cpu"))
    monkeypatch.setenv(ENV_VAR, "triton")
    with pytest.raises(ValueError, match="PETL_LAWCAT_BACKEND"):
        resolve_backend("auto", torch.device("cpu"))
    monkeypatch.setenv(ENV_VAR, "chunked")
    q, k, v, g, h0 = _inputs(1, 9, 1, 4, 3)
    torch.testing.assert_close(gla(q, k, v, g, h0)[0], naive_recurrent_gla(q, k, v, g, h0)[0])


# ----------------------------------------------------------------------------- GPU
# Tolerance principle (STYLE.md §7): compare each low-precision form and a same-precision
# PyTorch run against the float64 reference; the form must stay within 2x that error (+ floor).
def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_chunked_matches_reference(dtype):
    q, k, v, g, h0 = _inputs(2, 1000, 4, 64, 65, dtype=torch.float64, device="cuda")
    ref, ref_s = naive_recurrent_gla(q, k, v, g, h0)
    lo = [t.to(dtype) for t in (q, k, v)] + [g.float(), h0.float()]
    base, _ = naive_recurrent_gla(*lo)
    o, s = chunked_gla(*lo)
    assert torch.isfinite(o).all()
    assert _rel(o, ref) <= 2 * _rel(base, ref) + 1e-5
    assert _rel(s, ref_s) <= 2 * _rel(naive_recurrent_gla(*lo)[1], ref_s) + 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and fla_available()), reason="flash-linear-attention not installed")
@pytest.mark.parametrize("shape", [(1, 777, 4, 128, 128), (2, 100, 3, 64, 80)], ids=["T777-K128", "T100-K64-V80"])
def test_cuda_fla_matches_reference_outputs_and_grads(shape):
    """fla's chunk_gla (the fast path's core: V = d, no ones column) vs the float64 recurrence.

    Rule: fla's error <= 2x the error of petl's chunked PyTorch form run on the same bf16 inputs
    with its results rounded to bf16, both against float64 on those rounded inputs. bf16 is the
    precision fla works in: its output is bf16, and its float32 final state and gate gradient are
    accumulated from bf16 products (the decayed keys and states are cast to bf16 before each
    tensor-core product), so the chunked form's state and dg are rounded to bf16 for the
    baseline; q/k/v gradients are bf16 in both (bf16 leaves).
    """
    bf = lambda t: t.to(torch.bfloat16)  # noqa: E731
    from petl.linear.fla_backend import fla_chunk_gla

    B, T, H, K, V = shape
    q, k, v, g, h0 = _inputs(B, T, H, K, V, dtype=torch.float64, device="cuda", gate_scale=0.25)
    q, k, v = (t.to(torch.bfloat16).double() for t in (q, k, v))
    g, h0 = g.float().double(), h0.float().double()
    ref_in = [t.clone().requires_grad_() for t in (q, k, v, g)]
    ref, ref_s = naive_recurrent_gla(*ref_in, h0)
    low = [t.to(torch.bfloat16) for t in (q, k, v)] + [g.float()]
    fla_in = [t.clone().requires_grad_() for t in low]
    chk_in = [t.clone().requires_grad_() for t in low]
    o, s = fla_chunk_gla(*fla_in, h0.float())
    oc, sc = chunked_gla(*chk_in, h0.float())
    oc = oc.to(torch.bfloat16)
    assert o.dtype == torch.bfloat16 and torch.isfinite(o).all()
    assert _rel(o, ref) <= 2 * _rel(oc, ref), (_rel(o, ref), _rel(oc, ref))
    assert _rel(s, ref_s) <= 2 * _rel(bf(sc), ref_s), (_rel(s, ref_s), _rel(bf(sc), ref_s))
    do = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * do).sum(), ref_in)
    g_fla = torch.autograd.grad((o.double() * do).sum(), fla_in)
    g_chk = torch.autograd.grad((oc.double() * do).sum(), chk_in)
    for name, a, b, r in zip("q k v g".split(), g_fla, g_chk, g_ref):
        assert torch.isfinite(a).all(), name
        assert _rel(a, r) <= 2 * _rel(bf(b), r), (name, _rel(a, r), _rel(bf(b), r))
