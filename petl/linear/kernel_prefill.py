"""petl's forward-only LAWCAT prefill kernels: gate, normaliser, GLA core and division in four launches.

When no gradient is needed (generation's prefill, evaluation), the fused path's steps 3-5
(``gate_normaliser`` + a GLA core + ``normalise``, about a dozen launches and fla's Python) are
replaced by Triton kernels over chunks of C = 64 tokens. With g the log gate (from the raw
logits, ``logsigmoid(x) / n``, 0 at padding), ``G_i`` its inclusive in-chunk cumulative sum, and
``S_n [F, V]``, ``z_n [F]`` the numerator and normaliser states before chunk n:

1. *chunk states*, ``STATE_MODE = "grouped"`` (the default), two launches:
   a. grid ``(groups, B*H, F/BK * V/BV)``: each program walks one group of ``GROUP`` consecutive
      chunks (16 on long inputs), carrying the group's own prefix from a zero start in float32
      registers: ``P <- a_n P + U_n`` with the chunk update ``U_n = (k exp(G_last - G))^T v``
      (accumulated into ``a_n P`` by the dots), its column sums and decay ``a_n = exp(G_last)``.
      Before each chunk it stores ``P_n`` in the model dtype and ``p_n``, ``D_n`` (the normaliser
      prefix and the product of the decays so far, float32, [F]); after the group, the group's
      totals (float32) for the scan;
   b. grid ``(B*H, F/BK, V/BV)``, sequential over the groups: ``S_{g+1} = A_g S_g + U_g`` (and z),
      writing each group's start state ``S_g`` (and the final state for the cache).
   The output pass then uses ``S_n = D_n S_g + P_n`` as two dots. Why: the alternative below
   writes every chunk's float32 update and then reads it back in the scan (8 bytes per state
   element on top of the chunk states); here the per-chunk traffic is one model-dtype prefix
   written and read, and the float32 traffic falls by the group size. Measured on the H200 at
   8k-32k tokens, B = 1, H = 32, F = V = 128: the whole no-grad ``attend`` 0.81 ms against 0.91
   ms (8k), 2.94-3.15 against 3.35 ms (32k); benchmarks/results/lawcat_layer.json.
   ``"scan"``: grid ``(chunks, B*H, V/BV)`` writes every chunk's float32 update, then the scan
   above runs over the chunks, writing each chunk's start state over the updates it consumed.
   ``"recurrent"`` does everything in one sequential kernel (the gate arithmetic and the dots
   inside the chain: measured 20-25% slower than "scan" at 8k-32k). Both stay selectable
   (``blocks["state_mode"]``) for comparison;
2. *output pass*, grid ``(chunks, B*H, V/BV)``, all chunks in parallel:
   ``num = (q e^G) S_n + A v``, ``den = (q e^G) . z_n + rowsum(A)`` (the normaliser is the GLA
   with a ones column), with ``A_ij = sum_f q_if k_jf exp(G_if - G_jf)`` for j <= i; then
   ``o = num / (den + eps)`` written once in the model dtype. Chunks whose gates are too strong
   for the factored scores (see Stability) are flagged and finished by a second kernel on the
   same grid, which exits at once for every other chunk.

Memory ("grouped"): the in-group prefixes are ``[B*H, T/C, F, V]`` in the inputs' dtype (the
output pass's dot rounds them to it anyway), e.g. 0.5 GiB in bf16 for 32k tokens, H = 32,
F = V = 128; the group totals (float32) and start states add 3/GROUP of that.
("scan": the float32 chunk updates take 1 GiB at that size while the scan runs.)

Precision: the dots take the model dtype (bf16/fp16) with float32 accumulation, like fla's; the
state update splits its float32 operand ``k exp(G_last - G)`` into a rounded part and the rounding
rest (two dots), so the carried state, which the cache keeps for decoding, holds about 16
mantissa bits per update instead of 8.

Stability: every exp in the state pass and in ``q e^G`` has a non-positive argument. The in-chunk
scores factor as ``(q e^G)(k e^-G)^T`` when the chunk's largest total decay (``span = max_f
-G_last,f``) is small enough that ``e^span`` is representable in the dot operands' dtype (the
features are positive, so the sum has no cancellation and keeps the dtype's relative precision).
Otherwise (strong gates: a log gate of -60 per token) the chunk's A is computed exactly, one key
column at a time with every exponent ``G_i - G_j <= 0``, masked before the exp; slower, but it
runs only for such chunks. Maths and references: docs/lawcat.md, :mod:`petl.linear.naive`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .kernel_normaliser import _log_gate

# Launch table for the H200 (bf16, F = V = 128); tests and the benchmark override it with ``blocks``.
CHUNK = 64                   # tokens per chunk (a power of 2 >= 16)
#: "grouped": programs of GROUP chunks carry in-group prefixes, then a scan over the groups;
#: "scan": chunk updates in parallel, then a streaming scan over the chunks; "recurrent": one pass
STATE_MODE = "grouped"
GROUP = 16                   # "grouped": chunks per program (fewer on short inputs, see _group_size)
GROUP_BK = 64                # "grouped": features per program of the in-group pass
GROUP_PROGRAMS_PER_SM = 2
STATE_BK, STATE_BV = 32, 64  # "recurrent" state pass / "scan" scan: features x values per program
UPDATE_BV = 128              # "scan" chunk-update pass: values per program
OUT_BV = 128                 # output pass: values per program (the scores are recomputed per block)
WARPS = {"state": 4, "update": 4, "out": 4}
STAGES = {"state": 2, "update": 1, "out": 1}
#: the states written by pass 1 and read by pass 2 (per-chunk start states, or the in-group prefixes
#: and group start states); None: the inputs' dtype, which
#: the output pass rounds them to for its dot anyway (the same output as float32 states, half the
#: bytes: with the "scan" pass 0.93-0.94 vs 0.98-1.00 ms at 8k, 3.60-3.65 vs 3.68-3.78 ms at 32k
#: for the whole no-grad attend, two H200 runs)
STATE_DTYPE = None
STATE_SPLIT = True           # bf16/fp16: the state update's float32 operand as two dots (see above)
#: largest in-chunk total decay for the factored scores: e^span must stay inside the dot dtype
SPAN_MAX = {torch.bfloat16: 30.0, torch.float16: 8.0, torch.float32: 30.0}
#: feature and value widths the kernels take (tiles are whole powers of 2); others fall back
SUPPORTED_DIMS = (16, 32, 64, 128)


def _empty(shape, dtype, device) -> torch.Tensor:
    """Output allocation (a seam for tests, which poison outputs with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _tile(base, row0, local, cols, T, row_stride: tl.constexpr):
    """Rows ``row0 + local`` x cols of a [T, row_stride] slab at ``base`` (zeros past T), raw dtype.
    Only T masks the load: padding is applied afterwards with where (no dependent load on valid,
    and NaN in padded rows is dropped)."""
    rm = (row0 + local) < T
    return tl.load(base + row0.to(tl.int64) * row_stride + (local[:, None] * row_stride + cols[None, :]),
                   mask=rm[:, None], other=0.0)


@triton.jit
def _real_rows(valid_ptr, b, row0, local, T, HAS_VALID: tl.constexpr):
    """[C] bool: rows inside the sequence that are real tokens (not padding)."""
    rows = row0 + local
    real = rows < T
    if HAS_VALID:
        real = real & (tl.load(valid_ptr + b * T + rows, mask=real, other=0) != 0)
    return real


@triton.jit
def _state_kernel(k_ptr, v_ptr, x_ptr, valid_ptr, s0_ptr, z0_ptr, hs_ptr, zs_ptr, st_ptr, zt_ptr,
                  T, NC, inv_norm,
                  H: tl.constexpr, G: tl.constexpr, F: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, HAS_VALID: tl.constexpr, HAS_INIT: tl.constexpr,
                  STORE_FINAL: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr):
    """Pass 1: chunk start states S_n [F, V] and z_n [F] of one (batch, head), feature and value block.

    The loop is a dependent chain over the chunks; the next chunk's tiles are loaded at the top of
    each step (before this step's arithmetic), so their memory latency overlaps the work."""
    pid_bh = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_v = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    HKV: tl.constexpr = H // G
    fk = pid_k * BK + tl.arange(0, BK)
    fv = pid_v * BV + tl.arange(0, BV)
    local = tl.arange(0, C)
    s_off = fk[:, None] * V + fv[None, :]
    if HAS_INIT:
        S = tl.load(s0_ptr + pid_bh.to(tl.int64) * F * V + s_off).to(tl.float32)
        z = tl.load(z0_ptr + pid_bh.to(tl.int64) * F + fk).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
        z = tl.zeros([BK], dtype=tl.float32)
    k_base = k_ptr + b.to(tl.int64) * T * H * F + h * F
    x_base = x_ptr + b.to(tl.int64) * T * HKV * F + (h // G) * F
    v_base = v_ptr + b.to(tl.int64) * T * HKV * V + (h // G) * V
    hs_base = hs_ptr + pid_bh.to(tl.int64) * NC * F * V
    zs_base = zs_ptr + pid_bh.to(tl.int64) * NC * F
    z_mask = fk + pid_v * F < F          # only the first value block writes z
    first = pid_bh * 0                   # row 0 as a tensor (the tiles' row offsets are tensors)
    x_n = _tile(x_base, first, local, fk, T, HKV * F)
    k_n = _tile(k_base, first, local, fk, T, H * F)
    v_n = _tile(v_base, first, local, fv, T, HKV * V)
    r_n = _real_rows(valid_ptr, b, first, local, T, HAS_VALID)
    for n in range(NC):
        x, k, v, real = x_n, k_n, v_n, r_n
        nxt = (n + 1) * C                # past T on the last step: masked loads, nothing read
        x_n = _tile(x_base, nxt, local, fk, T, HKV * F)
        k_n = _tile(k_base, nxt, local, fk, T, H * F)
        v_n = _tile(v_base, nxt, local, fv, T, HKV * V)
        r_n = _real_rows(valid_ptr, b, nxt, local, T, HAS_VALID)
        tl.store(hs_base + n * F * V + s_off, S.to(hs_ptr.dtype.element_ty))
        tl.store(zs_base + n * F + fk, z, mask=z_mask)
        m = real[:, None]
        g = tl.where(m, _log_gate(x.to(tl.float32), inv_norm), 0.0)
        Gc = tl.cumsum(g, axis=0)
        # the last row of the cumsum itself (not a separate sum): the last token's weight is exactly 1
        g_last = tl.sum(tl.where((local == C - 1)[:, None], Gc, 0.0), axis=0)
        k_dec = tl.where(m, k.to(tl.float32) * tl.exp(g_last[None, :] - Gc), 0.0)   # <= k: exponent <= 0
        v = tl.where(m, v, 0.0).to(v_ptr.dtype.element_ty)
        decay = tl.exp(g_last)
        hi = k_dec.to(v_ptr.dtype.element_ty)
        S = tl.dot(tl.trans(hi), v, acc=S * decay[:, None], input_precision=PREC)
        if SPLIT:  # the rounding rest of k_dec as a second low-precision operand: ~16 mantissa bits
            S = tl.dot(tl.trans((k_dec - hi.to(tl.float32)).to(v_ptr.dtype.element_ty)), v, acc=S,
                       input_precision=PREC)
        z = z * decay + tl.sum(k_dec, axis=0)
    if STORE_FINAL:
        tl.store(st_ptr + pid_bh.to(tl.int64) * F * V + s_off, S)
        tl.store(zt_ptr + pid_bh.to(tl.int64) * F + fk, z, mask=z_mask)


@triton.jit
def _chunk_update(P, k, v, x, m, local, inv_norm, C: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr):
    """One chunk's state update from its raw tiles (k, x ``[C, BK]``, v ``[C, BV]`` already zero at
    padding and in the dot dtype; m ``[C, 1]`` the real rows) applied to ``P [BK, BV]`` (float32):
    ``(a P + U, u, a)`` with ``U = (k exp(G_last - G))^T v``, ``u`` its column sums and
    ``a = exp(G_last)``. The dots accumulate into ``a P`` itself (no separate U tile in registers)."""
    Gc = tl.cumsum(tl.where(m, _log_gate(x.to(tl.float32), inv_norm), 0.0), axis=0)
    g_last = tl.sum(tl.where((local == C - 1)[:, None], Gc, 0.0), axis=0)   # the cumsum's own last row
    k_dec = tl.where(m, k.to(tl.float32) * tl.exp(g_last[None, :] - Gc), 0.0)   # <= k: exponent <= 0
    a = tl.exp(g_last)
    hi = k_dec.to(v.dtype)
    P = tl.dot(tl.trans(hi), v, acc=P * a[:, None], input_precision=PREC)
    if SPLIT:  # the rounding rest of k_dec as a second low-precision operand: ~16 mantissa bits
        P = tl.dot(tl.trans((k_dec - hi.to(tl.float32)).to(v.dtype)), v, acc=P, input_precision=PREC)
    return P, tl.sum(k_dec, axis=0), a


@triton.jit
def _chunk_update_kernel(k_ptr, v_ptr, x_ptr, valid_ptr, u_ptr, uz_ptr, a_ptr, T, NC, inv_norm,
                         H: tl.constexpr, G: tl.constexpr, F: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                         BV: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr):
    """Pass 1a ("scan" mode), all chunks in parallel: the chunk's own state update
    ``U_n = (k exp(G_last - G))^T v`` [F, V], its column sums ``u_n`` [F] (the normaliser's update)
    and its decay ``a_n = exp(G_last)`` [F]."""
    n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_v = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    HKV: tl.constexpr = H // G
    local = tl.arange(0, C)
    fk = tl.arange(0, F)
    fv = pid_v * BV + tl.arange(0, BV)
    row0 = n * C
    m = _real_rows(valid_ptr, b, row0, local, T, HAS_VALID)[:, None]
    x = _tile(x_ptr + b.to(tl.int64) * T * (HKV * F) + (h // G) * F, row0, local, fk, T, HKV * F)
    k = _tile(k_ptr + b.to(tl.int64) * T * (H * F) + h * F, row0, local, fk, T, H * F)
    v = tl.where(m, _tile(v_ptr + b.to(tl.int64) * T * (HKV * V) + (h // G) * V, row0, local, fv, T, HKV * V),
                 0.0).to(v_ptr.dtype.element_ty)
    U, uz, a = _chunk_update(tl.zeros([F, BV], dtype=tl.float32), k, v, x, m, local, inv_norm, C, PREC, SPLIT)
    row = pid_bh.to(tl.int64) * NC + n
    tl.store(u_ptr + row * (F * V) + (fk[:, None] * V + fv[None, :]), U)
    first = fk + pid_v * F < F           # only the first value block writes the [F] vectors
    tl.store(uz_ptr + row * F + fk, uz, mask=first)
    tl.store(a_ptr + row * F + fk, a, mask=first)


@triton.jit
def _chunk_group_kernel(k_ptr, v_ptr, x_ptr, valid_ptr, p_ptr, pz_ptr, d_ptr, u_ptr, uz_ptr, a_ptr,
                        T, NCP, inv_norm,
                        H: tl.constexpr, G: tl.constexpr, F: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr, GROUP: tl.constexpr, HAS_VALID: tl.constexpr,
                        PREC: tl.constexpr, SPLIT: tl.constexpr):
    """Pass 1a ("grouped" mode): one program walks GROUP consecutive chunks of one (batch, head) and
    value block, carrying the group's own prefix in float32 registers. Before chunk n it stores
    ``P_n`` [F, V] (in p's dtype), ``p_n`` [F] and ``D_n`` [F] (float32): the numerator and
    normaliser state built by the group's earlier chunks from a zero start, and their total decay,
    so that ``S_n = D_n S_g + P_n`` with S_g the group's start state. After the last chunk it
    stores the group's total update, normaliser update and decay for the scan over groups
    (float32). Chunks past the sequence (the last group's padding) are masked rows: U = 0, a = 1.
    Programs own a feature block too (BK of F: the gate and decay are per feature, so feature
    blocks are independent), which keeps the carried ``[BK, BV]`` prefix within the registers.

    Compared with "scan" mode, the float32 per-chunk updates (written, then read by the scan) are
    replaced by the model-dtype prefixes the output pass reads instead of the chunk states."""
    gi = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_k = tl.program_id(2) % (F // BK)
    pid_v = tl.program_id(2) // (F // BK)
    b = pid_bh // H
    h = pid_bh % H
    HKV: tl.constexpr = H // G
    local = tl.arange(0, C)
    fk = pid_k * BK + tl.arange(0, BK)
    fv = pid_v * BV + tl.arange(0, BV)
    dt = v_ptr.dtype.element_ty
    first = fk * 0 + pid_v == 0          # only the first value block writes the [BK] vectors
    k_base = k_ptr + b.to(tl.int64) * T * (H * F) + h * F
    x_base = x_ptr + b.to(tl.int64) * T * (HKV * F) + (h // G) * F
    v_base = v_ptr + b.to(tl.int64) * T * (HKV * V) + (h // G) * V
    P = tl.zeros([BK, BV], dtype=tl.float32)
    pz = tl.zeros([BK], dtype=tl.float32)
    D = tl.full([BK], 1.0, dtype=tl.float32)
    s_off = fk[:, None] * V + fv[None, :]
    for j in range(GROUP):
        n = gi * GROUP + j
        row = pid_bh.to(tl.int64) * NCP + n
        row0 = n * C
        m = _real_rows(valid_ptr, b, row0, local, T, HAS_VALID)[:, None]
        x = _tile(x_base, row0, local, fk, T, HKV * F)
        k = _tile(k_base, row0, local, fk, T, H * F)
        v = tl.where(m, _tile(v_base, row0, local, fv, T, HKV * V), 0.0).to(dt)
        tl.store(p_ptr + row * (F * V) + s_off, P.to(p_ptr.dtype.element_ty))
        tl.store(pz_ptr + row * F + fk, pz, mask=first)
        tl.store(d_ptr + row * F + fk, D, mask=first)
        P, uz, a = _chunk_update(P, k, v, x, m, local, inv_norm, C, PREC, SPLIT)
        pz = a * pz + uz
        D = D * a
    grp = pid_bh.to(tl.int64) * tl.num_programs(0) + gi
    tl.store(u_ptr + grp * (F * V) + s_off, P)
    tl.store(uz_ptr + grp * F + fk, pz, mask=first)
    tl.store(a_ptr + grp * F + fk, D, mask=first)


@triton.jit
def _state_scan_kernel(u_ptr, uz_ptr, a_ptr, s0_ptr, z0_ptr, hs_ptr, zs_ptr, st_ptr, zt_ptr, NC,
                       F: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr):
    """Pass 1b ("scan" mode): ``S_{n+1} = a_n S_n + U_n`` (and z) over the chunks, writing each start
    state; a stream of loads and stores with no dependent arithmetic, read two chunks ahead. hs / zs
    may alias u / uz: chunk n's update is read two steps before its slot is overwritten."""
    pid_bh = tl.program_id(0)
    fk = tl.program_id(1) * BK + tl.arange(0, BK)
    fv = tl.program_id(2) * BV + tl.arange(0, BV)
    off = fk[:, None] * V + fv[None, :]
    first = fk + tl.program_id(2) * F < F
    if HAS_INIT:
        S = tl.load(s0_ptr + pid_bh.to(tl.int64) * F * V + off).to(tl.float32)
        z = tl.load(z0_ptr + pid_bh.to(tl.int64) * F + fk).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
        z = tl.zeros([BK], dtype=tl.float32)
    row0 = pid_bh.to(tl.int64) * NC
    m1, m1v = off * 0 + 1 < NC, fk * 0 + 1 < NC
    U0 = tl.load(u_ptr + row0 * (F * V) + off)
    a0, z0 = tl.load(a_ptr + row0 * F + fk), tl.load(uz_ptr + row0 * F + fk)
    U1 = tl.load(u_ptr + (row0 + 1) * (F * V) + off, mask=m1, other=0.0)
    a1 = tl.load(a_ptr + (row0 + 1) * F + fk, mask=m1v, other=1.0)
    z1 = tl.load(uz_ptr + (row0 + 1) * F + fk, mask=m1v, other=0.0)
    for n in range(NC):
        U, a, uz = U0, a0, z0
        U0, a0, z0 = U1, a1, z1
        ahead = row0 + n + 2
        m2, m2v = off * 0 + n + 2 < NC, fk * 0 + n + 2 < NC
        U1 = tl.load(u_ptr + ahead * (F * V) + off, mask=m2, other=0.0)
        a1 = tl.load(a_ptr + ahead * F + fk, mask=m2v, other=1.0)
        z1 = tl.load(uz_ptr + ahead * F + fk, mask=m2v, other=0.0)
        tl.store(hs_ptr + (row0 + n) * (F * V) + off, S.to(hs_ptr.dtype.element_ty))
        tl.store(zs_ptr + (row0 + n) * F + fk, z, mask=first)
        S = a[:, None] * S + U
        z = a * z + uz
    if STORE_FINAL:
        tl.store(st_ptr + pid_bh.to(tl.int64) * F * V + off, S)
        tl.store(zt_ptr + pid_bh.to(tl.int64) * F + fk, z, mask=first)


@triton.jit
def _exact_scores(q_base, k_base, x_base, real, row0, local, T, inv_norm,
                  QK_STRIDE: tl.constexpr, X_STRIDE: tl.constexpr, F: tl.constexpr, C: tl.constexpr):
    """``A_ij = sum_f q_if k_jf exp(G_if - G_jf)`` for j <= i, one key column per step, every
    exponent masked to <= 0 before the exp (the strong-gate path). Reloads its tiles, so the fast
    path does not keep them live."""
    fk = tl.arange(0, F)
    m = real[:, None]
    q = _tile(q_base, row0, local, fk, T, QK_STRIDE).to(tl.float32)
    k = tl.where(m, _tile(k_base, row0, local, fk, T, QK_STRIDE).to(tl.float32), 0.0)
    Gc = tl.cumsum(tl.where(m, _log_gate(_tile(x_base, row0, local, fk, T, X_STRIDE).to(tl.float32),
                                         inv_norm), 0.0), axis=0)
    A = tl.zeros([C, C], dtype=tl.float32)
    for j in range(C):
        sel = local == j
        k_j = tl.sum(tl.where(sel[:, None], k, 0.0), axis=0)                   # row j of k   [F]
        G_j = tl.sum(tl.where(sel[:, None], Gc, 0.0), axis=0)                  # row j of G   [F]
        below = (local >= j)[:, None]
        w = tl.exp(tl.where(below, Gc - G_j[None, :], float("-inf")))
        col = tl.sum(q * k_j[None, :] * w, axis=1)                             # [C]
        A = tl.where(sel[None, :], col[:, None], A)
    return A


@triton.jit
def _chunk_output(q_dec, A, v_base, hs_ptr, zs_ptr, p_ptr, pz_ptr, d_ptr, o_ptr, b, h, pid_bh, n, NS, NCP,
                  row0, local, fk, fv, m, rows_ok, T, eps, H: tl.constexpr, HKV: tl.constexpr, F: tl.constexpr,
                  V: tl.constexpr, GROUP: tl.constexpr, PREC: tl.constexpr):
    """``o = ((q e^G) S_n + A v) / ((q e^G) . z_n + rowsum(A) + eps)`` for one chunk and value block,
    stored in o's dtype in the rows ``rows_ok`` [C]. With GROUP > 1 ("grouped" state pass) hs / zs
    hold the start states of groups of GROUP chunks (NS per head) and ``S_n = D_n S_g + P_n`` (two
    dots: ``(q e^G D_n) S_g + (q e^G) P_n``); else they hold every chunk's start state."""
    dt = v_base.dtype.element_ty
    v = tl.where(m, _tile(v_base, row0, local, fv, T, HKV * V), 0.0).to(dt)
    srow = pid_bh.to(tl.int64) * NS + n // GROUP
    s_off = fk[:, None] * V + fv[None, :]
    S = tl.load(hs_ptr + srow * (F * V) + s_off)
    z = tl.load(zs_ptr + srow * F + fk)
    if GROUP > 1:
        prow = pid_bh.to(tl.int64) * NCP + n
        dn = tl.load(d_ptr + prow * F + fk)
        num = tl.dot((q_dec * dn[None, :]).to(dt), S.to(dt), input_precision=PREC)
        num = tl.dot(q_dec.to(dt), tl.load(p_ptr + prow * (F * V) + s_off).to(dt), acc=num, input_precision=PREC)
        z = dn * z + tl.load(pz_ptr + prow * F + fk)
    else:
        num = tl.dot(q_dec.to(dt), S.to(dt), input_precision=PREC)
    num = tl.dot(A.to(dt), v, acc=num, input_precision=PREC)
    den = tl.sum(q_dec * z[None, :], axis=1) + tl.sum(A, axis=1)
    o = num / (den + eps)[:, None]
    o_off = (b.to(tl.int64) * T + row0) * (H * V) + h * V
    tl.store(o_ptr + o_off + (local[:, None] * (H * V) + fv[None, :]), o.to(o_ptr.dtype.element_ty),
             mask=rows_ok[:, None])


@triton.jit
def _output_program(q_ptr, k_ptr, x_ptr, v_ptr, valid_ptr, T, H: tl.constexpr, G: tl.constexpr, F: tl.constexpr,
                    V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, HAS_VALID: tl.constexpr):
    """Set-up of an output-pass program, grid ``(chunks, B*H, V/BV)``: ``(n, pid_bh, b, h, local,
    fk, fv, row0, real, q_base, k_base, x_base, v_base)``, the bases pointing at (batch, head) of
    the ``[B, T, H, F]`` features and at (batch, kv head) of the logits and values."""
    n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    HKV: tl.constexpr = H // G
    row0 = n * C
    local = tl.arange(0, C)
    real = _real_rows(valid_ptr, b, row0, local, T, HAS_VALID)
    q_base = q_ptr + b.to(tl.int64) * T * (H * F) + h * F
    k_base = k_ptr + b.to(tl.int64) * T * (H * F) + h * F
    x_base = x_ptr + b.to(tl.int64) * T * (HKV * F) + (h // G) * F
    v_base = v_ptr + b.to(tl.int64) * T * (HKV * V) + (h // G) * V
    return (n, pid_bh, b, h, local, tl.arange(0, F), tl.program_id(2) * BV + tl.arange(0, BV), row0, real,
            q_base, k_base, x_base, v_base)


@triton.jit
def _output_kernel(q_ptr, k_ptr, v_ptr, x_ptr, valid_ptr, hs_ptr, zs_ptr, p_ptr, pz_ptr, d_ptr, o_ptr, strong_ptr,
                   T, NS, NCP, inv_norm, eps, span_max,
                   H: tl.constexpr, G: tl.constexpr, F: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                   BV: tl.constexpr, GROUP: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr):
    """Pass 2: o = num / (den + eps) for one chunk of one (batch, head) and value block, with the
    factored in-chunk scores. A chunk whose gates are too strong for them (span > span_max) is only
    flagged in ``strong`` [NC, B*H] and left to :func:`_output_exact_kernel`: keeping the exact
    scores out of this kernel keeps its registers for the common case (the sm_90 build spilled
    about 1 KB per thread with them; without, 0.24 KB, or 0.6 KB with the grouped pass's second
    state tile: ``python -m benchmarks.prefill_registers``)."""
    n, pid_bh, b, h, local, fk, fv, row0, real, q_base, k_base, x_base, v_base = _output_program(
        q_ptr, k_ptr, x_ptr, v_ptr, valid_ptr, T, H, G, F, V, C, BV, HAS_VALID)
    m = real[:, None]
    HKV: tl.constexpr = H // G
    dt = v_ptr.dtype.element_ty
    x = _tile(x_base, row0, local, fk, T, HKV * F)
    q = _tile(q_base, row0, local, fk, T, H * F)
    k = _tile(k_base, row0, local, fk, T, H * F)
    g = tl.where(m, _log_gate(x.to(tl.float32), inv_norm), 0.0)
    Gc = tl.cumsum(g, axis=0)                                                  # [C, F], <= 0
    q_dec = q.to(tl.float32) * tl.exp(Gc)                                      # <= q
    k_grow = tl.where(m, k.to(tl.float32) * tl.exp(-Gc), 0.0)                  # <= k e^span
    A = tl.dot(q_dec.to(dt), tl.trans(k_grow.to(dt)), input_precision=PREC)
    A = tl.where(local[:, None] >= local[None, :], A, 0.0)
    strong = (tl.max(-tl.sum(g, axis=0), axis=0) > span_max).to(tl.int32)   # e^span would overflow
    tl.store(strong_ptr + n * tl.num_programs(1) + pid_bh, strong.to(tl.int8))
    rows_ok = (row0 + local < T) & (local * 0 + strong == 0)
    _chunk_output(q_dec, A, v_base, hs_ptr, zs_ptr, p_ptr, pz_ptr, d_ptr, o_ptr, b, h, pid_bh, n, NS, NCP,
                  row0, local, fk, fv, m, rows_ok, T, eps, H, HKV, F, V, GROUP, PREC)


@triton.jit
def _output_exact_kernel(q_ptr, k_ptr, v_ptr, x_ptr, valid_ptr, hs_ptr, zs_ptr, p_ptr, pz_ptr, d_ptr, o_ptr,
                         strong_ptr, T, NS, NCP, inv_norm, eps,
                         H: tl.constexpr, G: tl.constexpr, F: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                         BV: tl.constexpr, GROUP: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr):
    """Pass 2b, same grid: the chunks :func:`_output_kernel` flagged as strong-gated, with the exact
    in-chunk scores (:func:`_exact_scores`); every other program reads its flag and exits."""
    if tl.load(strong_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) != 0:
        n, pid_bh, b, h, local, fk, fv, row0, real, q_base, k_base, x_base, v_base = _output_program(
            q_ptr, k_ptr, x_ptr, v_ptr, valid_ptr, T, H, G, F, V, C, BV, HAS_VALID)
        m = real[:, None]
        HKV: tl.constexpr = H // G
        Gc = tl.cumsum(tl.where(m, _log_gate(_tile(x_base, row0, local, fk, T, HKV * F).to(tl.float32), inv_norm),
                                0.0), axis=0)
        q_dec = _tile(q_base, row0, local, fk, T, H * F).to(tl.float32) * tl.exp(Gc)
        A = _exact_scores(q_base, k_base, x_base, real, row0, local, T, inv_norm, H * F, HKV * F, F, C)
        _chunk_output(q_dec, A, v_base, hs_ptr, zs_ptr, p_ptr, pz_ptr, d_ptr, o_ptr, b, h, pid_bh, n, NS, NCP,
                      row0, local, fk, fv, m, row0 + local < T, T, eps, H, HKV, F, V, GROUP, PREC)


def prefill_supported(feature_size: int, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether :func:`lawcat_prefill` takes these widths and dtype (else use the other fused path)."""
    return feature_size in SUPPORTED_DIMS and head_dim in SUPPORTED_DIMS and dtype in SPAN_MAX


def _check_shapes(phi_q, phi_k, v, logits, valid, S0, z0) -> None:
    B, T, H, Fd = phi_q.shape
    if tuple(phi_k.shape) != (B, T, H, Fd):
        raise ValueError(f"phi_k has shape {tuple(phi_k.shape)}, expected phi_q's {(B, T, H, Fd)}")
    if v.dim() != 4 or v.shape[:2] != (B, T) or H % v.shape[2]:
        raise ValueError(f"v has shape {tuple(v.shape)}; expected [B, T, H_kv, V] = [{B}, {T}, H_kv, V] "
                         f"with H_kv dividing {H}")
    Hkv, V = v.shape[2], v.shape[3]
    if tuple(logits.shape) != (B, T, Hkv, Fd):
        raise ValueError(f"gate logits have shape {tuple(logits.shape)}, expected [B, T, H_kv, F] = "
                         f"{(B, T, Hkv, Fd)}")
    if Fd not in SUPPORTED_DIMS or V not in SUPPORTED_DIMS:
        raise ValueError(f"feature size {Fd} / head dim {V}: the prefill kernels take {SUPPORTED_DIMS}; "
                         f"use fused_attend's other path (prefill_supported() says which)")
    if T == 0:
        raise ValueError("lawcat_prefill needs at least one token (T = 0); skip the call for empty inputs")
    if valid is not None and tuple(valid.shape) != (B, T):
        raise ValueError(f"valid has shape {tuple(valid.shape)}, expected {(B, T)}")
    if (S0 is None) != (z0 is None):
        raise ValueError("pass both initial states (S0 [B, H, F, V] and z0 [B, H, F]) or neither")
    if S0 is not None and (tuple(S0.shape) != (B, H, Fd, V) or tuple(z0.shape) != (B, H, Fd)):
        raise ValueError(f"initial states {tuple(S0.shape)} / {tuple(z0.shape)}, expected "
                         f"{(B, H, Fd, V)} / {(B, H, Fd)}")


def lawcat_prefill(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, logits: torch.Tensor,
                   normalizer: float, valid: torch.Tensor | None = None,
                   initial_state: tuple[torch.Tensor, torch.Tensor] | None = None, eps: float = 1e-10,
                   output_final_state: bool = False, out_dtype: torch.dtype | None = None,
                   blocks: dict | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Normalised gated linear attention forward (no autograd): LAWCAT's prefill in four launches
    (chunk states, then the output pass; module docstring).

    Args:
        phi_q, phi_k (torch.Tensor): feature-mapped queries/keys ``[B, T, H, F]`` (bf16, fp16 or
            float32; phi_k zero at padding, as ``conv_feature_map`` writes it).
        v (torch.Tensor): values ``[B, T, H_kv, V]`` (cast to phi's dtype); query head h reads
            kv head ``h // (H / H_kv)``, as the gate does.
        logits (torch.Tensor): gate logits ``[B, T, H_kv, F]`` (``GlaGate.logits``); the log gate is
            ``logsigmoid(logits) / normalizer``, 0 at padding.
        normalizer (float): the gate's normaliser.
        valid (torch.Tensor, Optional): ``[B, T]`` bool/int, False at padding (gate 0, key and
            value dropped there).
        initial_state (tuple, Optional): ``(S0 [B, H, F, V], z0 [B, H, F])`` from the cache.
        eps (float): added to the denominator. Default: 1e-10.
        output_final_state (bool): also return the final ``S`` and ``z``. Default: False.
        out_dtype (torch.dtype, Optional): dtype of o. Default: phi_q's.
        blocks (dict, Optional): launch-table overrides (tests, benchmark sweeps): ``chunk``,
            ``state_mode`` (``"grouped"``, ``"scan"``, ``"recurrent"``), ``group`` (chunks per
            grouped program, a power of 2, used as given), ``group_bk``, ``state_bk``, ``state_bv``,
            ``update_bv`` (also the grouped pass's value block), ``out_bv``, ``<pass>_warps``,
            ``<pass>_stages`` (pass: state, update (also the grouped pass), out), ``state_dtype``,
            ``span_max``, ``state_split`` (False: one bf16/fp16 dot for the state update instead
            of two).

    Returns:
        ``(o [B, T, H, V] in out_dtype, S [B, H, F, V] float32 or None, z [B, H, F] float32 or None)``.
    """
    S0, z0 = initial_state if initial_state is not None else (None, None)
    _check_shapes(phi_q, phi_k, v, logits, valid, S0, z0)
    blocks = blocks or {}
    dtype = phi_q.dtype
    args = (phi_q.contiguous(), phi_k.to(dtype).contiguous(), v.to(dtype).contiguous(), logits.contiguous(),
            valid.to(torch.int8).contiguous() if valid is not None else None, 1.0 / float(normalizer))
    states, sT, zT = _state_pass(*args, S0, z0, output_final_state, blocks)
    o = _output_pass(*args, states, float(eps), out_dtype or dtype, blocks)
    return o, sT, zT


class _ChunkStates(NamedTuple):
    """What pass 1 leaves for the output pass. ``hs [B*H, ns, F, V]`` / ``zs [B*H, ns, F]``: the
    start state of every chunk (group = 1) or of every group of ``group`` chunks, with then the
    in-group prefixes ``p [B*H, ncp, F, V]``, ``pz`` and decays ``d [B*H, ncp, F]`` per chunk."""
    hs: torch.Tensor
    zs: torch.Tensor
    ns: int
    group: int = 1
    p: torch.Tensor | None = None
    pz: torch.Tensor | None = None
    d: torch.Tensor | None = None
    ncp: int = 0


def _meta(q: torch.Tensor, v: torch.Tensor, valid, blocks: dict) -> dict:
    B, T, H, Fd = q.shape
    return dict(H=H, G=H // v.shape[2], F=Fd, V=v.shape[3], C=blocks.get("chunk", CHUNK),
                HAS_VALID=valid is not None, PREC="ieee" if q.dtype == torch.float32 else "tf32")


def _group_size(NC: int, programs_per_group: int, blocks: dict, device: torch.device) -> int:
    """Chunks per "grouped" program: ``blocks["group"]`` as given, else ``GROUP`` halved while half
    would still cover all NC chunks, and on CUDA while it would leave fewer than
    ``GROUP_PROGRAMS_PER_SM`` programs per multiprocessor (short sequences). 1 means the "scan" pass."""
    group = blocks.get("group", GROUP)
    if group < 1 or group & (group - 1):
        raise ValueError(f"group={group}: chunks per grouped state program must be a power of 2 >= 1")
    if "group" in blocks:
        return group
    while group > 1 and group // 2 >= NC:
        group //= 2
    if device.type == "cuda":
        want = GROUP_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
        while group > 1 and triton.cdiv(NC, group) * programs_per_group < want:
            group //= 2
    return group


def _state_pass(q, k, v, x, valid, inv_norm, S0, z0, output_final_state, blocks):
    """Pass 1 on contiguous inputs: ``(_ChunkStates, S_T, z_T)``; S_T and z_T are None unless
    ``output_final_state``."""
    B, T, H, Fd = q.shape
    V = v.shape[3]
    meta = _meta(q, v, valid, blocks)
    NC = triton.cdiv(T, meta["C"])
    bk, bv = min(blocks.get("state_bk", STATE_BK), Fd), min(blocks.get("state_bv", STATE_BV), V)
    dev = q.device
    state_dtype = blocks.get("state_dtype", STATE_DTYPE) or q.dtype
    split = q.dtype != torch.float32 and blocks.get("state_split", STATE_SPLIT)
    sT = _empty((B, H, Fd, V), torch.float32, dev) if output_final_state else None
    zT = _empty((B, H, Fd), torch.float32, dev) if output_final_state else None
    mode = blocks.get("state_mode", STATE_MODE)
    if mode not in ("grouped", "scan", "recurrent"):
        raise ValueError(f"state_mode={mode!r}: use 'grouped', 'scan' or 'recurrent'")
    ubv = min(blocks.get("update_bv", UPDATE_BV), V)
    launch = dict(num_warps=blocks.get("update_warps", WARPS["update"]),
                  num_stages=blocks.get("update_stages", STAGES["update"]))
    gbk = min(blocks.get("group_bk", GROUP_BK), Fd)
    group = _group_size(NC, B * H * (Fd // gbk) * (V // ubv), blocks, dev) if mode == "grouped" else 1
    if mode == "grouped" and group > 1:  # in-group prefixes per chunk, group totals for the scan
        # (a group of one chunk is the "scan" pass below)
        NG = triton.cdiv(NC, group)
        ncp = NG * group                   # the last group's chunks past T are identity updates
        p = _empty((B * H, ncp, Fd, V), state_dtype, dev)
        pz = _empty((B * H, ncp, Fd), torch.float32, dev)
        d = _empty((B * H, ncp, Fd), torch.float32, dev)
        u = _empty((B * H, NG, Fd, V), torch.float32, dev)
        uz = _empty((B * H, NG, Fd), torch.float32, dev)
        a = _empty((B * H, NG, Fd), torch.float32, dev)
        _chunk_group_kernel[(NG, B * H, (Fd // gbk) * (V // ubv))](
            k, v, x, valid if valid is not None else q, p, pz, d, u, uz, a, T, ncp, inv_norm, BK=gbk, BV=ubv,
            GROUP=group, SPLIT=split, **launch, **meta)
        hs = _empty((B * H, NG, Fd, V), state_dtype, dev)
        zs = _empty((B * H, NG, Fd), torch.float32, dev)
        states = _ChunkStates(hs, zs, NG, group, p, pz, d, ncp)
    elif mode == "recurrent":
        hs = _empty((B * H, NC, Fd, V), state_dtype, dev)
        zs = _empty((B * H, NC, Fd), torch.float32, dev)
        states = _ChunkStates(hs, zs, NC)
    else:  # chunk updates in parallel, then the scan (in place over them when the dtypes agree)
        u = _empty((B * H, NC, Fd, V), torch.float32, dev)
        uz = _empty((B * H, NC, Fd), torch.float32, dev)
        a = _empty((B * H, NC, Fd), torch.float32, dev)
        _chunk_update_kernel[(NC, B * H, V // ubv)](
            k, v, x, valid if valid is not None else q, u, uz, a, T, NC, inv_norm, BV=ubv, SPLIT=split,
            **launch, **meta)
        hs = u if state_dtype == torch.float32 else _empty((B * H, NC, Fd, V), state_dtype, dev)
        states = _ChunkStates(hs, uz, NC)
    hs, zs = states.hs, states.zs
    s0 = S0.float().contiguous() if S0 is not None else hs
    z0c = z0.float().contiguous() if z0 is not None else zs
    final = dict(HAS_INIT=S0 is not None, STORE_FINAL=output_final_state,
                 num_warps=blocks.get("state_warps", WARPS["state"]))
    outs = (hs, zs, sT if sT is not None else hs, zT if zT is not None else zs)
    if mode == "recurrent":
        _state_kernel[(B * H, Fd // bk, V // bv)](
            k, v, x, valid if valid is not None else q, s0, z0c, *outs, T, NC, inv_norm, BK=bk, BV=bv,
            SPLIT=split, num_stages=blocks.get("state_stages", STAGES["state"]), **final, **meta)
    else:
        _state_scan_kernel[(B * H, Fd // bk, V // bv)](
            u, uz, a, s0, z0c, *outs, states.ns, F=Fd, V=V, BK=bk, BV=bv, num_stages=1, **final)
    return states, sT, zT


def _output_pass(q, k, v, x, valid, inv_norm, states: _ChunkStates, eps, out_dtype, blocks):
    """Pass 2 on contiguous inputs and pass 1's states: ``o [B, T, H, V]``."""
    B, T, H, Fd = q.shape
    V = v.shape[3]
    meta = _meta(q, v, valid, blocks)
    NC = triton.cdiv(T, meta["C"])
    obv = min(blocks.get("out_bv", OUT_BV), V)
    o = _empty((B, T, H, V), out_dtype, q.device)
    strong = torch.empty((NC, B * H), dtype=torch.int8, device=q.device)  # each program writes its flag
    hs, zs = states.hs, states.zs
    prefix = (states.p, states.pz, states.d) if states.group > 1 else (hs, zs, zs)   # unread when group = 1
    args = (q, k, v, x, valid if valid is not None else q, hs, zs, *prefix, o, strong, T, states.ns, states.ncp,
            inv_norm, eps)
    meta.update(BV=obv, GROUP=states.group, num_warps=blocks.get("out_warps", WARPS["out"]),
                num_stages=blocks.get("out_stages", STAGES["out"]))
    grid = (NC, B * H, V // obv)
    _output_kernel[grid](*args, float(blocks.get("span_max", SPAN_MAX[q.dtype])), **meta)
    _output_exact_kernel[grid](*args, **meta)
    return o
