"""Independent references for the S2/SF attention tests (no petl.attention code is used here).

* :func:`oracle_mask` writes the spec's rules (docs/attention.md, spec section 1-2) with plain
  Python loops, in a deliberately different form from petl's arithmetic rules: segments come
  from explicit cut lists (LongLoRA's cu_seqlens), the cyclic pattern from an explicit rolled
  order, sinks from explicit document spans.
* :func:`masked_attention` is eager softmax attention with a dense mask (float64 for truth).
* :func:`longlora_roll_attention` is LongLoRA's roll path done literally (roll the shifted heads
  by -G/2, cut into groups, causal inside each group, roll back).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class Case:
    """One named test shape. ``pads[b] = (left, right)``; ``docs[b]`` = document lengths."""

    name: str
    pattern: str
    batch: int = 1
    heads: int = 4
    kv_heads: int = 4
    length: int = 32
    dim: int = 8
    params: dict = field(default_factory=dict)
    pads: list | None = None
    docs: list | None = None

    def pad(self, b: int) -> tuple[int, int]:
        return self.pads[b] if self.pads else (0, 0)


def sample_spans(case: Case) -> tuple[list[bool], list[list[tuple[int, int]]]]:
    """Per sample: validity of each index and the document spans [a, b) in absolute indices."""
    valid, spans = [], []
    for b in range(case.batch):
        left, right = case.pad(b)
        start, end = left, case.length - right
        valid.append([start <= i < end for i in range(case.length)])
        lengths = case.docs[b] if case.docs else [end - start]
        assert sum(lengths) == end - start, case.name
        doc_spans, a = [], start
        for n in lengths:
            doc_spans.append((a, a + n))
            a += n
        spans.append(doc_spans)
    return valid, spans


def position_ids(case: Case) -> torch.Tensor:
    """Position ids restarting at 0 for each document (padding gets 0)."""
    _, spans = sample_spans(case)
    pos = torch.zeros(case.batch, case.length, dtype=torch.long)
    for b, doc_spans in enumerate(spans):
        for a, e in doc_spans:
            pos[b, a:e] = torch.arange(e - a)
    return pos


def transformers_mask(case: Case) -> torch.Tensor | None:
    """What transformers' sdpa_mask hands the attention: causal AND padding AND same document."""
    if not case.pads and not case.docs:
        return None
    valid, spans = sample_spans(case)
    L = case.length
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    m = torch.zeros(case.batch, 1, L, L, dtype=torch.bool)
    for b, doc_spans in enumerate(spans):
        doc = torch.full((L,), -1)
        for d, (a, e) in enumerate(doc_spans):
            doc[a:e] = d
        # like sdpa_mask: padding removes keys only; padded query rows keep their causal valid keys
        same_doc = (doc[:, None] == doc[None, :]) | (doc[:, None] < 0)
        m[b, 0] = causal & torch.tensor(valid[b])[None, :] & same_doc
    return m


def _group(n: int, params: dict) -> int:
    if params.get("group_size"):
        return params["group_size"]
    g = int(n * params.get("group_ratio", 0.25))
    return max(2, g - g % 2)


def oracle_mask(case: Case) -> torch.Tensor:
    """Boolean ``[B, H, L, L]`` from the spec's rules, by plain loops (cached per case)."""
    key = repr(case)
    if key not in _ORACLE_CACHE:
        _ORACLE_CACHE[key] = _oracle_mask(case)
    return _ORACLE_CACHE[key].clone()


_ORACLE_CACHE: dict[str, torch.Tensor] = {}


