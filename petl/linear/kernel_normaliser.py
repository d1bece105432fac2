"""Triton kernels for LAWCAT's gate, normaliser and final division (the GLA core runs elsewhere).

With a GLA core that computes only the numerator ``num_t = phi(q_t)^T S_t`` over the values
(V = head_dim, a multiple of 16, so no ones column is needed), the rest of the layer is per
channel and per token:

    g_t   = logsigmoid(x_t) / n                 # x: gate logits of the kv head; 0 at padding
    z_t   = exp(g_t) * z_{t-1} + k_t            # per feature f; z_{-1} from the cache or 0
    den_t = sum_f q_t[f] z_t[f]
    o_t   = num_t / (den_t + eps)

The recurrence is linear, so ``gate_normaliser`` splits it into chunks of C tokens instead of
walking the sequence (a sequential walk leaves the GPU waiting on memory latency):

1. summaries, one program per (chunk, feature block, head), all in parallel: write g, and the
   chunk's total decay ``A_n = exp(G_last)`` and local end state
   ``Z_n = sum_s k_s exp(G_last - G_s)`` (G the in-chunk cumulative log gate; each exp <= 1);
2. carries: ``c_{n+1} = A_n c_n + Z_n`` from ``c_0 = z_{-1}``, a blocked associative scan over
   the T / C summaries of each (head, feature block); ``c_N = z_T``;
3. den, one program per (chunk, head): the in-chunk scan over pairs ``(exp(g_t), k_t)`` with the
   combine ``(a1, b1) o (a2, b2) = (a1 a2, b1 a2 + b2)``, started from ``c_n``.

Pass 1 reads k and the logits and writes g, pass 3 reads q, k and the logits again, pass 2
touches only ``3 K T / C`` floats per head: about 40% more traffic than one sequential walk,
in exchange for ``B H T / C`` independent programs instead of ``B H K / 16``. (Folding pass 3
into the division would save only den's round trip, ``4 B H T`` bytes: the fix-up needs q and
the in-chunk gates of every token, so it reads them either way.) The backward pass has the same
shape, with the adjoint recurrence run backwards:

    lambda_t = q_t dden_t + exp(g_{t+1}) lambda_{t+1}           (lambda_{T-1} includes dz_T)
    nu_{n-1} = L_n + A_n nu_n,  L_n = sum_{t in n} q_t dden_t exp(G_t),  nu_{N-1} = dz_T
    dq_t = dden_t z_t,  dk_t = lambda_t,  dg_t = lambda_t (z_t - k_t) + dg_core_t,
    dx_t = dg_t * sigmoid(-x_t) / n,  dz_{-1} = nu_{-1},

where ``nu_n = exp(g) lambda`` at the first token after chunk n is what flows into chunk n from
the right: (1) chunk sums L_n, A_n; (2) a reverse scan for nu; (3) per chunk, z from the saved
carries and lambda by a reverse in-chunk scan. Float32 accumulation throughout; the references
are :func:`petl.linear.naive.naive_recurrent_gla` (a ones column) and plain PyTorch for the
division.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Launch table for the GPU (tests pass smaller chunks), measured on the H200 at N = 32k, K = 128,
# bf16 (`python -m benchmarks.lawcat_layer --components 32768`, 2026-11-29): 32-token chunks and
# 64-feature blocks ran 1.11 / 3.31 ms (fwd / fwd+bwd without dg), against 1.14 / 4.08 with 128
# features, 1.57 / 4.40 with 64-token chunks, 1.31 / 3.89 with 16-token chunks, and 3.59 with a
# 4-warp backward; the sequential kernel it replaced ran 1.15 / 4.08 ms. The forward did not get
# faster (it stays latency-bound at about 1.7 TB/s); the backward did.
CHUNK = 32          # tokens per chunk: T / C programs per head and feature block
BLOCK_F = 64        # features per program (den loops over the feature blocks)
SCAN_BLOCK = 64     # chunk summaries per step of the carry scan
WARPS = {"summary": 4, "scan": 4, "den": 4, "sums": 4, "bwd": 8}


def _empty(shape, dtype, device) -> torch.Tensor:
    """Output allocation (a seam for tests, which poison outputs with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _lin_rec(a1, b1, a2, b2):
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _log_gate(x, inv_norm):
    # logsigmoid(x) / n without overflow for any x
    return (tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))) * inv_norm


