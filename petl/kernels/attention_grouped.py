"""Grouped backend: S2/SF attention as a few fused causal SDPA calls, segments folded into the batch.

For a *static* layout (no padding, no packed documents: every sample spans the whole row) the
S2/SF pattern of :mod:`petl.attention.patterns` is block-diagonal per head class: each segment is
an independent causal attention. So the pattern is a handful of
``F.scaled_dot_product_attention(..., is_causal=True)`` calls, PyTorch's fastest fused kernels
(flash / cuDNN), on tensors whose batch dimension holds the segments.

The plan, per head class (unshifted heads ``[0, h0)``, shifted heads ``[h0, H)``):

* A *segment* is a list of runs of positions, in causal order: one run for non-cyclic segments,
  two for cyclic S2's wrapped group (LongLoRA's roll: the tokens after the last cut, then the
  first G/2 tokens). Rolling is never materialised; only the wrapped group is copied.
* Segments with equal run lengths and sink counts whose starts are evenly spaced form a *bucket*:
  one SDPA call with batch ``B * count``. S2 with ``L % G == 0`` is three calls: all unshifted
  groups, the inner shifted groups ``[G/2 + kG, 3G/2 + kG)``, and the two shifted half-groups.
* SF: a segment starting at ``a`` also sees the ``s = min(a, n_sink)`` sinks before it. In the
  default ``"square"`` mode they are prepended to its keys and queries, whose extra output rows
  are dropped: then the concatenation is square and plain ``is_causal`` gives exactly "sinks +
  causal inside the segment", on any SDPA kernel. ``"lower_right"`` mode prepends to the keys only
  and uses ``causal_lower_right`` (PyTorch routes it to its flash kernel). ``"merge"`` mode
  (opt-in, CUDA half precision) runs exactly S2's buckets through a fused causal op that returns
  its log-sum-exp and merges the sink columns in afterwards
  (:mod:`petl.kernels.attention_sink_merge`); elsewhere it falls back to ``"square"``. Segments
  that contain the sinks (``a == 0``) see none extra, so nothing is seen twice.

Copies: a bucket of back-to-back segments is a *view* of q/k/v in the ``[B, L, H, D]`` memory
layout that transformers produces (``.view(B, L, H, D).transpose(1, 2)``) when ``B == 1`` or the
bucket spans the whole row; otherwise it is gathered (one copy). Two autograd Functions move the
pieces in and out: gradients of all pieces are written straight into one buffer per input, and
the output pieces into one ``[B, L, H, D]`` buffer, instead of autograd's zero-filled
slice-backward per piece. SDPA itself runs in the ordinary autograd graph (gradient checkpointing
works as usual).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:  # petl.attention imports this module: no runtime import back
    from petl.attention.layout import SequenceLayout
    from petl.attention.patterns import PatternConfig

#: how SF sinks join a segment: "square" (queries and keys, plain is_causal), "lower_right" (keys
#: only, ``causal_lower_right``) or "merge" (log-sum-exp merge after S2's segment calls; "square"
#: where no fused segment op can run). "square" measured fastest on the H200
#: (benchmarks/results/attention_kernels.json: 32k GQA fwd+bwd square 17.2 ms, merge 18.0 ms).
SINK_MODE = "square"
#: "merge" mode's segment kernel (one of ``attention_sink_merge.SEGMENT_OPS``), or None: the
#: fastest measured fused op on CUDA (:data:`CUDA_SEGMENT_OP`), "square" mode elsewhere.
SEGMENT_OP: str | None = None
CUDA_SEGMENT_OP = "cudnn"
#: "merge" mode's sink columns as Triton kernels (True), PyTorch ops (False), or None: per
#: :func:`petl.kernels.switch.use_kernels`.
MERGE_KERNELS: bool | None = None
#: GQA: pass un-repeated K/V with ``enable_gqa=True`` when the head split falls on a KV group
#: boundary (no copy); False repeats the K/V heads. Chosen from the same measurements.
NATIVE_GQA = True
#: SDPA kernels to prefer, in order (names of ``torch.nn.attention.SDPBackend``), or None for
#: PyTorch's own choice.
SDPA_PRIORITY: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Part:
    """Positions ``[start + g*stride, start + g*stride + length)`` of segment ``g`` of a bucket.

    ``stride == 0`` means the same positions for every segment (the prepended sinks).
    """

    start: int
    stride: int
    length: int


@dataclass(frozen=True)
class Bucket:
    """``count`` segments of the query heads ``[lo, hi)``, run as one SDPA call.

    ``sink`` sink positions (``[0, sink)``) are prepended to the segment's ``runs``; in "merge"
    mode ``sink`` is the widest sink set of the bucket's segments (segment ``g`` sees
    ``min(its start, n_sink)``).
    """

    lo: int
    hi: int
    count: int
    sink: int
    runs: tuple[Part, ...]

    @property
    def rows(self) -> int:
        """Query rows of one segment (sinks excluded)."""
        return sum(p.length for p in self.runs)


@dataclass(frozen=True)
class Plan:
    """Buckets of one call shape, and how each input is cut into SDPA operands.

    ``q_specs``/``kv_specs``: per bucket ``(lo, hi, count, parts, queries)`` over the query or
    key/value heads (``queries``: only the segment runs carry outputs and gradients; prepended
    sink rows are filler); ``kv_exact``: the runs of k/v cover each element exactly once.
    "merge" mode: ``sink_specs`` cut the sinks ``[B, hk, sink, D]`` of the buckets with
    ``sink_index[i] >= 0``.
    """

    buckets: tuple[Bucket, ...]
    q_specs: tuple
    kv_specs: tuple
    kv_exact: bool
    kv_ranges: tuple[tuple[int, int], ...]
    sink_specs: tuple = ()
    sink_index: tuple[int, ...] = ()


def grouped_unsupported(cfg: PatternConfig, layout: SequenceLayout, query: torch.Tensor) -> str | None:
    """Why the grouped backend cannot run this call, or None when it can."""
    if not layout.static:
        return "the batch has padding or packed documents, so segments differ per sample (needs full, unpacked rows)"
    if cfg.sink_bidirectional:
        return "sink_bidirectional=True makes sink rows non-causal"
    return None


def _segments(cfg: PatternConfig, seq: int, group: int, shifted: bool) -> list[tuple[tuple[int, int], ...]]:
    """Segments of one head class as tuples of runs ``(start, length)`` in causal order."""
    half = group // 2
    if shifted and cfg.cyclic:
        n_pad = -(-seq // group) * group  # the roll's modulus: the row padded to whole groups
        segments = []
        for r0 in range(0, n_pad, group):  # rolled group [r0, r0+G) holds tokens p = (r + G/2) mod n_pad
            runs = []
            for a, b in ((r0 + half, r0 + group + half), (r0 + half - n_pad, r0 + group + half - n_pad)):
                a, b = max(a, 0), min(b, seq)
                if b > a:
                    runs.append((a, b - a))
            if runs:
                segments.append(tuple(runs))
        return segments
    cuts = [0] + list(range(half if shifted else group, seq, group)) + [seq]
    return [((a, b - a),) for a, b in zip(cuts, cuts[1:]) if b > a]


def _buckets(cfg: PatternConfig, lo: int, hi: int, seq: int, group: int, shifted: bool,
             merge: bool = False) -> list[Bucket]:
    """Group the segments of heads ``[lo, hi)`` into evenly spaced buckets of one shape (``merge``:
    whatever their sink counts, which the merge applies per segment)."""
    by_shape: dict[tuple, list[tuple[tuple[int, int], ...]]] = {}
    for seg in _segments(cfg, seq, group, shifted):
        sink = min(seg[0][0], cfg.n_sink) if len(seg) == 1 and not merge else 0  # SF is never cyclic
        by_shape.setdefault((tuple(n for _, n in seg), sink), []).append(seg)
    out = []
    for (lengths, sink), segs in by_shape.items():
        if len(lengths) > 1:  # the cyclic wrap group: one bucket of its own
            out += [Bucket(lo, hi, 1, sink, tuple(Part(a, n, n) for a, n in seg)) for seg in segs]
            continue
        starts = sorted(seg[0][0] for seg in segs)
        run = [starts[0]]
        for s in starts[1:] + [None]:  # split into arithmetic progressions
            if s is not None and (len(run) == 1 or s - run[-1] == run[1] - run[0]):
                run.append(s)
                continue
            stride = run[1] - run[0] if len(run) > 1 else lengths[0]
            width = min(run[-1], cfg.n_sink) if merge else sink
            out.append(Bucket(lo, hi, len(run), width, (Part(run[0], stride, lengths[0]),)))
            run = [s]
    return out


def group_size_for(cfg: PatternConfig, seq: int) -> int:
    """The group size G of a static row of ``seq`` tokens (computed on the host: no device sync)."""
    return int(cfg.group_for_length(torch.tensor([seq])).item())


@lru_cache(maxsize=64)
def make_plan(cfg: PatternConfig, num_heads: int, num_kv_heads: int, seq: int, sink_mode: str = "square",
              native_gqa: bool = True) -> Plan:
    """The buckets and operand cuts for ``cfg`` on a static row of ``seq`` tokens."""
    group = group_size_for(cfg, seq)
    h0 = cfg.shifted_from(num_heads)
    rep = num_heads // num_kv_heads
    merge = sink_mode == "merge"
    buckets = []
    for lo, hi, shifted in ((0, h0, False), (h0, num_heads, True)):
        if hi > lo:
            buckets += _buckets(cfg, lo, hi, seq, group, shifted, merge)
    q_specs, kv_specs, kv_ranges, sink_specs, sink_index = [], [], [], [], []
    for b in buckets:
        sink = (Part(0, 0, b.sink),) if b.sink else ()
        kv_lo, kv_hi = b.lo // rep, -(-b.hi // rep)
        kv_ranges.append((kv_lo, kv_hi))
        q_specs.append((b.lo, b.hi, b.count, (sink if sink_mode == "square" else ()) + b.runs, True))
        kv_specs.append((kv_lo, kv_hi, b.count, (() if merge else sink) + b.runs, False))
        sink_index.append(len(sink_specs) if merge and b.sink else -1)
        if merge and b.sink:
            sink_specs.append((kv_lo, kv_hi, 1, sink, False))
    # a list, not a set: two head classes on the same KV range (MQA) overlap completely
    classes = sorted((lo // rep, -(-hi // rep)) for lo, hi in ((0, h0), (h0, num_heads)) if hi > lo)
    kv_exact = all(a[1] <= b[0] for a, b in zip(classes, classes[1:]))
    return Plan(tuple(buckets), tuple(q_specs), tuple(kv_specs), kv_exact, tuple(kv_ranges), tuple(sink_specs),
                tuple(sink_index))


def pattern_pairs(cfg: PatternConfig, num_heads: int, seq: int, batch: int = 1) -> int:
    """Allowed (query, key) pairs of the pattern on static rows: the useful work of attention."""
    total = 0
    for b in make_plan(cfg, num_heads, num_heads, seq).buckets:
        n = b.rows
        total += (b.hi - b.lo) * b.count * (n * (n + 1) // 2 + b.sink * n)
    return total * batch


def _alloc(shape, stride, like: torch.Tensor, zero: bool) -> torch.Tensor:
    """Buffer for the assembled output or a gradient (tests replace this to poison with NaN)."""
    out = torch.empty_strided(shape, stride, dtype=like.dtype, device=like.device)
    return out.zero_() if zero else out


def _is_run(part: Part) -> bool:
    """A part holding segment tokens (not the shared sinks)."""
    return part.stride > 0


def _view(x: torch.Tensor, lo: int, hi: int, part: Part, count: int) -> torch.Tensor:
    """``[B, H, L, D]`` -> ``[B, count, hi-lo, length, D]`` view of a part's positions."""
    xs = x[:, lo:hi]
    if part.stride == 0:
        return xs[:, :, part.start:part.start + part.length].unsqueeze(1).expand(-1, count, -1, -1, -1)
    span = xs.narrow(2, part.start, (count - 1) * part.stride + part.length)
    return span.unfold(2, part.length, part.stride).permute(0, 2, 1, 4, 3)


