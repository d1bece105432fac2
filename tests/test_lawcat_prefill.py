"""petl's forward-only LAWCAT prefill kernels (petl/linear/kernel_prefill.py) against float64 references.

On CPU the kernels run in Triton's interpreter: ``test_prefill_under_triton_interpreter`` starts a
child pytest of this file with ``TRITON_INTERPRET=1`` (set before Triton is imported there, so no
other test module sees it) and the ``child`` tests run inside it, on tiny shapes. With ``-m gpu``
the ``cuda`` tests run compiled, in bf16/fp16 at 1k-8k tokens.

Reference: :func:`petl.linear.naive.naive_recurrent_gla` over ``[v, 1]`` (the ones column gives
the normaliser) in float64 on the same rounded inputs (on the GPU the float64 chunked form, for
speed). Tolerance rule (STYLE.md §7): the kernel's relative L2 error and that of the same algorithm
in PyTorch at the kernel's precision (petl's chunked form in float32, output in the kernel's
dtype), both against float64, satisfy
``err_kernel <= 2 * err_torch (+ one float32 eps for float32 results)``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.interpreter_child import HAS_TRITON, child_only, in_child, run_child_pytest
from tests.test_lawcat_kernels import bf16_interpreter  # noqa: F401, F811  (fixture: GPU bf16 semantics on CPU)

CHILD_ENV = "PETL_LAWCAT_PREFILL_CHILD"
IN_CHILD = in_child(CHILD_ENV)
child = child_only(CHILD_ENV)


@pytest.mark.skipif(IN_CHILD or not HAS_TRITON, reason="parent of the interpreter run / no triton")
def test_prefill_under_triton_interpreter():
    run_child_pytest(__file__, CHILD_ENV, min_passed=17, timeout=600)


# ----------------------------------------------------------------------------- helpers
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _check(name: str, kernel: torch.Tensor, torch_same: torch.Tensor, ref: torch.Tensor,
           extra: float = 0.0) -> None:
    """The rule above, plus ``extra`` for the two explained float32 cases (:func:`_state_allowance`)."""
    assert torch.isfinite(kernel).all(), f"{name}: non-finite values (unwritten output?)"
    ek, et = _rel(kernel, ref), _rel(torch_same, ref)
    bound = 2 * et + (torch.finfo(torch.float32).eps if kernel.dtype == torch.float32 else 0.0) + extra
    assert ek <= bound, f"{name}: kernel error {ek:.3g} > 2 x torch error {et:.3g} + eps"


@pytest.fixture
def poison(monkeypatch):
    """Every kernel output (and the chunk-state buffers) starts as NaN, so unwritten elements fail."""
    from petl.linear import kernel_features, kernel_normaliser, kernel_prefill

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    for mod in (kernel_features, kernel_normaliser, kernel_prefill):
        monkeypatch.setattr(mod, "_empty", nan_empty)


def _state_allowance(logits, valid, dtype, normalizer=16.0, chunk=64) -> tuple[float, float]:
    """Extra relative error allowed on the float32 final states ``(S_T, z_T)``; both explained:

    * float32 rounding of the in-chunk cumulative log gate: an absolute error of about
      ``|G| * eps32`` becomes the same relative error of the weights ``exp(G_last - G)``. The
      kernel (``tl.cumsum``, a tree) and torch (sequential) sum in different orders, so their
      errors are of one size but not a 2x-comparable pair when ``|G|`` is large (strong gates);
    * S_T of a bf16/fp16 kernel: the update's float32 operand goes through two 8-bit-mantissa
      halves (kernel_prefill.py, "Precision"): 2^-16.
    """
    g = F.logsigmoid(logits.double()) / normalizer
    if valid is not None:
        g = torch.where(valid[:, :, None, None], g, torch.zeros_like(g))
    T = g.shape[1]
    g = F.pad(g, (0, 0, 0, 0, 0, (-T) % chunk))
    scale = g.view(g.shape[0], -1, chunk, *g.shape[2:]).sum(2).abs().max().item()
    cum = scale * torch.finfo(torch.float32).eps
    return cum + (2.0 ** -16 if dtype != torch.float32 else 0.0), cum


def _ones_column_gla(core, phi_q, phi_k, v, logits, normalizer, valid, state, eps, dtype):
    """The normalised GLA through ``core`` (a GLA over ``[v, 1]``; the ones column gives the
    normaliser) at ``dtype``: ``(o, S_T, z_T)``; o = num / (den + eps), not cast. GQA: the log
    gates and v are repeated over each kv head's group; padded rows get g = 0, k = 0, v = 0."""
    G = phi_q.shape[2] // v.shape[2]
    g = (F.logsigmoid(logits.to(dtype)) / normalizer).repeat_interleave(G, dim=2)
    k, vv = phi_k.to(dtype), v.to(dtype).repeat_interleave(G, dim=2)
    if valid is not None:
        m = valid[:, :, None, None]
        g, k, vv = (torch.where(m, t, torch.zeros_like(t)) for t in (g, k, vv))
    v_aug = torch.cat([vv, torch.ones_like(vv[..., :1])], dim=-1)
    s0 = torch.cat([state[0].to(dtype), state[1].to(dtype)[..., None]], dim=-1) if state is not None else None
    num, s = core(phi_q.to(dtype), k, v_aug, g, s0)
    return num[..., :-1] / (num[..., -1:] + eps), s[..., :-1], s[..., -1]