@triton.jit
def _gate_tile(x_ptr, valid_ptr, b, row0, local, cols, T, inv_norm, x_row: tl.constexpr, K: tl.constexpr,
               HAS_VALID: tl.constexpr):
    """Log gate of rows ``row0 + local`` x cols (0 outside the sequence and at padding); also
    returns x and the mask. x_ptr points at (batch, kv head); addresses are a 64-bit scalar base
    plus 32-bit tile offsets (per-element 64-bit pointers cost registers)."""
    rows = row0 + local
    rm = (rows >= 0) & (rows < T)
    m2 = rm[:, None] & (cols < K)[None, :]
    bx = tl.load(x_ptr + row0.to(tl.int64) * x_row + (local[:, None] * x_row + cols[None, :]), mask=m2,
                 other=0.0).to(tl.float32)
    bg = _log_gate(bx, inv_norm)
    if HAS_VALID:
        vr = tl.load(valid_ptr + b * T + rows, mask=rm, other=0)
        m2 = m2 & (vr != 0)[:, None]
    return tl.where(m2, bg, 0.0), bx, m2


@triton.jit
def _chunk_feature_block(x_ptr, T, H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                         BF: tl.constexpr):
    """Set-up of a program on grid ``(chunks, K/BF, B*H)``: ``(n, pid_bh, b, local, row0, rm, cols,
    cm, m2, base, offs, x_base)``; ``base + offs`` addresses the chunk's ``[BT, BF]`` tile of a
    ``[B, T, H, K]`` tensor, x_base the logits of (batch, kv head)."""
    n = tl.program_id(0)
    pid_bh = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    HKV: tl.constexpr = H // G
    cols = tl.program_id(1) * BF + tl.arange(0, BF)
    cm = cols < K
    row0 = n * BT
    local = tl.arange(0, BT)
    rm = row0 + local < T
    m2 = rm[:, None] & cm[None, :]
    base = (b.to(tl.int64) * T + row0) * (H * K) + h * K
    offs = local[:, None] * (H * K) + cols[None, :]
    x_base = x_ptr + b.to(tl.int64) * T * HKV * K + (h // G) * K
    return n, pid_bh, b, local, row0, rm, cols, cm, m2, base, offs, x_base


@triton.jit
def _summary_kernel(k_ptr, x_ptr, valid_ptr, g_ptr, a_ptr, z_ptr, T, NC, inv_norm,
                    H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                    BF: tl.constexpr, HAS_VALID: tl.constexpr):
    """Pass 1: g, and per chunk A_n = exp(G_last), Z_n = sum_s k_s exp(G_last - G_s)."""
    n, pid_bh, b, local, row0, rm, cols, cm, m2, base, offs, x_base = _chunk_feature_block(x_ptr, T, H, G, K, BT, BF)
    HKV: tl.constexpr = H // G
    bg, bx, gm = _gate_tile(x_base, valid_ptr, b, row0, local, cols, T, inv_norm, HKV * K, K, HAS_VALID)
    tl.store(g_ptr + base + offs, bg, mask=m2)
    bk = tl.load(k_ptr + base + offs, mask=m2, other=0.0).to(tl.float32)
    g_last = tl.sum(bg, axis=0)
    z_end = tl.sum(bk * tl.exp(g_last[None, :] - tl.cumsum(bg, axis=0)), axis=0)
    s_off = (pid_bh.to(tl.int64) * NC + n) * K + cols
    tl.store(a_ptr + s_off, tl.exp(g_last), mask=cm)
    tl.store(z_ptr + s_off, z_end, mask=cm)


@triton.jit
def _carry_scan_kernel(a_ptr, b_ptr, init_ptr, out_ptr, NC, K: tl.constexpr, BN: tl.constexpr,
                       BF: tl.constexpr, HAS_INIT: tl.constexpr, REVERSE: tl.constexpr):
    """Pass 2: ``out[n+1] = a_n out[n] + b_n`` from ``out[0] = init`` (forward), or
    ``out[n] = b_n + a_n out[n+1]`` from ``out[NC] = init`` (reverse); out has NC + 1 rows."""
    pid_bh = tl.program_id(1)
    cols = tl.program_id(0) * BF + tl.arange(0, BF)
    cm = cols < K
    idx = tl.arange(0, BN)
    carry = tl.zeros([BF], dtype=tl.float32)
    if HAS_INIT:
        carry = tl.load(init_ptr + pid_bh * K + cols, mask=cm, other=0.0).to(tl.float32)
    s_base = pid_bh.to(tl.int64) * NC
    o_base = pid_bh.to(tl.int64) * (NC + 1)
    if REVERSE:
        tl.store(out_ptr + (o_base + NC) * K + cols, carry, mask=cm)
    else:
        tl.store(out_ptr + o_base * K + cols, carry, mask=cm)
    for i in range(tl.cdiv(NC, BN)):
        if REVERSE:
            ch = NC - (i + 1) * BN + idx
        else:
            ch = i * BN + idx
        chm = (ch >= 0) & (ch < NC)
        m2 = chm[:, None] & cm[None, :]
        so = (s_base + ch[:, None]) * K + cols[None, :]
        a = tl.load(a_ptr + so, mask=m2, other=1.0)        # identity (1, 0) outside [0, NC)
        bb = tl.load(b_ptr + so, mask=m2, other=0.0)
        pa, pb = tl.associative_scan((a, bb), axis=0, combine_fn=_lin_rec, reverse=REVERSE)
        res = pa * carry[None, :] + pb
        if REVERSE:
            tl.store(out_ptr + (o_base + ch[:, None]) * K + cols[None, :], res, mask=m2)
            carry = tl.sum(tl.where((idx == 0)[:, None], res, 0.0), axis=0)
        else:
            tl.store(out_ptr + (o_base + ch[:, None] + 1) * K + cols[None, :], res, mask=m2)
            carry = tl.sum(tl.where((idx == BN - 1)[:, None], res, 0.0), axis=0)


@triton.jit
def _den_kernel(q_ptr, k_ptr, x_ptr, valid_ptr, c_ptr, den_ptr, T, NC, inv_norm,
                H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                BF: tl.constexpr, HAS_VALID: tl.constexpr):
    """Pass 3: ``den_t = q_t . z_t`` with z from the chunk's carry and an in-chunk scan."""
    n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    HKV: tl.constexpr = H // G
    row0 = n * BT
    local = tl.arange(0, BT)
    rm = row0 + local < T
    x_base = x_ptr + b.to(tl.int64) * T * HKV * K + (h // G) * K
    base = (b.to(tl.int64) * T + row0) * (H * K) + h * K
    den = tl.zeros([BT], dtype=tl.float32)
    for f0 in tl.static_range(0, K, BF):
        cols = f0 + tl.arange(0, BF)
        cm = cols < K
        m2 = rm[:, None] & cm[None, :]
        offs = local[:, None] * (H * K) + cols[None, :]
        bg, bx, gm = _gate_tile(x_base, valid_ptr, b, row0, local, cols, T, inv_norm, HKV * K, K, HAS_VALID)
        bq = tl.load(q_ptr + base + offs, mask=m2, other=0.0).to(tl.float32)
        bk = tl.load(k_ptr + base + offs, mask=m2, other=0.0).to(tl.float32)
        carry = tl.load(c_ptr + (pid_bh.to(tl.int64) * (NC + 1) + n) * K + cols, mask=cm, other=0.0)
        A, Z = tl.associative_scan((tl.exp(bg), bk), axis=0, combine_fn=_lin_rec)
        den += tl.sum(bq * (A * carry[None, :] + Z), axis=1)
    tl.store(den_ptr + pid_bh.to(tl.int64) * T + row0 + local, den, mask=rm)


@triton.jit
def _adjoint_sums_kernel(q_ptr, x_ptr, valid_ptr, dden_ptr, a_ptr, l_ptr, T, NC, inv_norm,
                         H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                         BF: tl.constexpr, HAS_VALID: tl.constexpr):
    """Backward pass 1: per chunk A_n = exp(G_last) and L_n = sum_t q_t dden_t exp(G_t)."""
    n, pid_bh, b, local, row0, rm, cols, cm, m2, base, offs, x_base = _chunk_feature_block(x_ptr, T, H, G, K, BT, BF)
    HKV: tl.constexpr = H // G
    bg, bx, gm = _gate_tile(x_base, valid_ptr, b, row0, local, cols, T, inv_norm, HKV * K, K, HAS_VALID)
    bq = tl.load(q_ptr + base + offs, mask=m2, other=0.0).to(tl.float32)
    dd = tl.load(dden_ptr + pid_bh.to(tl.int64) * T + row0 + local, mask=rm, other=0.0)
    s_off = (pid_bh.to(tl.int64) * NC + n) * K + cols
    tl.store(a_ptr + s_off, tl.exp(tl.sum(bg, axis=0)), mask=cm)
    tl.store(l_ptr + s_off, tl.sum(bq * dd[:, None] * tl.exp(tl.cumsum(bg, axis=0)), axis=0), mask=cm)


@triton.jit
def _gate_norm_bwd_kernel(q_ptr, k_ptr, x_ptr, valid_ptr, c_ptr, nu_ptr, dden_ptr, dgc_ptr,
                          dq_ptr, dk_ptr, dx_ptr, T, NC, inv_norm,
                          H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                          BF: tl.constexpr, HAS_VALID: tl.constexpr, HAS_DG: tl.constexpr):
    """Backward pass 3: z and lambda of one chunk, then dq, dk and the gate-logit gradient."""
    n, pid_bh, b, local, row0, rm, cols, cm, m2, base, offs, x_base = _chunk_feature_block(x_ptr, T, H, G, K, BT, BF)
    HKV: tl.constexpr = H // G
    bg, bx, gm = _gate_tile(x_base, valid_ptr, b, row0, local, cols, T, inv_norm, HKV * K, K, HAS_VALID)
    bg1, bx1, gm1 = _gate_tile(x_base, valid_ptr, b, row0 + 1, local, cols, T, inv_norm, HKV * K, K, HAS_VALID)
    bq = tl.load(q_ptr + base + offs, mask=m2, other=0.0).to(tl.float32)
    bk = tl.load(k_ptr + base + offs, mask=m2, other=0.0).to(tl.float32)
    c_row = (pid_bh.to(tl.int64) * (NC + 1) + n) * K + cols
    carry = tl.load(c_ptr + c_row, mask=cm, other=0.0)
    nu = tl.load(nu_ptr + c_row + K, mask=cm, other=0.0)         # nu_n, stored at row n + 1
    A, Z = tl.associative_scan((tl.exp(bg), bk), axis=0, combine_fn=_lin_rec)
    z = A * carry[None, :] + Z
    dd = tl.load(dden_ptr + pid_bh.to(tl.int64) * T + row0 + local, mask=rm, other=0.0)
    # nu enters at the chunk's last row; rows past T have exp(g) = 1 and add nothing on the way
    c = bq * dd[:, None] + tl.where((local == BT - 1)[:, None], nu[None, :], 0.0)
    _, lam = tl.associative_scan((tl.exp(bg1), c), axis=0, combine_fn=_lin_rec, reverse=True)
    dg = lam * (z - bk)
    if HAS_DG:
        dg += tl.load(dgc_ptr + base + offs, mask=m2, other=0.0)
    dx = tl.where(gm, dg * inv_norm / (1.0 + tl.exp(bx)), 0.0)
    tl.store(dq_ptr + base + offs, (dd[:, None] * z).to(dq_ptr.dtype.element_ty), mask=m2)
    tl.store(dk_ptr + base + offs, lam.to(dk_ptr.dtype.element_ty), mask=m2)
    tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _row_block(T, H: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr):
    """Set-up of a division program on grid ``(T/BT, B*H)``: ``(pid_bh, rows, rm, m2, offs)`` with
    ``offs`` the ``[BT, BV]`` tile of (batch, head) in a ``[B, T, H, V]`` tensor."""
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.arange(0, BV)
    rm = rows < T
    m2 = rm[:, None] & (cols < V)[None, :]
    offs = b.to(tl.int64) * T * H * V + rows[:, None].to(tl.int64) * (H * V) + h * V + cols[None, :]
    return pid_bh, rows, rm, m2, offs


@triton.jit
def _div_fwd_kernel(num_ptr, den_ptr, o_ptr, T, eps, H: tl.constexpr, V: tl.constexpr,
                    BT: tl.constexpr, BV: tl.constexpr):
    pid_bh, rows, rm, m2, offs = _row_block(T, H, V, BT, BV)
    num = tl.load(num_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    den = tl.load(den_ptr + pid_bh.to(tl.int64) * T + rows, mask=rm, other=1.0)
    tl.store(o_ptr + offs, (num / (den + eps)[:, None]).to(o_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _div_bwd_kernel(num_ptr, den_ptr, do_ptr, dnum_ptr, dden_ptr, T, eps, H: tl.constexpr,
                    V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr):
    pid_bh, rows, rm, m2, offs = _row_block(T, H, V, BT, BV)
    num = tl.load(num_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    inv = 1.0 / (tl.load(den_ptr + pid_bh.to(tl.int64) * T + rows, mask=rm, other=1.0) + eps)
    tl.store(dnum_ptr + offs, (do * inv[:, None]).to(dnum_ptr.dtype.element_ty), mask=m2)
    tl.store(dden_ptr + pid_bh.to(tl.int64) * T + rows, -tl.sum(do * num, axis=1) * inv * inv, mask=rm)


def _check(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def _carry_scan(a: torch.Tensor, b: torch.Tensor, init: torch.Tensor | None, reverse: bool,
                block_f: int) -> torch.Tensor:
    """Pass 2 on ``a, b [B*H, NC, K]``: the NC + 1 carries ``[B*H, NC + 1, K]`` float32."""
    BH, NC, K = a.shape
    out = _empty((BH, NC + 1, K), torch.float32, a.device)
    bn = min(SCAN_BLOCK, max(16, triton.next_power_of_2(NC)))
    _carry_scan_kernel[(triton.cdiv(K, block_f), BH)](
        a, b, init if init is not None else out, out, NC, K=K, BN=bn, BF=block_f,
        HAS_INIT=init is not None, REVERSE=reverse, num_warps=WARPS["scan"])
    return out


class _GateNormaliser(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q, k, z0, normalizer, valid, chunk, block_f):
        B, T, H, K = q.shape
        G = H // x.shape[2]
        x, q, k = x.contiguous(), q.contiguous(), k.contiguous()
        dev = q.device
        block_f = min(block_f, max(16, triton.next_power_of_2(K)))
        NC, NF = triton.cdiv(T, chunk), triton.cdiv(K, block_f)
        meta = dict(H=H, G=G, K=K, BT=chunk, HAS_VALID=valid is not None)
        vc = valid if valid is not None else q
        g = _empty((B, T, H, K), torch.float32, dev)
        a_sum = _empty((B * H, NC, K), torch.float32, dev)
        z_sum = _empty((B * H, NC, K), torch.float32, dev)
        _summary_kernel[(NC, NF, B * H)](k, x, vc, g, a_sum, z_sum, T, NC, 1.0 / normalizer, BF=block_f,
                                        num_warps=WARPS["summary"], **meta)
        z0c = z0.float().contiguous().view(B * H, K) if z0 is not None else None
        carry = _carry_scan(a_sum, z_sum, z0c, False, block_f)                 # [B*H, NC+1, K]
        den = _empty((B, H, T), torch.float32, dev)
        _den_kernel[(NC, B * H)](q, k, x, vc, carry, den, T, NC, 1.0 / normalizer, BF=block_f,
                                 num_warps=WARPS["den"], **meta)
        zT = carry[:, NC].reshape(B, H, K).clone()
        ctx.save_for_backward(x, q, k, carry, valid)
        ctx.meta = (normalizer, chunk, block_f, G, z0 is not None)
        return g, den, zT

    @staticmethod
    def backward(ctx, dg, dden, dzT):
        x, q, k, carry, valid = ctx.saved_tensors
        normalizer, chunk, block_f, G, has_z0 = ctx.meta
        B, T, H, K = q.shape
        dev = q.device
        NC, NF = triton.cdiv(T, chunk), triton.cdiv(K, block_f)
        meta = dict(H=H, G=G, K=K, BT=chunk, BF=block_f, HAS_VALID=valid is not None)
        vc = valid if valid is not None else q
        dden = dden.float().contiguous() if dden is not None else torch.zeros(B, H, T, device=dev)
        a_sum = _empty((B * H, NC, K), torch.float32, dev)
        l_sum = _empty((B * H, NC, K), torch.float32, dev)
        _adjoint_sums_kernel[(NC, NF, B * H)](q, x, vc, dden, a_sum, l_sum, T, NC, 1.0 / normalizer,
                                              num_warps=WARPS["sums"], **meta)
        dzc = dzT.float().contiguous().view(B * H, K) if dzT is not None else None
        nu = _carry_scan(a_sum, l_sum, dzc, True, block_f)                     # [B*H, NC+1, K]
        dq = _empty(q.shape, q.dtype, dev)
        dk = _empty(k.shape, k.dtype, dev)
        dx = _empty((B, T, H, K), x.dtype if G == 1 else torch.float32, dev)  # G > 1: summed below
        dgc = dg.float().contiguous() if dg is not None else dq
        _gate_norm_bwd_kernel[(NC, NF, B * H)](q, k, x, vc, carry, nu, dden, dgc, dq, dk, dx, T, NC,
                                               1.0 / normalizer, HAS_DG=dg is not None,
                                               num_warps=WARPS["bwd"], **meta)
        if G > 1:
            dx = dx.view(B, T, H // G, G, K).sum(3).to(x.dtype)
        dz0 = nu[:, 0].reshape(B, H, K) if has_z0 else None
        return dx, dq, dk, dz0, None, None, None, None


def gate_normaliser(x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, z0: torch.Tensor | None,
                    normalizer: float, valid: torch.Tensor | None = None, block_t: int = CHUNK,
                    block_f: int = BLOCK_F) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log gate and normaliser of LAWCAT's gated linear attention, differentiable.

    Args:
        x (torch.Tensor): gate logits ``[B, T, H_kv, K]`` (any float dtype); H must be a
            multiple of H_kv (each kv head's gate serves H / H_kv query heads).
        q, k (torch.Tensor): feature-mapped queries/keys ``[B, T, H, K]``.
        z0 (torch.Tensor, Optional): normaliser state ``[B, H, K]`` (the ones column of the cached
            GLA state). Default: zeros.
        normalizer (float): the gate's ``logsigmoid(x) / normalizer``.
        valid (torch.Tensor, Optional): ``[B, T]`` int8, 0 at padding (gate 0 there).
        block_t (int): chunk length C (a power of 2 >= 16). Default: ``CHUNK``.
        block_f (int): features per program (a power of 2 >= 16). Default: ``BLOCK_F``.

    Returns:
        ``(g [B, T, H, K] float32, den [B, H, T] float32, z_T [B, H, K] float32)``.
    """
    B, T, H, K = q.shape
    _check("k", k, q.shape)
    if x.dim() != 4 or x.shape[:2] != (B, T) or x.shape[3] != K or H % x.shape[2]:
        raise ValueError(f"gate logits have shape {tuple(x.shape)}; expected [B, T, H_kv, K] = "
                         f"[{B}, {T}, H_kv, {K}] with H_kv dividing {H}")
    if T == 0:
        raise ValueError("gate_normaliser needs at least one token (T = 0); skip the call for empty inputs")
    for name, v in (("block_t", block_t), ("block_f", block_f)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name}={v} must be a power of 2 >= 16")
    if z0 is not None:
        _check("z0", z0, (B, H, K))
    if valid is not None:
        _check("valid", valid, (B, T))
        valid = valid.to(torch.int8).contiguous()
    return _GateNormaliser.apply(x, q, k, z0, float(normalizer), valid, int(block_t), int(block_f))


class _Normalise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, num, den, eps, out_dtype, block_t):
        B, T, H, V = num.shape
        num, den = num.contiguous(), den.float().contiguous()
        o = _empty(num.shape, out_dtype, num.device)
        BV = max(16, triton.next_power_of_2(V))
        _div_fwd_kernel[(triton.cdiv(T, block_t), B * H)](num, den, o, T, eps, H=H, V=V, BT=block_t, BV=BV,
                                                          num_warps=4)
        ctx.save_for_backward(num, den)
        ctx.meta = (eps, block_t, BV)
        return o

    @staticmethod
    def backward(ctx, do):
        num, den = ctx.saved_tensors
        eps, block_t, BV = ctx.meta
        B, T, H, V = num.shape
        dnum = _empty(num.shape, num.dtype, num.device)
        dden = _empty(den.shape, torch.float32, num.device)
        _div_bwd_kernel[(triton.cdiv(T, block_t), B * H)](num, den, do.contiguous(), dnum, dden, T, eps, H=H, V=V,
                                                          BT=block_t, BV=BV, num_warps=4)
        return dnum, dden, None, None, None


def normalise(num: torch.Tensor, den: torch.Tensor, eps: float, out_dtype: torch.dtype,
              block_t: int = 64) -> torch.Tensor:
    """``o = num / (den + eps)`` in float32, written in ``out_dtype``; differentiable.

    Args: num ``[B, T, H, V]`` (any float dtype), den ``[B, H, T]`` float32. Returns ``[B, T, H, V]``.
    """
    B, T, H, _ = num.shape
    _check("den", den, (B, H, T))
    return _Normalise.apply(num, den, float(eps), out_dtype, block_t)
