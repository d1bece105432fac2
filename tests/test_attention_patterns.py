"""S2/SF patterns against an independent loop-built mask, LongLoRA's literal roll, and each other.

Tolerance principle (STYLE 7): the error of petl's output (and of each input gradient) against
the float64 oracle must stay within 2x the error of plain eager attention run in the same dtype
with the oracle's mask, plus 1e-6 (relative L2 error). Equal masks pass easily; one wrong mask
entry does not.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from tests.test_attention_oracle import (Case, longlora_roll_attention, masked_attention, oracle_mask, position_ids,
                              transformers_mask)
from petl.attention import PatternConfig, sparse_attention
from petl.attention.dispatch import resolve_backend
from petl.attention.flex import build_block_mask
from petl.attention.layout import build_layout
from petl.attention.patterns import dense_mask

CASES = [
    Case("s2_basic", "s2"),
    Case("s2_gqa_len_not_multiple_of_group", "s2", heads=6, kv_heads=2, length=37),
    Case("s2_group_size_internal_pad", "s2", length=29, params={"group_size": 6}),
    Case("s2_tiny_length", "s2", heads=2, kv_heads=1, length=5),
    Case("s2_odd_heads_fraction", "s2", heads=5, kv_heads=5, length=24, params={"shift_head_fraction": 0.4}),
    Case("s2_all_heads_shifted", "s2", heads=2, kv_heads=2, length=26, params={"shift_head_fraction": 1.0}),
    Case("s2_ratio_half", "s2", length=50, dim=16, params={"group_ratio": 0.5}),
    Case("s2_cyclic", "s2", heads=4, kv_heads=2, length=40, params={"cyclic": True}),
    Case("s2_cyclic_internal_pad", "s2", length=45, dim=16, params={"cyclic": True}),
    Case("s2_batch_unequal_lengths", "s2", batch=3, kv_heads=2, length=33, pads=[(0, 0), (0, 7), (5, 0)]),
    Case("s2_cyclic_batch_padded", "s2", batch=2, length=30, pads=[(0, 5), (3, 0)], params={"cyclic": True}),
    Case("s2_packed_docs", "s2", batch=2, kv_heads=2, length=48, docs=[[20, 28], [10, 15, 23]]),
    Case("sf_default", "sf", kv_heads=2, length=36),
    Case("sf_no_sinks", "sf", length=36, params={"n_sink": 0}),
    Case("sf_quarter_unshifted", "sf", length=31, params={"n_sink": 2, "shift_head_fraction": 0.75}),
    Case("sf_bidirectional", "sf", kv_heads=1, length=28, params={"n_sink": 3, "sink_bidirectional": True}),
    Case("sf_packed_and_padded", "sf", batch=2, kv_heads=2, length=40, pads=[(0, 4), (6, 0)],
         docs=[[14, 22], [3, 31]]),
    Case("sf_bidirectional_packed", "sf", heads=6, kv_heads=3, length=40, docs=[[12, 9, 19]],
         params={"n_sink": 2, "sink_bidirectional": True}),
    Case("sf_sinks_longer_than_doc", "sf", length=20, docs=[[3, 17]], params={"n_sink": 5}),
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def inputs(case: Case, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape_q = (case.batch, case.heads, case.length, case.dim)
    shape_kv = (case.batch, case.kv_heads, case.length, case.dim)
    q, k, v = (torch.randn(s, generator=g, dtype=torch.float64) for s in (shape_q, shape_kv, shape_kv))
    dout = torch.randn(case.batch, case.length, case.heads, case.dim, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v)], dout


def run_with_grads(fn, tensors, dout):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def check_against_oracle(case: Case, dtype: torch.dtype = torch.float32, backend: str = "reference") -> None:
    cfg = PatternConfig.from_params(case.pattern, **case.params)
    mask4d, pos = transformers_mask(case), position_ids(case)
    oracle = oracle_mask(case)
    (q, k, v), dout = inputs(case, dtype)
    truth = run_with_grads(lambda *t: masked_attention(*t, oracle), [t.double() for t in (q, k, v)], dout)
    base = run_with_grads(lambda *t: masked_attention(*t, oracle), (q, k, v), dout)
    ours = run_with_grads(lambda *t: sparse_attention(*t, cfg, attention_mask=mask4d, position_ids=pos,
                                                      backend=backend), (q, k, v), dout)
    for name, o, b_, t in zip(("out", "dq", "dk", "dv"), ours, base, truth):
        assert torch.isfinite(o).all(), (case.name, name)
        assert rel(o, t) <= 2 * rel(b_, t) + 1e-6, (case.name, name, rel(o, t), rel(b_, t))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_reference_matches_oracle(case: Case) -> None:
    check_against_oracle(case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["s2_batch_unequal_lengths", "sf_packed_and_padded", "s2_cyclic"])
def test_reference_dtypes(name: str, dtype: torch.dtype) -> None:
    check_against_oracle(next(c for c in CASES if c.name == name), dtype)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_dense_mask_equals_oracle(case: Case) -> None:
    cfg = PatternConfig.from_params(case.pattern, **case.params)
    layout = build_layout(case.batch, case.length, torch.device("cpu"), transformers_mask(case),
                          position_ids(case)).with_groups(cfg)
    mask = dense_mask(cfg, case.heads, layout)
    _, spans = __import__("tests.test_attention_oracle", fromlist=["x"]).sample_spans(case)
    inside = torch.zeros(case.batch, 1, case.length, 1, dtype=torch.bool)
    for b, s in enumerate(spans):
        inside[b, 0, s[0][0]:s[-1][1]] = True
    assert torch.equal(mask & inside, oracle_mask(case))
    assert not (mask & ~inside).any()


def test_sf_without_sinks_equals_noncyclic_s2() -> None:
    case = Case("x", "s2", batch=2, heads=6, kv_heads=3, length=44, pads=[(0, 6), (0, 0)], docs=[[18, 20], [44]])
    (q, k, v), _ = inputs(case, torch.float32, seed=3)
    kw = dict(attention_mask=transformers_mask(case), position_ids=position_ids(case))
    s2 = sparse_attention(q, k, v, PatternConfig.from_params("s2"), **kw)
    sf = sparse_attention(q, k, v, PatternConfig.from_params("sf", n_sink=0), **kw)
    assert torch.equal(s2, sf)
    sinks = sparse_attention(q, k, v, PatternConfig.from_params("sf", n_sink=4), **kw)
    assert not torch.allclose(s2, sinks)


@pytest.mark.parametrize("length,heads,kv_heads,ratio", [(40, 4, 4, 0.25), (45, 4, 2, 0.25), (30, 6, 3, 0.5)])
def test_cyclic_equals_longlora_roll(length: int, heads: int, kv_heads: int, ratio: float) -> None:
    case = Case("roll", "s2", heads=heads, kv_heads=kv_heads, length=length, dim=8,
                params={"cyclic": True, "group_ratio": ratio})
    (q, k, v), _ = inputs(case, torch.float64, seed=1)
    G = int(length * ratio) // 2 * 2
    literal = longlora_roll_attention(q, k, v, G)
    ours = sparse_attention(q, k, v, PatternConfig.from_params("s2", cyclic=True, group_ratio=ratio))
    assert rel(ours, literal) < 1e-12
    # the leak is real: token 0 of a shifted head sees token npad - G/2 when that one exists
    npad = -(-length // G) * G
    assert bool(oracle_mask(case)[0, -1, 0, npad - G // 2]) if npad - G // 2 < length else True


def test_padding_invariance() -> None:
    """A sample's outputs do not depend on how much padding its batch adds, left or right."""
    for pattern, params in (("s2", {}), ("s2", {"cyclic": True}), ("sf", {"n_sink": 3})):
        cfg = PatternConfig.from_params(pattern, **params)
        alone = Case("a", pattern, length=26)
        (q, k, v), _ = inputs(alone, torch.float64, seed=5)
        ref = sparse_attention(q, k, v, cfg)
        for left, right in ((0, 9), (7, 0)):
            padded = Case("p", pattern, length=26 + left + right, pads=[(left, right)])
            z = lambda t: torch.nn.functional.pad(t, (0, 0, left, right), value=0.3)  # noqa: E731
            out = sparse_attention(z(q), z(k), z(v), cfg, attention_mask=transformers_mask(padded))
            assert rel(out[:, left:left + 26], ref) < 1e-12
            assert out[:, :left].abs().sum() == 0 and out[:, left + 26:].abs().sum() == 0