def reference(phi_q, phi_k, v, logits, normalizer, valid=None, state=None, eps=1e-10, dtype=torch.float64):
    """The recurrent reference (:func:`~petl.linear.naive.naive_recurrent_gla`) at ``dtype``."""
    from petl.linear.naive import naive_recurrent_gla

    return _ones_column_gla(naive_recurrent_gla, phi_q, phi_k, v, logits, normalizer, valid, state, eps, dtype)


def chunked_reference(phi_q, phi_k, v, logits, normalizer, valid=None, state=None, eps=1e-10,
                      dtype=torch.float32):
    """The same maths through petl's chunked PyTorch form (cumulative log gates per chunk, as the
    kernels use) at ``dtype``: the same-precision PyTorch computation for the tolerance rule."""
    from petl.linear.chunked import chunked_gla

    return _ones_column_gla(chunked_gla, phi_q, phi_k, v, logits, normalizer, valid, state, eps, dtype)


def make_inputs(B, T, H, Hkv, Fd, V, dtype, device="cpu", strong=False, pad=True, state=True, seed=0):
    """Positive features (softmax rows), random values and logits; the inputs rounded to ``dtype``.

    ``strong``: logits down to about -960, i.e. log gates down to -60 per token (normalizer 16),
    so whole chunks decay by far more than e^30 and the exact score path runs."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    phi_q, phi_k = mk(B, T, H, Fd).softmax(-1), mk(B, T, H, Fd).softmax(-1)
    v, logits = mk(B, T, Hkv, V), mk(B, T, Hkv, Fd) * 3
    if strong:
        logits = logits - 960 * torch.rand(B, T, Hkv, Fd, generator=gen, dtype=torch.float64)
    valid = None
    if pad:
        valid = torch.ones(B, T, dtype=torch.bool)
        valid[-1, : max(1, T // 5)] = False                 # left padding of the last sequence
    st = (mk(B, H, Fd, V), mk(B, H, Fd).abs() * 3) if state else None
    cast = lambda t: t.to(dtype).to(device)  # noqa: E731
    phi_q, phi_k, v, logits = map(cast, (phi_q, phi_k, v, logits))
    if valid is not None:
        valid = valid.to(device)
        phi_k = torch.where(valid[:, :, None, None], phi_k, torch.zeros_like(phi_k))  # as conv_feature_map does
    if st is not None:
        st = (st[0].float().to(device), st[1].float().to(device))
    return phi_q, phi_k, v, logits, valid, st


def _run_kernel_case(B, T, H, Hkv, Fd, V, dtype, blocks, device="cpu", strong=False, pad=True, state=True):
    from petl.linear.kernel_prefill import lawcat_prefill

    phi_q, phi_k, v, logits, valid, st = make_inputs(B, T, H, Hkv, Fd, V, dtype, device, strong, pad, state)
    o, S, z = lawcat_prefill(phi_q, phi_k, v, logits, 16.0, valid, st, output_final_state=True, blocks=blocks)
    ref = reference(phi_q, phi_k, v, logits, 16.0, valid, st)
    same = chunked_reference(phi_q, phi_k, v, logits, 16.0, valid, st)
    assert o.dtype == dtype and S.dtype == z.dtype == torch.float32
    extra_s, extra_z = _state_allowance(logits, valid, dtype, chunk=(blocks or {}).get("chunk", 64))
    _check("o", o, same[0].to(dtype), ref[0])
    _check("S_T", S, same[1], ref[1], extra_s)
    _check("z_T", z, same[2], ref[2], extra_z)
    return o


# ----------------------------------------------------------------------------- CPU (interpreter child)
SMALL = {"chunk": 16, "state_bk": 16, "state_bv": 16, "out_bv": 16}
# (B, T, H, H_kv, F, V, blocks, strong gates, padding, initial state); T = 37 = 2 * 16 + 5 ends on a
# partial chunk; T = 5 is shorter than one chunk (one chunk: the scan's read-ahead is all masked);
# F = V = 64/128 use the whole-width tiles; the "recurrent" state pass (one sequential kernel)
# instead of the default chunk updates + scan.
KERNEL_CASES = {
    "t37-gqa-pad-state": (2, 37, 4, 2, 16, 16, SMALL, False, True, True),
    "t5-shorter-than-chunk": (1, 5, 2, 1, 16, 32, SMALL, False, False, False),
    "t40-strong-gates": (2, 40, 2, 2, 16, 16, SMALL, True, True, True),
    "t33-several-blocks": (1, 33, 2, 1, 32, 32, SMALL, False, True, True),
    "f64-v64": (1, 20, 2, 1, 64, 64, {"chunk": 16, "out_bv": 32}, False, True, True),
    "f128-v128": (1, 18, 1, 1, 128, 128, {"chunk": 16}, False, False, True),
    "recurrent-state-pass": (2, 37, 4, 2, 16, 16, {**SMALL, "state_mode": "recurrent"}, True, True, True),
    "grouped-2-gqa-strong": (2, 37, 4, 2, 16, 16, {**SMALL, "state_mode": "grouped", "group": 2}, True, True, True),
    "grouped-4-one-chunk": (1, 5, 2, 1, 16, 32, {**SMALL, "state_mode": "grouped", "group": 4}, False, False, True),
    "grouped-4-f64-blocks": (1, 70, 2, 1, 64, 64, {"chunk": 16, "out_bv": 32, "update_bv": 32, "group_bk": 32,
                                                    "state_mode": "grouped", "group": 4}, False, True, True),
}


@child
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_prefill_kernels_interpreted(case, poison):
    B, T, H, Hkv, Fd, V, blocks, strong, pad, state = KERNEL_CASES[case]
    _run_kernel_case(B, T, H, Hkv, Fd, V, torch.float32, blocks, strong=strong, pad=pad, state=state)


@child
def test_strong_gates_take_the_exact_path_interpreted(poison):
    """Both score paths agree where both are valid, and the exact one runs for strong gates."""
    from petl.linear.kernel_prefill import lawcat_prefill

    phi_q, phi_k, v, logits, valid, st = make_inputs(1, 32, 2, 1, 16, 16, torch.float32, pad=True)
    fast = lawcat_prefill(phi_q, phi_k, v, logits, 16.0, valid, st, blocks=SMALL)[0]
    exact = lawcat_prefill(phi_q, phi_k, v, logits, 16.0, valid, st, blocks={**SMALL, "span_max": -1.0})[0]
    torch.testing.assert_close(fast, exact, rtol=1e-5, atol=1e-6)
    # strong gates with the factored path forced would overflow: the guard is what keeps them finite
    phi_q, phi_k, v, logits, valid, st = make_inputs(1, 32, 2, 1, 16, 16, torch.float32, strong=True)
    forced = lawcat_prefill(phi_q, phi_k, v, logits, 16.0, valid, st, blocks={**SMALL, "span_max": 1e9})[0]
    assert not torch.isfinite(forced).all()


@child
def test_prefill_in_two_pieces_equals_one_interpreted(poison):
    from petl.linear.kernel_prefill import lawcat_prefill

    phi_q, phi_k, v, logits, valid, st = make_inputs(2, 41, 4, 2, 16, 16, torch.float32)
    whole, S, z = lawcat_prefill(phi_q, phi_k, v, logits, 16.0, valid, st, output_final_state=True, blocks=SMALL)
    cut = 23
    parts = [t[:, :cut] for t in (phi_q, phi_k, v, logits, valid)]
    rest = [t[:, cut:] for t in (phi_q, phi_k, v, logits, valid)]
    o1, S1, z1 = lawcat_prefill(*parts[:4], 16.0, parts[4], st, output_final_state=True, blocks=SMALL)
    o2, S2, z2 = lawcat_prefill(*rest[:4], 16.0, rest[4], (S1, z1), output_final_state=True, blocks=SMALL)
    for a, b in ((torch.cat([o1, o2], 1), whole), (S2, S), (z2, z)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@child
@pytest.mark.parametrize("states", ["float32", "bfloat16"])
def test_prefill_bf16_interpreted(states, poison, bf16_interpreter):
    """bf16 inputs (split state-update dots); chunk start states kept in float32 or bf16."""
    _run_kernel_case(1, 37, 4, 2, 16, 16, torch.bfloat16, {**SMALL, "state_dtype": getattr(torch, states)})


def _layer(H=4, Hkv=2, d=16, **cfg):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    from petl.linear import LawcatAttention, LawcatConfig

    lcfg = LlamaConfig(hidden_size=H * d, num_attention_heads=H, num_key_value_heads=Hkv, head_dim=d,
                       num_hidden_layers=1, intermediate_size=32)
    torch.manual_seed(0)
    layer = LawcatAttention(LlamaAttention(lcfg, layer_idx=0),
                            LawcatConfig(conv_init="random", feature_map_init="random", **cfg))
    with torch.no_grad():  # data-dependent gates, away from the constant init
        layer.lawcat_gate.up.weight.normal_(0, 0.5)
        layer.lawcat_gate.up.bias.normal_(0, 1)
    return lcfg, layer


def _attend(layer, inputs, valid, dtype, kernels: str, backend: str):
    """``layer.attend`` on ``inputs`` (x, q, k, v) with the layer and inputs in ``dtype`` and the
    given kernels switch and backend."""
    layer.to(dtype)
    layer.lawcat_config.kernels, layer.lawcat_config.backend = kernels, backend
    return layer.attend(*(t.to(dtype) for t in inputs), valid)


def _spy(monkeypatch):
    from petl.linear import kernel_prefill

    calls = []
    real = kernel_prefill.lawcat_prefill
    monkeypatch.setattr(kernel_prefill, "lawcat_prefill", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@child
def test_layer_attend_no_grad_uses_prefill_kernels_interpreted(poison, monkeypatch):
    """``LawcatAttention.attend`` under no_grad (kernels on) vs the float32 and float64 PyTorch
    reference path, with GQA and left padding; with grad enabled it stays on the training path."""
    calls = _spy(monkeypatch)
    _, layer = _layer(backend="chunked")
    layer.double()
    B, T = 2, 37
    x = torch.randn(B, T, layer.q_proj.in_features, dtype=torch.float64)
    q = torch.randn(B, T, 4, 16, dtype=torch.float64)
    k, v = torch.randn(B, T, 2, 16, dtype=torch.float64), torch.randn(B, T, 2, 16, dtype=torch.float64)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[-1, :6] = False
    q[~valid], k[~valid], v[~valid] = float("nan"), float("nan"), float("nan")  # padded rows may hold NaN

    with torch.no_grad():
        ref = _attend(layer, (x, q, k, v), valid, torch.float64, "off", "reference")
        same = _attend(layer, (x, q, k, v), valid, torch.float32, "off", "reference")
        out = _attend(layer, (x, q, k, v), valid, torch.float32, "on", "chunked")
    assert calls == [1]
    _check("attend", out, same, ref)
    # grad enabled, parameters require grad: the training path
    _attend(layer, (x, q, k, v), valid, torch.float32, "on", "chunked")
    assert calls == [1]


@child
def test_layer_cache_continuation_through_prefill_interpreted(poison, monkeypatch):
    """Prefill in pieces through a LawcatCache (the kernel's initial and final states), then a
    decode step, equals one forward over the whole sequence."""
    from petl.linear import LawcatCache

    calls = _spy(monkeypatch)
    lcfg, layer = _layer(backend="chunked", kernels="on")
    layer.float()
    x = torch.randn(2, 30, layer.q_proj.in_features)
    with torch.no_grad():
        full, _ = layer(x, position_embeddings=None)
        cache = LawcatCache(lcfg, [0])
        pieces = [layer(x[:, a:b], position_embeddings=None, past_key_values=cache)[0]
                  for a, b in [(0, 13), (13, 14), (14, 30)]]
    assert len(calls) == 3  # two prefills + the full forward; the decode step (T = 1) is recurrent
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=2e-5, atol=2e-5)


@child
def test_unsupported_widths_fall_back_without_error(monkeypatch):
    calls = _spy(monkeypatch)
    _, layer = _layer(H=2, Hkv=1, d=24, backend="chunked", kernels="on")   # 2f = 24: not a tile width
    layer.float()
    with torch.no_grad():
        out, _ = layer(torch.randn(1, 9, layer.q_proj.in_features), position_embeddings=None)
    assert calls == [] and torch.isfinite(out).all()


@pytest.mark.skipif(IN_CHILD or not HAS_TRITON, reason="host-side arithmetic, no kernel runs / no triton")
def test_group_size_covers_the_chunks_and_keeps_the_gpu_busy(monkeypatch):
    """Chunks per grouped program: the table's GROUP, no more than the chunks need (a power of 2),
    fewer on CUDA when programs would not fill the multiprocessors; an explicit group is kept."""
    from types import SimpleNamespace

    from petl.linear import kernel_prefill as kp

    monkeypatch.setattr(kp, "GROUP", 16)                    # the rule, not today's table entry
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert kp._group_size(1000, 32, {}, cpu) == 16
    assert [kp._group_size(nc, 32, {}, cpu) for nc in (1, 2, 3, 5, 9)] == [1, 2, 4, 8, 16]
    assert kp._group_size(3, 32, {"group": 8}, cpu) == 8
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: SimpleNamespace(multi_processor_count=132))
    assert kp._group_size(128, 64, {}, cuda) == 16          # 8 groups x 64 = 512 programs >= 2 x 132
    assert kp._group_size(128, 8, {}, cuda) == 2            # 4 per group: 32 x 8 = 256 < 264; 2: 512
    with pytest.raises(ValueError, match="power of 2"):
        kp._group_size(8, 32, {"group": 3}, cpu)


@pytest.mark.skipif(IN_CHILD or not HAS_TRITON, reason="argument checks, no kernel runs / no triton")
def test_bad_arguments_get_one_line_errors():
    from petl.linear.kernel_prefill import lawcat_prefill

    q, v, x = torch.zeros(1, 5, 4, 16), torch.zeros(1, 5, 2, 16), torch.zeros(1, 5, 2, 16)
    with pytest.raises(ValueError, match="H_kv dividing"):
        lawcat_prefill(q, q, torch.zeros(1, 5, 3, 16), x, 16.0)
    with pytest.raises(ValueError, match="gate logits"):
        lawcat_prefill(q, q, v, torch.zeros(1, 5, 4, 16), 16.0)
    with pytest.raises(ValueError, match="take"):
        lawcat_prefill(torch.zeros(1, 5, 4, 24), torch.zeros(1, 5, 4, 24), v, torch.zeros(1, 5, 2, 24), 16.0)
    with pytest.raises(ValueError, match="at least one token"):
        lawcat_prefill(q[:, :0], q[:, :0], v[:, :0], x[:, :0], 16.0)
    with pytest.raises(ValueError, match="or neither"):
        lawcat_prefill(q, q, v, x, 16.0, initial_state=(torch.zeros(1, 4, 16, 16), None))


# ----------------------------------------------------------------------------- GPU (compiled)
@pytest.mark.gpu
@pytest.mark.parametrize("case", [(torch.bfloat16, 1, 1000, 8, 2, 128, 128, False),
                                  (torch.float16, 2, 4097, 4, 4, 128, 128, False),
                                  (torch.bfloat16, 1, 8192, 4, 1, 64, 64, False),
                                  (torch.bfloat16, 1, 2048, 4, 2, 128, 128, True)],
                         ids=["bf16-1k-gqa", "fp16-4k", "bf16-8k-f64", "bf16-2k-strong"])
@pytest.mark.parametrize("states", ["model-dtype", "float32", "scan", "grouped", "grouped-f32"])
def test_cuda_prefill_kernels(case, states, poison):
    """Kernel vs float64 chunked form; the same-precision path is the float32 chunked form. Chunk
    start states in the model dtype (the default) and in float32; the "scan" and "grouped" (the
    default) state passes."""
    from petl.linear.kernel_prefill import lawcat_prefill

    dtype, B, T, H, Hkv, Fd, V, strong = case
    phi_q, phi_k, v, logits, valid, st = make_inputs(B, T, H, Hkv, Fd, V, dtype, "cuda", strong)
    o, S, z = lawcat_prefill(phi_q, phi_k, v, logits, 16.0, valid, st, output_final_state=True,
                             blocks={"model-dtype": None, "float32": {"state_dtype": torch.float32},
                                     "scan": {"state_mode": "scan"},
                                     "grouped": {"state_mode": "grouped", "group": 4},
                                     "grouped-f32": {"state_mode": "grouped", "state_dtype": torch.float32}}[states])
    args = (phi_q, phi_k, v, logits, 16.0, valid, st)
    ref, same = chunked_reference(*args, dtype=torch.float64), chunked_reference(*args)
    extra_s, extra_z = _state_allowance(logits, valid, dtype)
    _check("o", o, same[0].to(dtype), ref[0])
    _check("S_T", S, same[1], ref[1], extra_s)
    _check("z_T", z, same[2], ref[2], extra_z)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1024, 8192])
def test_cuda_layer_attend_prefill(T, poison):
    """The whole attend under no_grad through the prefill kernels (bf16) vs the PyTorch path."""
    _, layer = _layer(H=4, Hkv=2, d=128, backend="chunked")
    layer.cuda().double()
    gen = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(2, T, layer.q_proj.in_features, device="cuda", dtype=torch.float64, generator=gen)
    q = torch.randn(2, T, 4, 128, device="cuda", dtype=torch.float64, generator=gen)
    k, v = (torch.randn(2, T, 2, 128, device="cuda", dtype=torch.float64, generator=gen) for _ in range(2))
    valid = torch.ones(2, T, dtype=torch.bool, device="cuda")
    valid[-1, :100] = False
    x, q, k, v = (t.to(torch.bfloat16).double() for t in (x, q, k, v))
    layer.to(torch.bfloat16).double()

    with torch.no_grad():
        ref = _attend(layer, (x, q, k, v), valid, torch.float64, "off", "chunked")
        same = _attend(layer, (x, q, k, v), valid, torch.bfloat16, "off", "chunked")
        out = _attend(layer, (x, q, k, v), valid, torch.bfloat16, "on", "chunked")
    _check("attend", out, same, ref)


@pytest.mark.gpu
def test_cuda_generate_matches_existing_fused_path(monkeypatch):
    """generate() on a tiny converted Llama (bf16, cache): the prefill kernels vs the other fused path."""
    from petl.linear import LawcatConfig, convert_to_lawcat, kernel_prefill
    from petl.testing import tiny_causal_lm

    model = tiny_causal_lm("llama", dtype=torch.bfloat16, attn_implementation="sdpa", hidden_size=256,
                           num_heads=2, num_kv_heads=1).cuda()
    convert_to_lawcat(model, LawcatConfig(backend="chunked", kernels="on"))
    model.generation_config.eos_token_id = None
    ids = torch.randint(0, 128, (2, 300), generator=torch.Generator().manual_seed(0)).cuda()
    mask = torch.ones_like(ids)
    mask[1, :37] = 0
    calls = _spy(monkeypatch)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
        assert calls, "the prefill kernels did not run"
        monkeypatch.setattr(kernel_prefill, "prefill_supported", lambda *a: False)
        base = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True)
    first, first_base = out.logits[0].float(), base.logits[0].float()
    assert _rel(first, first_base) < 2e-2, _rel(first, first_base)
    assert (out.sequences == base.sequences).float().mean() > 0.9
