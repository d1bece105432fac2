"""GPU: the flex, varlen, grouped and triton paths against the reference (run with `pytest -m gpu`).

The reference is checked against an independent loop-built oracle on CPU
(test_attention_patterns.py); here it runs on upcast float32 inputs as the truth. Tolerance
principle: the fast path's relative L2 error (output and dq, dk, dv) must stay within 2x the error
of the reference run in the same low precision, plus 1e-3.
"""
from __future__ import annotations

import pytest
import torch

from petl.attention import PatternConfig, sparse_attention
from petl.attention.dispatch import unsupported_reason
from petl.attention.layout import layout_for
from tests.test_attention_oracle import Case, position_ids, transformers_mask

pytestmark = pytest.mark.gpu

CASES = [
    (Case("s2_gqa_d64_padded", "s2", batch=2, heads=8, kv_heads=2, length=1000, dim=64, pads=[(0, 0), (0, 300)]),
     torch.bfloat16),
    (Case("sf_d128_fp16", "sf", heads=8, kv_heads=8, length=2048, dim=128), torch.float16),
    (Case("s2_cyclic_gqa_d128", "s2", heads=8, kv_heads=4, length=1536, dim=128, params={"cyclic": True}),
     torch.bfloat16),
    (Case("sf_bidir_packed_d64", "sf", heads=4, kv_heads=2, length=1100, dim=64, docs=[[400, 700]],
          params={"sink_bidirectional": True}), torch.bfloat16),
]

#: no padding or packing: the layouts the grouped backend runs
STATIC_CASES = [
    (Case("s2_static_gqa_d128_odd_L", "s2", heads=8, kv_heads=2, length=1999, dim=128), torch.bfloat16),
    (Case("sf_static_d64_fp16", "sf", batch=2, heads=8, kv_heads=8, length=1536, dim=64), torch.float16),
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def run(case: Case, dtype: torch.dtype, backend: str, tensors, dout) -> list[torch.Tensor]:
    cfg = PatternConfig.from_params(case.pattern, **case.params)
    mask, pos = transformers_mask(case), position_ids(case)
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in tensors]
    out = sparse_attention(*leaves, cfg, attention_mask=None if mask is None else mask.cuda(),
                           position_ids=pos.cuda(), backend=backend)
    out.backward(dout.to(dtype))
    return [out.detach()] + [t.grad for t in leaves]


def inputs(case: Case):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(case.batch, case.heads, case.length, case.dim, device="cuda", generator=g)
    k, v = (torch.randn(case.batch, case.kv_heads, case.length, case.dim, device="cuda", generator=g)
            for _ in range(2))
    dout = torch.randn(case.batch, case.length, case.heads, case.dim, device="cuda", generator=g)
    return (q, k, v), dout


def compare(case: Case, dtype: torch.dtype, backend: str) -> None:
    tensors, dout = inputs(case)
    truth = run(case, torch.float32, "reference", tensors, dout)
    base = run(case, dtype, "reference", tensors, dout)
    fast = run(case, dtype, backend, tensors, dout)
    for name, f, b, t in zip(("out", "dq", "dk", "dv"), fast, base, truth):
        assert torch.isfinite(f).all(), (case.name, name)
        assert rel(f, t) <= 2 * rel(b, t) + 1e-3, (case.name, name, rel(f, t), rel(b, t))


@pytest.mark.parametrize("case,dtype", CASES, ids=[c.name for c, _ in CASES])
def test_flex_matches_reference(case: Case, dtype: torch.dtype) -> None:
    compare(case, dtype, "flex")


@pytest.mark.parametrize("backend", ["grouped", "triton"])
@pytest.mark.parametrize("case,dtype", CASES + STATIC_CASES, ids=[c.name for c, _ in CASES + STATIC_CASES])
def test_kernel_backends_match_reference(case: Case, dtype: torch.dtype, backend: str) -> None:
    """grouped and triton on every case they support (each says why it skips the others)."""
    cfg = PatternConfig.from_params(case.pattern, **case.params)
    query = torch.empty(case.batch, case.heads, case.length, case.dim, device="cuda", dtype=dtype)
    mask = transformers_mask(case)
    layout = layout_for(query, None if mask is None else mask.cuda(), position_ids(case).cuda()).with_groups(cfg)
    reason = unsupported_reason(backend, cfg, layout, query)
    if reason is not None:
        pytest.skip(reason)
    compare(case, dtype, backend)


def test_varlen_matches_reference() -> None:
    case = Case("sf0_varlen", "sf", batch=2, heads=8, kv_heads=2, length=1000, dim=128, pads=[(0, 0), (0, 300)],
                docs=[[600, 400], [700]], params={"n_sink": 0})
    compare(case, torch.bfloat16, "varlen")


def test_model_trains_on_auto() -> None:
    """A tiny llama on CUDA: the automatic backend (grouped: no padding) matches the reference backend."""
    from petl.attention import use_attention
    from petl.testing import tiny_causal_lm

    x = torch.randint(0, 128, (2, 256), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    losses = {}
    for backend in ("auto", "reference"):
        model = tiny_causal_lm("llama", attn_implementation="sdpa", max_position_embeddings=512).cuda().train()
        use_attention(model, "sf", backend=backend)
        out = model(x, labels=x)
        out.loss.backward()
        losses[backend] = (out.loss.item(), model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    assert abs(losses["auto"][0] - losses["reference"][0]) < 1e-4
    assert rel(losses["auto"][1], losses["reference"][1]) < 1e-3
