"""petl's own Triton flash attention for the S2 / SF training-time patterns (forward and backward).

What it computes is defined by :func:`petl.attention.patterns.make_mask_mod` (the same function
as :func:`petl.attention.reference.reference_attention`): q ``[B, Hq, L, D]``, k/v
``[B, Hkv, L, D]`` (GQA: query head ``h`` reads KV head ``h // (Hq / Hkv)``), output
``[B, L, Hq, D]``, rows that see no key give 0 (and zero gradients).

Why its own kernel: FlexAttention walks per-head block tables and evaluates ``mask_mod`` on every
partial block; here the pattern is index arithmetic (``petl/kernels/attention_ranges.py``), so each
program computes the few key-block ranges its rows can see (the segment range; the sink blocks or
the cyclic wrap-around) and evaluates a mask only on the edge blocks. Work scales with the allowed
pairs: S2 at group ratio 1/4 does about a quarter of causal attention's matmuls, and SF's sinks
add one key block per query block. Memory is linear in L: only O, the log-sum-exp and (backward)
``delta`` are stored.

Supported (``triton_unsupported`` returns None): CUDA (compute capability >= 8) with bf16/fp16 and
head dims 64 or 128, or the Triton CPU interpreter (``TRITON_INTERPRET=1``, any float dtype, head
dims 16/32/64/128; used by the tests); any L; per-sample layouts (left or right padding; ``layout.extra`` is
accepted when it holds nothing beyond causality and padding, checked once per layout); S2
non-cyclic and cyclic; SF with up to 64 non-bidirectional sinks; any ``shift_head_fraction``.
Not supported (the dispatcher falls back to Flex): packed documents (``layout.doc``), masks with
more than padding (sliding windows...), ``sink_bidirectional``, other head dims, fp32 on CUDA.

Kernels: ``attention_fwd.py`` (forward), ``attention_bwd.py`` (delta, sink pass, dK/dV, dQ).

Measured on the H200 (``benchmarks/attention_triton_check.py``, B=1, H=32, D=128, bf16, ratio 1/4,
fwd+bwd): 2.38x / 2.81x / 3.08x faster than full causal SDPA at 8k / 16k / 32k (GQA 32q/8kv:
2.30x / 2.81x / 3.08x), i.e. 285-396 useful TFLOP/s against SDPA's 510-549; SF with 4 sinks costs
1.10x / 1.05x / 1.01x the S2 time; 128k tokens fwd+bwd in 279 ms with 4.0 GiB beyond the inputs.
The backward recomputes ``QK^T`` and ``dO V^T`` in both the dK/dV and the dQ kernel (7 matmuls per
tile pair instead of 5) to avoid atomics; that and the missing warp specialisation are where the
gap to SDPA's efficiency lies.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from petl.attention.layout import SequenceLayout
from petl.attention.patterns import PatternConfig
from petl.kernels.switch import interpreting, triton_available

LOG2E = 1.4426950408889634
HEAD_DIMS = (64, 128)  # on CUDA (tuned and tested there)
INTERPRETER_HEAD_DIMS = (16, 32, 64, 128)
MAX_SINKS = 64
_EXTRA_KEY = "petl.kernels.attention_triton:extra_is_padding"


@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes and launch parameters of one kernel: ``BM`` query rows, ``BN`` key rows."""

    BM: int
    BN: int
    num_warps: int
    num_stages: int


#: per head dim: forward, dK/dV, dQ. D=128: the fastest of a small sweep on the H200 at 16k tokens
#: (benchmarks/attention_triton_check.py); D=64 uses 4-warp variants (tested on the GPU, not tuned).
GPU_CONFIGS: dict[int, tuple[BlockConfig, BlockConfig, BlockConfig]] = {
    128: (BlockConfig(128, 128, 8, 3), BlockConfig(64, 128, 8, 3), BlockConfig(128, 64, 8, 3)),
    64: (BlockConfig(128, 64, 4, 3), BlockConfig(64, 128, 4, 2), BlockConfig(128, 64, 4, 2)),
}
#: the CPU interpreter runs every tile op in numpy: small tiles keep the tests fast and still
#: exercise edge blocks, straddled segments and several blocks per segment
INTERPRETER_CONFIG = BlockConfig(16, 16, 1, 1)
#: benchmarks may set this to ``(fwd, dkdv, dq)`` to try other tiles (None: the tables above)
CONFIG_OVERRIDE: tuple[BlockConfig, BlockConfig, BlockConfig] | None = None


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the kernels fill; tests replace it to NaN-poison them."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _configs(head_dim: int) -> tuple[BlockConfig, BlockConfig, BlockConfig]:
    if CONFIG_OVERRIDE is not None:
        return CONFIG_OVERRIDE
    if interpreting():
        return (INTERPRETER_CONFIG,) * 3
    return GPU_CONFIGS[head_dim]