def _like_strides(x: torch.Tensor) -> tuple[int, ...]:
    """Strides ``torch.empty_like(x)`` would give: ``x``'s own when dense (gradients keep its layout)."""
    return torch.empty_like(x, device="meta").stride()


class _Gather(torch.autograd.Function):
    """``[B, H, L, D]`` -> one ``[B*count, hi-lo, rows, D]`` operand per spec (views where possible)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, specs: tuple, exact: bool) -> tuple[torch.Tensor, ...]:
        ctx.specs, ctx.exact = specs, exact
        ctx.meta = (x.shape, _like_strides(x))
        outs = []
        for lo, hi, count, parts, _ in specs:
            pieces = [_view(x, lo, hi, p, count).flatten(0, 1) for p in parts]
            outs.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, 2))
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: torch.Tensor):
        shape, stride = ctx.meta
        dx = _alloc(shape, stride, grads[0], zero=not ctx.exact)
        adds = []
        for g, (lo, hi, count, parts, queries) in zip(grads, ctx.specs):
            off = 0
            for p in parts:
                src = g.narrow(2, off, p.length).unflatten(0, (shape[0], count))  # [B, count, h, n, D]
                off += p.length
                if queries and not _is_run(p):  # dropped query rows: their gradient is exactly zero
                    continue
                if p.stride == 0:  # sinks shared by every segment: sum, add after the copies
                    adds.append((dx[:, lo:hi, p.start:p.start + p.length], src.sum(1)))
                elif ctx.exact:
                    _view(dx, lo, hi, p, count).copy_(src)
                else:
                    _view(dx, lo, hi, p, count).add_(src)
        for target, src in adds:
            target.add_(src)
        return dx, None, None


class _Assemble(torch.autograd.Function):
    """Per-bucket outputs ``[B*count, h, rows, D]`` -> ``[B, L, H, D]`` (segment rows only);
    backward hands out views of the gradient (zeros for the filler rows)."""

    @staticmethod
    def forward(ctx, meta: tuple, *outs: torch.Tensor) -> torch.Tensor:
        shape, specs = meta
        ctx.meta = meta
        out = _alloc(shape, torch.empty(shape, device="meta").stride(), outs[0], zero=False)  # contiguous
        ot = out.transpose(1, 2)  # [B, H, L, D] view
        for o, (lo, hi, count, parts, _) in zip(outs, specs):
            off = 0
            for p in parts:
                if _is_run(p):
                    _view(ot, lo, hi, p, count).copy_(o.narrow(2, off, p.length).unflatten(0, (shape[0], count)))
                off += p.length
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        shape, specs = ctx.meta
        gt = grad.transpose(1, 2)
        res = [None]
        for lo, hi, count, parts, _ in specs:
            pieces = [_view(gt, lo, hi, p, count).flatten(0, 1) if _is_run(p)
                      else grad.new_zeros(shape[0] * count, hi - lo, p.length, shape[3]) for p in parts]
            res.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, 2))
        return tuple(res)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lower_right: bool, scale: float | None,
          gqa: bool) -> torch.Tensor:
    kw = {"scale": scale, "enable_gqa": True} if gqa else {"scale": scale}
    if lower_right:
        from torch.nn.attention.bias import causal_lower_right

        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]), **kw)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)


def _priority():
    """Context preferring :data:`SDPA_PRIORITY` kernels, or a no-op."""
    import contextlib

    if not SDPA_PRIORITY:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, name) for name in SDPA_PRIORITY], set_priority=True)


def merge_op(query: torch.Tensor) -> str | None:
    """The segment op "merge" mode runs for this call, or None when SF falls back to "square"."""
    if SINK_MODE != "merge":
        return None
    op = SEGMENT_OP or (CUDA_SEGMENT_OP if query.device.type == "cuda" else None)
    if op is None:
        return None
    return op if _op_runs(op, query.device.type, query.dtype, query.shape[-1]) else None


@lru_cache(maxsize=64)
def _op_runs(op: str, device: str, dtype: torch.dtype, dim: int) -> bool:
    """Whether segment op ``op`` exists in this torch and takes these inputs (fused ops: half
    precision, head dim a multiple of 8 up to 128, as PyTorch's own SDPA dispatch requires)."""
    if op == "math":
        return True
    if op == "cpu_flash":
        return device == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    name = {"cudnn": "_scaled_dot_product_cudnn_attention", "flash": "_scaled_dot_product_flash_attention",
            "efficient": "_scaled_dot_product_efficient_attention"}[op]
    return (device == "cuda" and hasattr(torch.ops.aten, name) and hasattr(torch.ops.aten, name + "_backward")
            and dtype in (torch.float16, torch.bfloat16) and dim % 8 == 0 and dim <= 128)


def _merge_kernels(query: torch.Tensor) -> bool:
    if MERGE_KERNELS is not None:
        return MERGE_KERNELS
    from petl.kernels.switch import use_kernels

    return use_kernels(query.device)


def grouped_pattern_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cfg: PatternConfig,
                              layout: SequenceLayout, scaling: float | None = None) -> torch.Tensor:
    """Pattern attention through fused causal SDPA on segment-batched views.

    Args:
        query (Tensor): ``[B, Hq, L, D]`` (any strides; the ``[B, L, H, D]`` memory layout of
            transformers' projections is the zero-copy case).
        key, value (Tensor): ``[B, Hkv, L, D]``, Hkv dividing Hq (GQA, not repeated).
        cfg (PatternConfig): the pattern (not ``sink_bidirectional``).
        layout (SequenceLayout): a static layout (no padding, no packing), ``with_groups`` done.
        scaling (float, Optional): softmax scale; default ``D ** -0.5``.

    Returns:
        Tensor ``[B, L, Hq, D]``, equal to :func:`~petl.attention.reference.reference_attention`.
    """
    reason = grouped_unsupported(cfg, layout, query)
    if reason is not None:
        raise ValueError(f"backend='grouped' cannot run this call: {reason}; use backend='flex' or 'reference'")
    batch, heads, seq, dim = query.shape
    rep = heads // key.shape[1]
    op = merge_op(query) if cfg.n_sink else None
    sink_mode = "merge" if op else ("square" if SINK_MODE == "merge" else SINK_MODE)
    plan = make_plan(cfg, heads, key.shape[1], seq, sink_mode, NATIVE_GQA)
    qs = _Gather.apply(query, plan.q_specs, True)
    ks = _Gather.apply(key, plan.kv_specs + plan.sink_specs, plan.kv_exact)
    vs = _Gather.apply(value, plan.kv_specs + plan.sink_specs, plan.kv_exact)
    n_buckets = len(plan.buckets)
    outs = []
    with _priority():
        for i, (b, q, k, v, (kv_lo, kv_hi)) in enumerate(zip(plan.buckets, qs, ks, vs, plan.kv_ranges)):
            aligned = b.lo % rep == 0 and b.hi % rep == 0
            if rep > 1 and not (NATIVE_GQA and aligned):
                first = b.lo - kv_lo * rep  # query head b.lo within the repeated kv range
                k = k.repeat_interleave(rep, 1)[:, first:first + b.hi - b.lo]
                v = v.repeat_interleave(rep, 1)[:, first:first + b.hi - b.lo]
            gqa = rep > 1 and NATIVE_GQA and aligned
            if sink_mode == "merge" and b.sink:
                outs.append(_merged(q, k, v, ks[n_buckets + plan.sink_index[i]], vs[n_buckets + plan.sink_index[i]],
                                    cfg, b, rep, kv_lo, dim ** -0.5 if scaling is None else scaling, op))
                continue
            outs.append(_sdpa(q, k, v, b.sink > 0 and sink_mode == "lower_right", scaling, gqa))
    return _Assemble.apply(((batch, seq, heads, dim), plan.q_specs), *outs)


def _merged(q, k, v, sink_k, sink_v, cfg: PatternConfig, b: Bucket, rep: int, kv_lo: int, scale: float,
            op: str) -> torch.Tensor:
    """One bucket in "merge" mode: fused causal segments + log-sum-exp merge of the sinks."""
    from petl.kernels.attention_sink_merge import SinkMeta, SinkSegmentAttention

    part = b.runs[0]
    meta = SinkMeta(count=b.count, start=part.start, stride=part.stride, n_sink=cfg.n_sink, width=b.sink,
                    lo=b.lo, rep=rep, kv_lo=kv_lo)
    return SinkSegmentAttention.apply(q, k, v, sink_k, sink_v, meta, scale, op, _merge_kernels(q))