@pytest.mark.parametrize("name", ["s2_batch_unequal_lengths", "s2_cyclic_internal_pad", "sf_packed_and_padded",
                                  "sf_bidirectional_packed"])
def test_flex_block_tables(name: str) -> None:
    """Block tables: a block is listed iff some entry is allowed, and 'full' blocks are all allowed."""
    case = next(c for c in CASES if c.name == name)
    scale = 9  # stretch the shape over several 128-blocks without changing its structure
    big = Case(case.name, case.pattern, case.batch, case.heads, case.kv_heads, case.length * scale, case.dim,
               dict(case.params), [(a * scale, b * scale) for a, b in case.pads] if case.pads else None,
               [[n * scale for n in d] for d in case.docs] if case.docs else None)
    cfg = PatternConfig.from_params(big.pattern, **big.params)
    layout = build_layout(big.batch, big.length, torch.device("cpu"), transformers_mask(big),
                          position_ids(big)).with_groups(cfg)
    bm = build_block_mask(cfg, big.heads, layout)
    dense = dense_mask(cfg, big.heads, layout)
    nb = bm.kv_num_blocks.shape[-1]
    padded = torch.nn.functional.pad(dense, (0, nb * 128 - big.length, 0, nb * 128 - big.length))
    blocks = padded.view(big.batch, big.heads, nb, 128, nb, 128)
    assert torch.equal(bm.to_dense().bool(), blocks.any(5).any(3))
    full = torch.zeros_like(blocks.any(5).any(3))
    for b in range(big.batch):
        for h in range(big.heads):
            for qb in range(nb):
                full[b, h, qb, bm.full_kv_indices[b, h, qb, :bm.full_kv_num_blocks[b, h, qb]].long()] = True
    assert torch.equal(full, blocks.all(5).all(3))