def _extra_is_padding(layout: SequenceLayout) -> bool:
    """True when ``layout.extra`` allows every causal pair inside each sample's span.

    The pattern already restricts to that span and to keys not after the query, so such a mask
    (transformers' causal-and-padding mask) changes nothing and can be dropped. One host sync,
    memoised on the layout (shared by all layers of a forward pass).
    """
    if layout.extra is None:
        return True
    if _EXTRA_KEY not in layout.memo:
        seq = layout.seq_len
        extra = layout.extra[:, :seq, :seq]
        idx = torch.arange(seq, device=extra.device)
        start, end = layout.start[:, None], (layout.start + layout.length)[:, None]
        inside = (idx >= start) & (idx < end)  # [B, L]
        step = max(1, (1 << 26) // (layout.batch * seq))
        bad = torch.zeros((), dtype=torch.bool, device=extra.device)
        for r0 in range(0, seq, step):
            rows = idx[r0:r0 + step]
            need = inside[:, r0:r0 + step, None] & inside[:, None, :] & (idx[None, None, :] <= rows[None, :, None])
            bad |= (need & ~extra[:, r0:r0 + step]).any()
        layout.memo[_EXTRA_KEY] = not bool(bad)
    return layout.memo[_EXTRA_KEY]


def triton_unsupported(cfg: PatternConfig, layout: SequenceLayout, query: torch.Tensor) -> str | None:
    """None when :func:`triton_pattern_attention` handles this call, else a short reason.

    Args:
        cfg (PatternConfig): the pattern.
        layout (SequenceLayout): the call's layout (groups need not be set yet).
        query (Tensor): ``[B, Hq, L, D]``; only its device, dtype and head dim are read.
    """
    if not triton_available():
        return "triton is not installed"
    if query.device.type == "cuda":
        if torch.cuda.get_device_capability(query.device)[0] < 8:
            return "the Triton attention kernel needs a GPU of compute capability >= 8.0"
        if query.dtype not in (torch.bfloat16, torch.float16):
            return f"the Triton attention kernel runs bf16/fp16 on CUDA, got {query.dtype}"
    elif not interpreting():
        return f"the Triton attention kernel needs CUDA tensors (or TRITON_INTERPRET=1), got {query.device.type}"
    elif not query.dtype.is_floating_point:
        return f"the Triton attention kernel needs floating-point inputs, got {query.dtype}"
    dims = HEAD_DIMS if query.device.type == "cuda" else INTERPRETER_HEAD_DIMS
    if query.shape[-1] not in dims:
        return f"the Triton attention kernel supports head dims {dims}, got {query.shape[-1]}"
    if cfg.sink_bidirectional:
        return "sink_bidirectional=True is not implemented in the Triton attention kernel"
    if cfg.n_sink > MAX_SINKS:
        return f"the Triton attention kernel supports n_sink <= {MAX_SINKS}, got {cfg.n_sink}"
    if layout.doc is not None:
        return "packed documents (position_ids restarts) are not implemented in the Triton attention kernel"
    if not _extra_is_padding(layout):
        return "the attention mask holds more than causality and padding (e.g. a sliding window)"
    return None


@dataclass(frozen=True)
class _Params:
    """Non-tensor arguments of one call."""

    h0: int
    n_sink: int
    cyclic: bool
    scale: float


def _check(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    if query.ndim != 4 or key.shape != value.shape or key.ndim != 4 or key.shape[0] != query.shape[0] \
            or key.shape[2:] != query.shape[2:]:
        raise ValueError(f"expected q [B,Hq,L,D] and k/v [B,Hkv,L,D]; got q {tuple(query.shape)}, "
                         f"k {tuple(key.shape)}, v {tuple(value.shape)}")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"query heads ({query.shape[1]}) must be a multiple of key/value heads ({key.shape[1]})")
    if not query.dtype == key.dtype == value.dtype:
        raise ValueError(f"q, k, v must share one dtype, got {query.dtype}, {key.dtype}, {value.dtype}; cast them")


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact products for fp32 inputs (tests); the default for 16-bit."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _last_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sample: tuple[torch.Tensor, ...],
             prm: _Params) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: o ``[B, L, Hq, D]``, lse ``[B, Hq, L]`` fp32 (base 2)."""
    from petl.kernels.attention_fwd import attn_fwd_kernel

    batch, hq, seq, dim = q.shape
    fwd, _, _ = _configs(dim)
    o = _empty(batch, seq, hq, dim, dtype=q.dtype, device=q.device)
    lse = _empty(batch, hq, seq, dtype=torch.float32, device=q.device)
    grid = (triton_cdiv(seq, fwd.BM), batch * hq)
    attn_fwd_kernel[grid](
        q, k, v, o, lse, *sample,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        seq, hq, hq // k.shape[1], prm.h0, prm.n_sink, prm.scale * LOG2E,
        HEAD_DIM=dim, BM=fwd.BM, BN=fwd.BN, CYCLIC=prm.cyclic, HAS_SINK=prm.n_sink > 0,
        PREC=_precision(q.dtype), num_warps=fwd.num_warps, num_stages=fwd.num_stages)
    return o, lse


def _backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
              lse: torch.Tensor, sample: tuple[torch.Tensor, ...], prm: _Params):
    """Launch delta, sink pass (SF), dK/dV and dQ: returns dq, dk, dv shaped like q, k, v."""
    from petl.kernels.attention_bwd import (attn_bwd_delta_kernel, attn_bwd_dkdv_kernel, attn_bwd_dq_kernel,
                                            sink_dkdv_kernel)

    batch, hq, seq, dim = q.shape
    hkv = k.shape[1]
    rep = hq // hkv
    _, kv_cfg, q_cfg = _configs(dim)
    dev = q.device
    prec = _precision(q.dtype)
    has_sink = prm.n_sink > 0
    qk_scale = prm.scale * LOG2E
    common = (seq, hq, rep, prm.h0, prm.n_sink, qk_scale)

    delta = _empty(batch, hq, seq, dtype=torch.float32, device=dev)
    dbm = 16 if interpreting() else 128
    attn_bwd_delta_kernel[(triton_cdiv(seq, dbm), batch * hq)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2), seq, hq,
        HEAD_DIM=dim, BM=dbm, num_warps=4 if dbm > 16 else 1)

    strides_in = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                  v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    sink_n = max(16, triton_next_pow2(prm.n_sink)) if has_sink else 16
    if has_sink:
        n_qb = triton_cdiv(seq, kv_cfg.BM)
        chunk = max(1, triton_cdiv(n_qb, 32))
        n_chunks = triton_cdiv(n_qb, chunk)
        pdk = _empty(batch * hkv, n_chunks, sink_n, dim, dtype=torch.float32, device=dev)
        pdv = _empty(batch * hkv, n_chunks, sink_n, dim, dtype=torch.float32, device=dev)
        sink_dkdv_kernel[(n_chunks, batch * hkv)](
            q, k, v, do, lse, delta, pdk, pdv, *sample[:3], *strides_in,
            seq, hq, hkv, rep, prm.h0, prm.n_sink, qk_scale, chunk, n_chunks,
            HEAD_DIM=dim, BM=kv_cfg.BM, BN=kv_cfg.BN, SINK_N=sink_n, PREC=prec,
            num_warps=4 if not interpreting() else 1, num_stages=2 if not interpreting() else 1)
        sdk, sdv = pdk.sum(1), pdv.sum(1)  # [B*Hkv, SINK_N, D], summed in chunk order (deterministic)
    else:
        sdk = sdv = lse  # unused placeholders

    dk = _empty(batch, hkv, seq, dim, dtype=k.dtype, device=dev)
    dv = _empty(batch, hkv, seq, dim, dtype=v.dtype, device=dev)
    attn_bwd_dkdv_kernel[(triton_cdiv(seq, kv_cfg.BN), batch * hkv)](
        q, k, v, do, lse, delta, dk, dv, sdk, sdv, *sample, *strides_in,
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        seq, hq, hkv, rep, prm.h0, prm.n_sink, qk_scale, prm.scale,
        HEAD_DIM=dim, BM=kv_cfg.BM, BN=kv_cfg.BN, CYCLIC=prm.cyclic, HAS_SINK=has_sink, SINK_N=sink_n, PREC=prec,
        num_warps=kv_cfg.num_warps, num_stages=kv_cfg.num_stages)

    dq = _empty(batch, hq, seq, dim, dtype=q.dtype, device=dev)
    attn_bwd_dq_kernel[(triton_cdiv(seq, q_cfg.BM), batch * hq)](
        q, k, v, do, lse, delta, dq, *sample, *strides_in, dq.stride(0), dq.stride(1), dq.stride(2),
        *common, prm.scale,
        HEAD_DIM=dim, BM=q_cfg.BM, BN=q_cfg.BN, CYCLIC=prm.cyclic, HAS_SINK=has_sink, PREC=prec,
        num_warps=q_cfg.num_warps, num_stages=q_cfg.num_stages)
    return dq, dk, dv


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def triton_next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


class _PatternAttention(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, o and the log-sum-exp (memory linear in L)."""

    @staticmethod
    def forward(ctx, q, k, v, start, length, group, padded, prm: _Params):  # noqa: D102
        sample = (start, length, group, padded)
        o, lse = _forward(q, k, v, sample, prm)
        ctx.save_for_backward(q, k, v, o, lse, *sample)
        ctx.prm = prm
        return o

    @staticmethod
    def backward(ctx, do):  # noqa: D102
        q, k, v, o, lse, *sample = ctx.saved_tensors
        dq, dk, dv = _backward(_last_contiguous(do), q, k, v, o, lse, tuple(sample), ctx.prm)
        return dq, dk, dv, None, None, None, None, None