def _oracle_mask(case: Case) -> torch.Tensor:
    p = case.params
    n_sink = p.get("n_sink", 4 if case.pattern == "sf" else 0)
    bidir, cyclic = p.get("sink_bidirectional", False), p.get("cyclic", False)
    frac = p.get("shift_head_fraction", 0.5)
    first_shifted = math.floor(case.heads * (1 - frac) + 1e-9)
    valid, spans = sample_spans(case)
    L = case.length
    out = torch.zeros(case.batch, case.heads, L, L, dtype=torch.bool)
    for b in range(case.batch):
        start, end = spans[b][0][0], spans[b][-1][1]
        n = end - start
        G = _group(n, p)
        doc_of = {i: d for d, (a, e) in enumerate(spans[b]) for i in range(a, e)}
        sinks = {i for a, e in spans[b] for i in range(a, min(a + n_sink, e))}
        unshifted_cuts = list(range(0, n, G)) + [n]
        shifted_cuts = [0] + list(range(G // 2, n, G)) + [n]
        npad = -(-n // G) * G
        rolled = [(r + G // 2) % npad for r in range(npad)]  # token at rolled index r (LongLoRA roll by -G/2)
        rank = {tok: r for r, tok in enumerate(rolled)}
        for h in range(case.heads):
            shifted = h >= first_shifted
            if shifted and cyclic:  # segment = rolled group; order = rolled index
                seg = {p: rank[p] // G for p in range(n)}
                order = {p: rank[p] for p in range(n)}
            else:
                cuts = shifted_cuts if shifted else unshifted_cuts
                seg = {p: sum(c <= p for c in cuts) for p in range(n)}
                order = {p: p for p in range(n)}
            rows = []
            for i in range(start, end):
                pi = i - start
                row = [False] * L
                for j in range(start, end):
                    pj = j - start
                    if doc_of[i] != doc_of[j]:
                        continue
                    local = seg[pi] == seg[pj] and order[pj] <= order[pi]
                    sink = j in sinks and j <= i
                    row[j] = local or sink or (bidir and i in sinks)
                rows.append(row)
            out[b, h, start:end] = torch.tensor(rows, dtype=torch.bool).view(end - start, L)
    return out


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """Eager attention in the inputs' dtype. q ``[B,Hq,L,D]``, k/v ``[B,Hkv,L,D]``, mask
    ``[B,Hq,L,L]`` -> ``[B,L,Hq,D]``; rows without any allowed key give 0."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    has = mask.any(-1, keepdim=True)
    s = s.masked_fill(~mask, float("-inf")).masked_fill(~has, 0.0)
    prob = torch.softmax(s, dim=-1) * has
    return (prob @ v).transpose(1, 2)


def longlora_roll_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, G: int) -> torch.Tensor:
    """LongLoRA ``forward_noflashattn`` semantics for one unpadded row (float64 eager).

    q ``[1,H,N,D]``, k/v ``[1,Hkv,N,D]`` -> ``[1,N,H,D]``. N is padded internally to whole groups
    with keys that nobody may attend to; heads ``[H//2, H)`` are the shifted ones.
    """
    B, H, N, D = q.shape
    rep = H // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # repeat_kv before the split
    npad = -(-N // G) * G
    pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, npad - N))  # noqa: E731
    x = [pad(t).clone() for t in (q, k, v)]
    real = torch.arange(npad) < N
    real_rolled = [real, real.roll(-G // 2)]
    for t in x:
        t[:, H // 2:] = t[:, H // 2:].roll(-G // 2, dims=2)
    out = torch.zeros(B, H, npad, D, dtype=q.dtype)
    causal = torch.ones(G, G, dtype=torch.bool).tril()
    for h in range(H):
        keep = real_rolled[int(h >= H // 2)]
        for g0 in range(0, npad, G):
            sl = slice(g0, g0 + G)
            m = causal & keep[sl][None, :]
            s = x[0][:, h, sl] @ x[1][:, h, sl].transpose(-1, -2) * D ** -0.5
            has = m.any(-1, keepdim=True)
            s = s.masked_fill(~m, float("-inf")).masked_fill(~has, 0.0)
            out[:, h, sl] = (torch.softmax(s, -1) * has) @ x[2][:, h, sl]
    out[:, H // 2:] = out[:, H // 2:].roll(G // 2, dims=2)
    return out[:, :, :N].transpose(1, 2)


# --- hand-checked values for the oracle itself -------------------------------------------------

def _rows(mask: torch.Tensor) -> list[str]:
    return ["".join("x" if a else "." for a in row) for row in mask.tolist()]


def test_oracle_s2_hand_checked() -> None:
    """L=8, G=4: unshifted groups [0,4),[4,8); shifted [0,2),[2,6),[6,8) (no wrap)."""
    m = oracle_mask(Case("h", "s2", heads=2, kv_heads=2, length=8, params={"group_size": 4}))
    assert _rows(m[0, 0]) == ["x.......", "xx......", "xxx.....", "xxxx....",
                              "....x...", "....xx..", "....xxx.", "....xxxx"]
    assert _rows(m[0, 1]) == ["x.......", "xx......", "..x.....", "..xx....",
                              "..xxx...", "..xxxx..", "......x.", "......xx"]


def test_oracle_cyclic_hand_checked() -> None:
    """L=8, G=4, cyclic: shifted group {6,7,0,1} in rolled order 6,7,0,1 lets 0 and 1 see 6 and 7."""
    m = oracle_mask(Case("h", "s2", heads=2, kv_heads=2, length=8, params={"group_size": 4, "cyclic": True}))
    assert _rows(m[0, 1]) == ["x.....xx", "xx....xx", "..x.....", "..xx....",
                              "..xxx...", "..xxxx..", "......x.", "......xx"]


def test_oracle_sf_hand_checked() -> None:
    """SF, L=8, G=4, 1 sink, and a packed second document starting at 5 (its own sink)."""
    m = oracle_mask(Case("h", "sf", heads=2, kv_heads=2, length=8, docs=[[5, 3]],
                         params={"group_size": 4, "n_sink": 1}))
    assert _rows(m[0, 0]) == ["x.......", "xx......", "xxx.....", "xxxx....",
                              "x...x...", ".....x..", ".....xx.", ".....xxx"]
    assert _rows(m[0, 1]) == ["x.......", "xx......", "x.x.....", "x.xx....",
                              "x.xxx...", ".....x..", ".....xx.", ".....xxx"]


def test_oracle_longlora_worked_example() -> None:
    """LongLoRA issue #126: N=8192, G=2048 -> shifted segment sizes G/2, G, G, G, G/2."""
    n, G = 8192, 2048
    cuts = [0] + list(range(G // 2, n, G)) + [n]
    assert [b - a for a, b in zip(cuts, cuts[1:])] == [1024, 2048, 2048, 2048, 1024]