@pytest.mark.parametrize("name", ["s2_cyclic_batch_padded", "sf_bidirectional_packed"])
def test_flex_mask_mod_forward_on_cpu(name: str) -> None:
    """The mask_mod as FlexAttention evaluates it (eager, forward only on CPU) matches the oracle."""
    case = next(c for c in CASES if c.name == name)
    (q, k, v), _ = inputs(case, torch.float32, seed=2)
    cfg = PatternConfig.from_params(case.pattern, **case.params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex without torch.compile warns that it is unfused
        out = sparse_attention(q, k, v, cfg, attention_mask=transformers_mask(case), position_ids=position_ids(case),
                               backend="flex")
    truth = masked_attention(q.double(), k.double(), v.double(), oracle_mask(case))
    assert rel(out, truth) < 1e-5


def test_backend_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = PatternConfig.from_params("s2")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend(cfg, cpu) == "reference" and resolve_backend(cfg, cuda) == "flex"
    monkeypatch.setenv("PETL_ATTENTION_BACKEND", "reference")
    assert resolve_backend(cfg, cuda) == "reference"
    assert resolve_backend(PatternConfig.from_params("s2", backend="flex"), cpu) == "flex"
    assert resolve_backend(cfg, cuda, backend="varlen") == "varlen"
    monkeypatch.setenv("PETL_ATTENTION_BACKEND", "fast")
    with pytest.raises(ValueError, match="PETL_ATTENTION_BACKEND='fast' is not a backend"):
        resolve_backend(cfg, cpu)


@pytest.mark.parametrize("pattern,params,message", [
    ("s3", {}, "unknown attention pattern 's3'"),
    ("s2", {"group_ratio": 0}, "group_ratio must be a number in"),
    ("s2", {"group_size": 7}, "group_size must be an even int"),
    ("s2", {"shift_head_fraction": 1.5}, "shift_head_fraction must be in"),
    ("s2", {"n_sink": 4}, "sink tokens belong to the 'sf' pattern"),
    ("sf", {"cyclic": True}, "SF-Attn is non-cyclic"),
    ("sf", {"n_sink": -1}, "n_sink must be an int"),
    ("sf", {"n_sink": 0, "sink_bidirectional": True}, "needs n_sink > 0"),
    ("sf", {"window": 3}, r"unknown sf attention parameter\(s\) \['window'\]"),
    ("s2", {"backend": "cuda"}, "backend must be one of"),
])
def test_validation_errors(pattern: str, params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        PatternConfig.from_params(pattern, **params)
    assert "\n" not in str(err.value)


def test_bidirectional_warns() -> None:
    with pytest.warns(UserWarning, match="future tokens"):
        PatternConfig.from_params("sf", sink_bidirectional=True)


def test_shape_errors() -> None:
    q = torch.randn(1, 3, 8, 4)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        sparse_attention(q, torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4), PatternConfig())
    with pytest.raises(ValueError, match=r"expected q \[B,Hq,L,D\]"):
        sparse_attention(q, torch.randn(1, 3, 7, 4), torch.randn(1, 3, 7, 4), PatternConfig())


@pytest.mark.parametrize("name", ["s2_batch_unequal_lengths", "s2_packed_docs", "sf_no_sinks", "s2_odd_heads_fraction"])
def test_varlen_segments_equal_pattern(name: str) -> None:
    """The varlen backend's cu_seqlens, read back as 'same segment and causal', give the pattern."""
    from petl.attention.varlen import _build_cuts

    case = next(c for c in CASES if c.name == name)
    cfg = PatternConfig.from_params(case.pattern, **case.params)
    layout = build_layout(case.batch, case.length, torch.device("cpu"), transformers_mask(case),
                          position_ids(case)).with_groups(cfg)
    h0 = cfg.shifted_from(case.heads)
    expected = oracle_mask(case)
    L = case.length
    for h in range(case.heads):
        cuts, longest = _build_cuts(layout, shifted=h >= h0)
        seg = torch.zeros(case.batch * L, dtype=torch.long)
        for a in cuts[1:-1]:
            seg[a:] += 1
        seg = seg.view(case.batch, L)
        got = (seg[:, :, None] == seg[:, None, :]) & torch.ones(L, L, dtype=torch.bool).tril()
        valid = expected[:, h].any(-1)  # rows of valid tokens
        assert torch.equal(got & valid[:, :, None], expected[:, h]), (name, h)
        assert longest == max(b - a for a, b in zip(cuts, cuts[1:]))