def triton_pattern_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cfg: PatternConfig,
                             layout: SequenceLayout, scaling: float | None = None) -> torch.Tensor:
    """Pattern attention through petl's Triton kernel; differentiable w.r.t. q, k, v.

    Args:
        query (Tensor): ``[B, Hq, L, D]``.
        key, value (Tensor): ``[B, Hkv, L, D]``, Hkv dividing Hq (GQA, not repeated).
        cfg (PatternConfig): the pattern (S2 or SF).
        layout (SequenceLayout): per-sample spans (groups are filled in if missing).
        scaling (float, Optional): softmax scale. Default: ``D ** -0.5``.

    Returns:
        Tensor ``[B, L, Hq, D]`` (contiguous); rows with no allowed key are 0.

    Example:
        >>> layout = build_layout(B, L, q.device, None, None).with_groups(cfg)
        >>> out = triton_pattern_attention(q, k, v, cfg, layout)   # [B, L, Hq, D]
    """
    _check(query, key, value)
    reason = triton_unsupported(cfg, layout, query)
    if reason is not None:
        raise ValueError(f"{reason}; use backend='flex' (or 'reference') for this call")
    if layout.batch != query.shape[0] or layout.seq_len != query.shape[2]:
        raise ValueError(f"layout is for B={layout.batch}, L={layout.seq_len} but q is {tuple(query.shape)}; "
                         "build the layout from this call's tensors")
    if layout.group is None:
        layout = layout.with_groups(cfg)
    dev = query.device
    sample = tuple(t.to(device=dev, dtype=torch.int32).contiguous()
                   for t in (layout.start, layout.length, layout.group, layout.padded))
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    prm = _Params(cfg.shifted_from(query.shape[1]), cfg.n_sink, cfg.cyclic, scale)
    q, k, v = (_last_contiguous(t) for t in (query, key, value))
    return _PatternAttention.apply(q, k, v, *sample, prm)


__all__ = ["triton_pattern_attention", "triton_unsupported", "BlockConfig"]
