"""Triton kernels for LAWCAT's gate, normaliser and final division (the GLA core runs elsewhere).

With a GLA core that computes only the numerator ``num_t = phi(q_t)^T S_t`` over the values
(V = head_dim, a multiple of 16, so no ones column is needed), the rest of the layer is per
channel and per token:

    g_t   = logsigmoid(x_t) / n                 # x: gate logits of the kv head; 0 at padding
    z_t   = exp(g_t) * z_{t-1} + k_t            # per feature f; z_0 from the cache or 0
    den_t = sum_f q_t[f] z_t[f]
    o_t   = num_t / (den_t + eps)

``gate_normaliser`` computes g (float32, handed to the core) and den in one pass over q, k and
x. Each program owns one (batch, head) and 16 features and walks the sequence in blocks of BT
tokens; inside a block the linear recurrence is an associative scan over pairs
``(a, b) = (exp(g_t), k_t)`` with ``(a1, b1) o (a2, b2) = (a1 a2, b1 a2 + b2)``: every factor is
<= 1, so nothing overflows. The partial sums over features are added on the host. The backward
pass walks the blocks in reverse with the adjoint recurrence

    lambda_t = q_t dden_t + exp(g_{t+1}) lambda_{t+1}     (lambda_{T} from dz_T)
    dq_t = dden_t z_t,  dk_t = lambda_t,  dg_t = lambda_t (z_t - k_t) + dg_core_t,
    dx_t = dg_t * sigmoid(-x_t) / n,  dz_0 = exp(g_1) lambda_1,

recomputing z from the block-start values the forward pass saved (one float32 row per block).
Float32 accumulation throughout; the references are :func:`petl.linear.naive.naive_recurrent_gla`
(a ones column) and plain PyTorch for the division.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_T = 128      # tokens per scan block (GPU); tests pass smaller blocks
BLOCK_F = 16       # features per program: 16 bf16 = one 32-byte sector per row


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
def _gate_tile(x_ptr, valid_ptr, b, rows, cols, T, inv_norm, x_row: tl.constexpr, K: tl.constexpr,
               HAS_VALID: tl.constexpr):
    """Log gate of rows x cols (0 outside the sequence and at padding); also returns x."""
    rm = (rows >= 0) & (rows < T)
    m2 = rm[:, None] & (cols < K)[None, :]
    bx = tl.load(x_ptr + rows[:, None].to(tl.int64) * x_row + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    bg = _log_gate(bx, inv_norm)
    if HAS_VALID:
        vr = tl.load(valid_ptr + b * T + rows, mask=rm, other=0)
        m2 = m2 & (vr != 0)[:, None]
    return tl.where(m2, bg, 0.0), bx, m2


@triton.jit
def _gate_norm_fwd_kernel(q_ptr, k_ptr, x_ptr, valid_ptr, z0_ptr, g_ptr, den_ptr, zT_ptr, zs_ptr,
                          T, inv_norm,
                          B: tl.constexpr, H: tl.constexpr, G: tl.constexpr, K: tl.constexpr,
                          BT: tl.constexpr, BF: tl.constexpr, HAS_VALID: tl.constexpr,
                          HAS_Z0: tl.constexpr, SAVE: tl.constexpr):
    pid_f = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    HKV: tl.constexpr = H // G
    cols = pid_f * BF + tl.arange(0, BF)
    cm = cols < K
    local = tl.arange(0, BT)
    qk_base = b.to(tl.int64) * T * H * K + h * K
    x_base = x_ptr + b.to(tl.int64) * T * HKV * K + (h // G) * K
    den_base = den_ptr + ((pid_f * B + b) * H + h).to(tl.int64) * T
    carry = tl.zeros([BF], dtype=tl.float32)
    if HAS_Z0:
        carry = tl.load(z0_ptr + pid_bh * K + cols, mask=cm, other=0.0).to(tl.float32)
    NT = tl.cdiv(T, BT)
    for n in range(NT):
        rows = n * BT + local
        rm = rows < T
        m2 = rm[:, None] & cm[None, :]
        offs = qk_base + rows[:, None].to(tl.int64) * (H * K) + cols[None, :]
        bq = tl.load(q_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        bk = tl.load(k_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        bg, bx, gm = _gate_tile(x_base, valid_ptr, b, rows, cols, T, inv_norm, HKV * K, K, HAS_VALID)
        tl.store(g_ptr + offs, bg, mask=m2)
        if SAVE:
            tl.store(zs_ptr + (pid_bh.to(tl.int64) * NT + n) * K + cols, carry, mask=cm)
        A, Z = tl.associative_scan((tl.exp(bg), bk), axis=0, combine_fn=_lin_rec)
        z = A * carry[None, :] + Z
        tl.store(den_base + rows, tl.sum(bq * z, axis=1), mask=rm)
        carry = tl.sum(tl.where((local == BT - 1)[:, None], z, 0.0), axis=0)
    tl.store(zT_ptr + pid_bh * K + cols, carry, mask=cm)


@triton.jit
def _gate_norm_bwd_kernel(q_ptr, k_ptr, x_ptr, valid_ptr, zs_ptr, dden_ptr, dgc_ptr, dzT_ptr,
                          dq_ptr, dk_ptr, dx_ptr, dz0_ptr,
                          T, inv_norm,
                          H: tl.constexpr, G: tl.constexpr, K: tl.constexpr,
                          BT: tl.constexpr, BF: tl.constexpr, HAS_VALID: tl.constexpr,
                          HAS_DG: tl.constexpr, HAS_DZT: tl.constexpr):
    pid_f = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    HKV: tl.constexpr = H // G
    cols = pid_f * BF + tl.arange(0, BF)
    cm = cols < K
    local = tl.arange(0, BT)
    qk_base = b.to(tl.int64) * T * H * K + h * K
    x_base = x_ptr + b.to(tl.int64) * T * HKV * K + (h // G) * K
    mu = tl.zeros([BF], dtype=tl.float32)           # lambda of the first token of the next block
    if HAS_DZT:
        mu = tl.load(dzT_ptr + pid_bh * K + cols, mask=cm, other=0.0).to(tl.float32)
    dz0 = tl.zeros([BF], dtype=tl.float32)
    NT = tl.cdiv(T, BT)
    for i in range(NT):
        n = NT - 1 - i
        rows = n * BT + local
        rm = rows < T
        m2 = rm[:, None] & cm[None, :]
        offs = qk_base + rows[:, None].to(tl.int64) * (H * K) + cols[None, :]
        bq = tl.load(q_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        bk = tl.load(k_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        bg, bx, gm = _gate_tile(x_base, valid_ptr, b, rows, cols, T, inv_norm, HKV * K, K, HAS_VALID)
        bg1, bx1, gm1 = _gate_tile(x_base, valid_ptr, b, rows + 1, cols, T, inv_norm, HKV * K, K, HAS_VALID)
        carry = tl.load(zs_ptr + (pid_bh.to(tl.int64) * NT + n) * K + cols, mask=cm, other=0.0)
        a = tl.exp(bg)
        A, Z = tl.associative_scan((a, bk), axis=0, combine_fn=_lin_rec)
        z = A * carry[None, :] + Z
        dd = tl.load(dden_ptr + pid_bh.to(tl.int64) * T + rows, mask=rm, other=0.0)
        a1 = tl.exp(bg1)
        c = bq * dd[:, None] + tl.where((local == BT - 1)[:, None], a1 * mu[None, :], 0.0)
        _, lam = tl.associative_scan((a1, c), axis=0, combine_fn=_lin_rec, reverse=True)
        dg = lam * (z - bk)
        if HAS_DG:
            dg += tl.load(dgc_ptr + offs, mask=m2, other=0.0)
        dx = tl.where(gm, dg * inv_norm / (1.0 + tl.exp(bx)), 0.0)
        tl.store(dq_ptr + offs, (dd[:, None] * z).to(dq_ptr.dtype.element_ty), mask=m2)
        tl.store(dk_ptr + offs, lam.to(dk_ptr.dtype.element_ty), mask=m2)
        tl.store(dx_ptr + offs, dx, mask=m2)
        first = (local == 0)[:, None]
        mu = tl.sum(tl.where(first, lam, 0.0), axis=0)
        dz0 = tl.sum(tl.where(first, a * lam, 0.0), axis=0)
    tl.store(dz0_ptr + pid_bh * K + cols, dz0, mask=cm)


@triton.jit
def _div_fwd_kernel(num_ptr, den_ptr, o_ptr, T, eps, H: tl.constexpr, V: tl.constexpr,
                    BT: tl.constexpr, BV: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_t * BT + tl.arange(0, BT)
    cols = tl.arange(0, BV)
    rm = rows < T
    m2 = rm[:, None] & (cols < V)[None, :]
    offs = b.to(tl.int64) * T * H * V + rows[:, None].to(tl.int64) * (H * V) + h * V + cols[None, :]
    num = tl.load(num_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    den = tl.load(den_ptr + pid_bh.to(tl.int64) * T + rows, mask=rm, other=1.0)
    tl.store(o_ptr + offs, (num / (den + eps)[:, None]).to(o_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _div_bwd_kernel(num_ptr, den_ptr, do_ptr, dnum_ptr, dden_ptr, T, eps, H: tl.constexpr,
                    V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_t * BT + tl.arange(0, BT)
    cols = tl.arange(0, BV)
    rm = rows < T
    m2 = rm[:, None] & (cols < V)[None, :]
    offs = b.to(tl.int64) * T * H * V + rows[:, None].to(tl.int64) * (H * V) + h * V + cols[None, :]
    num = tl.load(num_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    inv = 1.0 / (tl.load(den_ptr + pid_bh.to(tl.int64) * T + rows, mask=rm, other=1.0) + eps)
    tl.store(dnum_ptr + offs, (do * inv[:, None]).to(dnum_ptr.dtype.element_ty), mask=m2)
    tl.store(dden_ptr + pid_bh.to(tl.int64) * T + rows, -tl.sum(do * num, axis=1) * inv * inv, mask=rm)


def _check(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


class _GateNormaliser(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q, k, z0, normalizer, valid, block_t, block_f, warps):
        B, T, H, K = q.shape
        G = H // x.shape[2]
        x, q, k = x.contiguous(), q.contiguous(), k.contiguous()
        dev = q.device
        NF, NT = triton.cdiv(K, block_f), triton.cdiv(T, block_t)
        g = _empty((B, T, H, K), torch.float32, dev)
        den_parts = _empty((NF, B, H, T), torch.float32, dev)
        zT = _empty((B, H, K), torch.float32, dev)
        save = any(ctx.needs_input_grad[:4])
        zs = _empty((B, H, NT, K), torch.float32, dev) if save else zT
        z0c = z0.float().contiguous() if z0 is not None else zT
        vc = valid if valid is not None else zT
        _gate_norm_fwd_kernel[(NF, B * H)](
            q, k, x, vc, z0c, g, den_parts, zT, zs, T, 1.0 / normalizer,
            B=B, H=H, G=G, K=K, BT=block_t, BF=block_f, HAS_VALID=valid is not None,
            HAS_Z0=z0 is not None, SAVE=save, num_warps=warps[0])
        den = den_parts.sum(0)                                                # [B, H, T]
        ctx.save_for_backward(x, q, k, zs, valid)
        ctx.meta = (normalizer, block_t, block_f, warps, G, z0 is not None)
        return g, den, zT

    @staticmethod
    def backward(ctx, dg, dden, dzT):
        x, q, k, zs, valid = ctx.saved_tensors
        normalizer, block_t, block_f, warps, G, has_z0 = ctx.meta
        B, T, H, K = q.shape
        dev = q.device
        dq = _empty(q.shape, q.dtype, dev)
        dk = _empty(k.shape, k.dtype, dev)
        dx = _empty((B, T, H, K), torch.float32, dev)
        dz0 = _empty((B, H, K), torch.float32, dev)
        dden = dden.float().contiguous() if dden is not None else torch.zeros(B, H, T, device=dev)
        dgc = dg.float().contiguous() if dg is not None else dx
        dzc = dzT.float().contiguous() if dzT is not None else dz0
        vc = valid if valid is not None else dz0
        _gate_norm_bwd_kernel[(triton.cdiv(K, block_f), B * H)](
            q, k, x, vc, zs, dden, dgc, dzc, dq, dk, dx, dz0, T, 1.0 / normalizer,
            H=H, G=G, K=K, BT=block_t, BF=block_f, HAS_VALID=valid is not None,
            HAS_DG=dg is not None, HAS_DZT=dzT is not None, num_warps=warps[1])
        dx = dx.view(B, T, H // G, G, K).sum(3) if G > 1 else dx
        return dx.to(x.dtype), dq, dk, (dz0 if has_z0 else None), None, None, None, None, None


def gate_normaliser(x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, z0: torch.Tensor | None,
                    normalizer: float, valid: torch.Tensor | None = None, block_t: int = BLOCK_T,
                    block_f: int = BLOCK_F, warps: tuple[int, int] = (4, 8)
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log gate and normaliser of LAWCAT's gated linear attention, differentiable.

    Args:
        x (torch.Tensor): gate logits ``[B, T, H_kv, K]`` (any float dtype); H must be a
            multiple of H_kv (each kv head's gate serves H / H_kv query heads).
        q, k (torch.Tensor): feature-mapped queries/keys ``[B, T, H, K]``.
        z0 (torch.Tensor, Optional): normaliser state ``[B, H, K]`` (the ones column of the cached
            GLA state). Default: zeros.
        normalizer (float): the gate's ``logsigmoid(x) / normalizer``.
        valid (torch.Tensor, Optional): ``[B, T]`` int8, 0 at padding (gate 0 there).
        block_t (int): tokens per scan block (a power of 2 >= 16). Default: 128.
        block_f (int): features per program (a power of 2). Default: 16.
        warps (tuple): num_warps of the forward and backward kernels. Default: (4, 8).

    Returns:
        ``(g [B, T, H, K] float32, den [B, H, T] float32, z_T [B, H, K] float32)``.
    """
    B, T, H, K = q.shape
    _check("k", k, q.shape)
    if x.dim() != 4 or x.shape[:2] != (B, T) or x.shape[3] != K or H % x.shape[2]:
        raise ValueError(f"gate logits have shape {tuple(x.shape)}; expected [B, T, H_kv, K] = "
                         f"[{B}, {T}, H_kv, {K}] with H_kv dividing {H}")
    if z0 is not None:
        _check("z0", z0, (B, H, K))
    if valid is not None:
        _check("valid", valid, (B, T))
        valid = valid.to(torch.int8).contiguous()
    return _GateNormaliser.apply(x, q, k, z0, float(normalizer), valid, block_t, block_f, tuple(warps))


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
