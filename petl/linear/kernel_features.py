"""Triton kernels for LAWCAT's causal short convolution + Hedgehog feature map, fused.

For one head h and token t (adapters.md §3.2 steps 2-3; K the conv size, f the feature width):

    u_t   = round_to_x_dtype( sum_{j<K} w[c, K-1-j] x_{t-j}[c] )      # x_{t<0} from the conv state
    z_t   = u_t @ W_h                                                   # [f], float32 accumulate
    phi_t = [softmax(z_t), softmax(-z_t)].clamp_min(1e-12)              # [2f], stored in x's dtype

which is exactly what :class:`~petl.linear.modules.CausalDepthwiseConv` followed by
:class:`~petl.linear.modules.HedgehogFeatureMap` compute in PyTorch (conv output in x's dtype,
then a float32 einsum and softmax), in one pass: x is read once (the K shifted reads hit the
cache) and phi written once, instead of about fifteen float32 passes.

Backward (the same maths as autograd through the two modules), one kernel:

    dz  = s1 (d1 - <d1, s1>) - s2 (d2 - <d2, s2>)      # d1/d2 the halves of dphi, 0 where clamped
    du  = round_to_x_dtype(dz @ W_h^T),   dW_h += u^T dz
    dx_t = sum_j w[K-1-j] du_{t+j},   dw[K-1-j] += sum_s x_s du_{s+j}  (+ the conv state's s < 0)

Each program owns one head and a contiguous run of token blocks and walks it backwards. dx_t
needs du of the next K-1 tokens, which live in other threads' registers (or, at the run's end,
in the next program's run), so every block's du goes to a two-slot scratch ring owned by the
program (it stays in L2: no [B, T, H*d] round trip through memory) and is read back shifted
after a CTA barrier; the first rows after the run are recomputed (a 16-row halo tile). The same
shifted du rows give dw against one unshifted x tile. dW and dw are summed in registers over the
run and written once per program. Channels are processed in two halves (the dots over d split
into two accumulating dots), which keeps the conv's shifted tiles within the registers. In bf16
the float32 dz is split into two bf16 halves (hi + lo) for the tensor-core dots, which keeps 16
mantissa bits (W and u are exact in bf16) at a third of the cost of tf32x3; ``BWD_DOT = "bf16"``
rounds dz to bf16 instead (one dot; gradient errors about 1.2x PyTorch's float32 path instead
of 1.0x in the CPU tests).

The kernels address x as a 64-bit scalar base plus 32-bit tile offsets with a compile-time row
stride: per-element 64-bit pointers cost registers, and with them the sm_90 build spilled.

The conv state gets no gradient (it comes from the cache, detached). Reference:
the two PyTorch modules in float64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Launch table for the GPU (tests pass smaller blocks), measured on the H200 at N = 32k, d = 128,
# bf16 (`python -m benchmarks.lawcat_layer --components 32768`, benchmarks/results/lawcat_layer.json,
# 2026-11-29): forward 0.34 ms per call with 64-token blocks and 4 warps (0.47 ms with 128-token
# blocks and 8 warps); forward+backward 2.56 ms with a 4-warp backward, against 3.97 ms with 8
# warps, 3.49 with 32-token blocks, 3.99 with two pipeline stages, 4.25 / 3.95 with 4 / 32 blocks
# per program (the two-kernel backward it replaced: about 4.4 ms for the backward alone).
FWD_BLOCK_T = 64
FWD_WARPS = 4
BWD_BLOCK_T = 64           # tokens per step of the backward walk
BWD_MAX_BLOCKS = 16        # most steps per program: bounds the per-program dW partials
BWD_PROGRAMS_PER_SM = 4    # fewer steps per program when that many programs would not fill the GPU
BWD_WARPS = 4
BWD_STAGES = 1             # no software pipelining of the walk's loads (registers are the limit)
BWD_DOT = "split"          # bf16 backward dots: "split" (dz as bf16 hi + lo, float32-like) or "bf16"
HALO = 16                  # rows of du recomputed past a run's end (>= K - 1, one dot tile)
CLAMP = 1e-12

_BF16, _SPLIT_BF16, _TF32X3, _IEEE = 3, 2, 1, 0   # dot modes of the backward (see the module doc)


def _empty(shape, dtype, device) -> torch.Tensor:
    """Output allocation (a seam for tests, which poison outputs with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _x_shift(x_ptr, state_ptr, b, row0, local, j, ch, chm, T, sxt, ssb,
             KS: tl.constexpr, HAS_STATE: tl.constexpr):
    """x_{t-j} for rows t = row0 + local and channels ch, float32; x_{t<0} from state[b, c, K-1+t].

    Addresses are a 64-bit scalar base plus 32-bit tile offsets: per-element 64-bit pointers
    would cost twice the registers (the sm_90 build spilled with them)."""
    rows = row0 + local
    src = rows - j
    m = ((rows < T) & (src >= 0))[:, None] & chm[None, :]
    base = x_ptr + (b.to(tl.int64) * T + row0) * sxt      # x is contiguous [B, T, C], sxt = C
    xv = tl.load(base + ((local - j) * sxt)[:, None] + ch[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_STATE:
        if row0 < KS - 1:                         # only the first tokens reach into the state
            sidx = KS - 1 + src
            sm = ((rows < T) & (src < 0) & (sidx >= 0))[:, None] & chm[None, :]
            xv += tl.load(state_ptr + b.to(tl.int64) * ssb + ch[None, :] * (KS - 1) + sidx[:, None],
                          mask=sm, other=0.0).to(tl.float32)
    return xv


@triton.jit
def _conv_tile(x_ptr, state_ptr, cw_ptr, b, row0, local, ch, chm, T, sxt, ssb,
               KS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, HAS_STATE: tl.constexpr):
    """float32 causal conv of rows row0 + local x channels ``ch``."""
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(KS):
        w = tl.load(cw_ptr + ch * KS + (KS - 1 - j), mask=chm, other=0.0).to(tl.float32)
        acc += _x_shift(x_ptr, state_ptr, b, row0, local, j, ch, chm, T, sxt, ssb, KS, HAS_STATE) * w[None, :]
    return acc


@triton.jit
def _logits(u, W, DOT_F32: tl.constexpr):
    """Conv output (already rounded to x's dtype) times W_h: ``[BT, BD] @ [BD, BF]`` -> float32."""
    if DOT_F32:
        z = tl.dot(u.to(tl.float32), W.to(tl.float32), input_precision="ieee")
    else:
        z = tl.dot(u, W.to(u.dtype))
    return z


@triton.jit
def _dot_f32(a, b, acc, A_IS_F32: tl.constexpr, MODE: tl.constexpr):
    """``acc + a @ b`` where one operand is float32 and the other exact in x's dtype; MODE says how
    the float32 one enters the tensor cores: rounded to bf16 (3), split into bf16 hi + lo (2),
    tf32x3 (1) or IEEE float32 (0)."""
    if MODE == 3:
        acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif MODE == 2:
        if A_IS_F32:
            hi = a.to(tl.bfloat16)
            lo = (a - hi.to(tl.float32)).to(tl.bfloat16)
            acc = tl.dot(hi, b.to(tl.bfloat16), acc)
            acc = tl.dot(lo, b.to(tl.bfloat16), acc)
        else:
            hi = b.to(tl.bfloat16)
            lo = (b - hi.to(tl.float32)).to(tl.bfloat16)
            acc = tl.dot(a.to(tl.bfloat16), hi, acc)
            acc = tl.dot(a.to(tl.bfloat16), lo, acc)
    elif MODE == 1:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")
    else:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return acc


@triton.jit
def _two_softmax(z, fm):
    z1 = tl.where(fm[None, :], z, float("-inf"))
    e1 = tl.exp(z1 - tl.max(z1, axis=1)[:, None])
    s1 = e1 / tl.sum(e1, axis=1)[:, None]
    z2 = tl.where(fm[None, :], -z, float("-inf"))
    e2 = tl.exp(z2 - tl.max(z2, axis=1)[:, None])
    s2 = e2 / tl.sum(e2, axis=1)[:, None]
    return s1, s2


@triton.jit
def _conv_feature_fwd_kernel(x_ptr, state_ptr, cw_ptr, fw_ptr, valid_ptr, out_ptr,
                             T, ssb,
                             H: tl.constexpr, D: tl.constexpr, F: tl.constexpr, KS: tl.constexpr,
                             BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
                             HAS_STATE: tl.constexpr, HAS_VALID: tl.constexpr, DOT_F32: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    row0 = pid_t * BT
    local = tl.arange(0, BT)
    rows = row0 + local
    rm = rows < T
    dcols = tl.arange(0, BD)
    dm = dcols < D
    fcols = tl.arange(0, BF)
    fm = fcols < F
    C: tl.constexpr = H * D                               # x is contiguous [B, T, C]
    acc = _conv_tile(x_ptr, state_ptr, cw_ptr, b, row0, local, h * D + dcols, dm, T, C, ssb,
                     KS, BT, BD, HAS_STATE)
    W = tl.load(fw_ptr + h * D * F + dcols[:, None] * F + fcols[None, :], mask=dm[:, None] & fm[None, :],
                other=0.0)
    u = acc.to(x_ptr.dtype.element_ty)
    z = _logits(u, W, DOT_F32)
    s1, s2 = _two_softmax(z, fm)
    s1 = tl.maximum(s1, 1e-12)
    s2 = tl.maximum(s2, 1e-12)
    if HAS_VALID:
        vr = tl.load(valid_ptr + b * T + rows, mask=rm, other=0) != 0
        s1 = tl.where(vr[:, None], s1, 0.0)
        s2 = tl.where(vr[:, None], s2, 0.0)
    out = out_ptr + ((b.to(tl.int64) * T + row0) * H + h) * (2 * F)
    offs = local[:, None] * (H * 2 * F) + fcols[None, :]
    m2 = rm[:, None] & fm[None, :]
    tl.store(out + offs, s1.to(out_ptr.dtype.element_ty), mask=m2)
    tl.store(out + offs + F, s2.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _du_tile(x_ptr, state_ptr, cw_ptr, valid_ptr, dphi_ptr, W0, W1, Wt0, Wt1, b, h, row0, T, sxt, ssb,
             H: tl.constexpr, D: tl.constexpr, F: tl.constexpr, KS: tl.constexpr, BT: tl.constexpr,
             DC: tl.constexpr, BF: tl.constexpr, HAS_STATE: tl.constexpr, HAS_VALID: tl.constexpr,
             DOT_F32: tl.constexpr, MODE: tl.constexpr):
    """Recompute u and the softmaxes of rows ``row0 + [0, BT)``; return the channel halves
    ``u0, u1`` (x's dtype), dz (float32) and ``du0, du1`` (float32). W0/W1 are the halves of W_h
    (rows), Wt0/Wt1 of W_h^T (columns): half-width tiles keep the conv's shifted loads and du
    within the registers of one warpgroup."""
    d0 = tl.arange(0, DC)
    fcols = tl.arange(0, BF)
    fm = fcols < F
    local = tl.arange(0, BT)
    rm = row0 + local < T
    u0 = _conv_tile(x_ptr, state_ptr, cw_ptr, b, row0, local, h * D + d0, d0 < D, T, sxt, ssb, KS, BT, DC,
                    HAS_STATE).to(x_ptr.dtype.element_ty)
    u1 = _conv_tile(x_ptr, state_ptr, cw_ptr, b, row0, local, h * D + DC + d0, DC + d0 < D, T, sxt, ssb, KS,
                    BT, DC, HAS_STATE).to(x_ptr.dtype.element_ty)
    s1, s2 = _two_softmax(_logits(u0, W0, DOT_F32) + _logits(u1, W1, DOT_F32), fm)
    dp = dphi_ptr + ((b.to(tl.int64) * T + row0) * H + h) * (2 * F)
    offs = local[:, None] * (H * 2 * F) + fcols[None, :]
    m2 = rm[:, None] & fm[None, :]
    d1 = tl.load(dp + offs, mask=m2, other=0.0).to(tl.float32)
    d2 = tl.load(dp + offs + F, mask=m2, other=0.0).to(tl.float32)
    d1 = tl.where(s1 >= 1e-12, d1, 0.0)          # clamp_min passes no gradient below the floor
    d2 = tl.where(s2 >= 1e-12, d2, 0.0)
    if HAS_VALID:
        vr = tl.load(valid_ptr + b * T + row0 + local, mask=rm, other=0) != 0
        d1 = tl.where(vr[:, None], d1, 0.0)
        d2 = tl.where(vr[:, None], d2, 0.0)
    dz = s1 * (d1 - tl.sum(d1 * s1, axis=1)[:, None]) - s2 * (d2 - tl.sum(d2 * s2, axis=1)[:, None])
    du0 = _dot_f32(dz, Wt0, tl.zeros([BT, DC], dtype=tl.float32), True, MODE)
    du1 = _dot_f32(dz, Wt1, tl.zeros([BT, DC], dtype=tl.float32), True, MODE)
    return u0, u1, dz, du0, du1


@triton.jit
def _conv_bwd_half(ring, cur, nxt, x_ptr, cw_ptr, b, row0, local, ch, chm, dcols, T, sxt, ssb, kidx,
                   KS: tl.constexpr, BT: tl.constexpr, DC: tl.constexpr, RW: tl.constexpr):
    """For channels ``ch`` (ring columns ``dcols``) of one block: ``dx_t = sum_j w[K-1-j] du_{t+j}``
    and ``dw[K-1-j] += sum_s x_s du_{s+j}`` over the block's s (``[BK, DC]`` by tap). du of rows
    past the block comes from the other ring slot (the next block, or the halo)."""
    xs = _x_shift(x_ptr, x_ptr, b, row0, local, 0, ch, chm, T, sxt, ssb, KS, False)
    dx = tl.zeros([BT, DC], dtype=tl.float32)
    dcw = tl.zeros([kidx.shape[0], DC], dtype=tl.float32)
    for j in tl.static_range(KS):
        w = tl.load(cw_ptr + ch * KS + (KS - 1 - j), mask=chm, other=0.0).to(tl.float32)
        src = local + j
        off = tl.where(src < BT, cur + src * RW, nxt + (src - BT) * RW)
        dun = tl.load(ring + off[:, None] + dcols[None, :], mask=(row0 + src < T)[:, None] & chm[None, :],
                      other=0.0, cache_modifier=".cg").to(tl.float32)
        dx += dun * w[None, :]
        dcw += tl.where((kidx == KS - 1 - j)[:, None], tl.sum(xs * dun, axis=0)[None, :], 0.0)
    return dx, dcw


@triton.jit
def _state_dcw(state_ptr, ring_cur, b, ch, chm, dcols, T, ssb, kidx, KS: tl.constexpr, HT: tl.constexpr,
               DC: tl.constexpr, RW: tl.constexpr):
    """``sum_s state_s du_{s+j}`` over s in [-(K-1), 0): the conv-weight gradient of the cached
    inputs, with du of the first block read from its ring slot. Returns ``[BK, DC]`` by tap."""
    s = tl.arange(0, HT) - HT
    sidx = KS - 1 + s
    sv = tl.load(state_ptr + b.to(tl.int64) * ssb + ch[None, :] * (KS - 1) + sidx[:, None],
                 mask=(sidx >= 0)[:, None] & chm[None, :], other=0.0).to(tl.float32)
    acc = tl.zeros([kidx.shape[0], DC], dtype=tl.float32)
    for j in tl.static_range(KS):
        t = s + j
        dun = tl.load(ring_cur + t[:, None] * RW + dcols[None, :], mask=((t >= 0) & (t < T))[:, None] & chm[None, :],
                      other=0.0, cache_modifier=".cg").to(tl.float32)
        acc += tl.where((kidx == KS - 1 - j)[:, None], tl.sum(sv * dun, axis=0)[None, :], 0.0)
    return acc


@triton.jit
def _conv_feature_bwd_kernel(x_ptr, state_ptr, cw_ptr, fw_ptr, valid_ptr, dphi_ptr, ring_ptr,
                             dx_ptr, dfw_ptr, dcw_ptr, T, ssb, BPP,
                             B: tl.constexpr, H: tl.constexpr, D: tl.constexpr, F: tl.constexpr,
                             KS: tl.constexpr, BT: tl.constexpr, DC: tl.constexpr, BF: tl.constexpr,
                             BK: tl.constexpr, HALO_T: tl.constexpr, HAS_STATE: tl.constexpr,
                             HAS_VALID: tl.constexpr, DOT_F32: tl.constexpr, MODE: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    C: tl.constexpr = H * D                               # x is contiguous [B, T, C]
    RW: tl.constexpr = 2 * DC                             # ring row width
    d0 = tl.arange(0, DC)
    d1 = DC + d0
    fcols = tl.arange(0, BF)
    fm = fcols < F
    wbase = fw_ptr + h * D * F
    W0 = tl.load(wbase + d0[:, None] * F + fcols[None, :], mask=(d0 < D)[:, None] & fm[None, :], other=0.0)
    W1 = tl.load(wbase + d1[:, None] * F + fcols[None, :], mask=(d1 < D)[:, None] & fm[None, :], other=0.0)
    Wt0 = tl.load(wbase + fcols[:, None] + d0[None, :] * F, mask=fm[:, None] & (d0 < D)[None, :], other=0.0)
    Wt1 = tl.load(wbase + fcols[:, None] + d1[None, :] * F, mask=fm[:, None] & (d1 < D)[None, :], other=0.0)
    xdt = x_ptr.dtype.element_ty
    local = tl.arange(0, BT)
    blk_lo = pid_s * BPP
    blk_hi = tl.minimum(blk_lo + BPP, tl.cdiv(T, BT))
    ring = ring_ptr + (pid_s * B * H + pid_bh).to(tl.int64) * (2 * BT * RW)      # [2, BT, RW]
    # du of the first rows after this run (owned by the next program) into the slot of block blk_hi
    if blk_hi * BT < T:
        hloc = tl.arange(0, HALO_T)
        _, _, _, hdu0, hdu1 = _du_tile(x_ptr, state_ptr, cw_ptr, valid_ptr, dphi_ptr, W0, W1, Wt0, Wt1, b, h,
                                       blk_hi * BT, T, C, ssb, H, D, F, KS, HALO_T, DC, BF, HAS_STATE,
                                       HAS_VALID, DOT_F32, MODE)
        hm = (blk_hi * BT + hloc < T)[:, None]
        hptr = ring + (blk_hi % 2) * BT * RW + hloc[:, None] * RW
        tl.store(hptr + d0[None, :], hdu0.to(xdt), mask=hm)
        tl.store(hptr + d1[None, :], hdu1.to(xdt), mask=hm)
    dW0 = tl.zeros([DC, BF], dtype=tl.float32)
    dW1 = tl.zeros([DC, BF], dtype=tl.float32)
    kidx = tl.arange(0, BK)
    dcw0 = tl.zeros([BK, DC], dtype=tl.float32)
    dcw1 = tl.zeros([BK, DC], dtype=tl.float32)
    for i in range(blk_hi - blk_lo):
        n = blk_hi - 1 - i
        row0 = n * BT
        rm = (row0 + local < T)[:, None]
        u0, u1, dz, du0, du1 = _du_tile(x_ptr, state_ptr, cw_ptr, valid_ptr, dphi_ptr, W0, W1, Wt0, Wt1, b, h,
                                        row0, T, C, ssb, H, D, F, KS, BT, DC, BF, HAS_STATE, HAS_VALID,
                                        DOT_F32, MODE)
        dW0 = _dot_f32(tl.trans(u0), dz, dW0, False, MODE)
        dW1 = _dot_f32(tl.trans(u1), dz, dW1, False, MODE)
        cur = (n % 2) * BT * RW
        nxt = ((n + 1) % 2) * BT * RW
        tl.debug_barrier()                                # last step's reads of this slot are done
        rptr = ring + cur + local[:, None] * RW
        tl.store(rptr + d0[None, :], du0.to(xdt), mask=rm)  # du in x's dtype, as the reference's conv sees it
        tl.store(rptr + d1[None, :], du1.to(xdt), mask=rm)
        tl.debug_barrier()                                # this step's du is visible to all threads
        dxp = dx_ptr + (b.to(tl.int64) * T + row0) * C + h * D + local[:, None] * C
        dx, dcw = _conv_bwd_half(ring, cur, nxt, x_ptr, cw_ptr, b, row0, local, h * D + d0, d0 < D, d0, T, C,
                                 ssb, kidx, KS, BT, DC, RW)
        tl.store(dxp + d0[None, :], dx.to(dx_ptr.dtype.element_ty), mask=rm & (d0 < D)[None, :])
        dcw0 += dcw
        dx, dcw = _conv_bwd_half(ring, cur, nxt, x_ptr, cw_ptr, b, row0, local, h * D + d1, d1 < D, d1, T, C,
                                 ssb, kidx, KS, BT, DC, RW)
        tl.store(dxp + d1[None, :], dx.to(dx_ptr.dtype.element_ty), mask=rm & (d1 < D)[None, :])
        dcw1 += dcw
        if HAS_STATE:
            if row0 == 0:                                 # the pairs whose x_s (s < 0) is the conv state
                dcw0 += _state_dcw(state_ptr, ring + cur, b, h * D + d0, d0 < D, d0, T, ssb, kidx, KS, HALO_T,
                                   DC, RW)
                dcw1 += _state_dcw(state_ptr, ring + cur, b, h * D + d1, d1 < D, d1, T, ssb, kidx, KS, HALO_T,
                                   DC, RW)
    part = (pid_s * B + b).to(tl.int64)
    wp = dfw_ptr + (part * H + h) * D * F + fcols[None, :]
    tl.store(wp + d0[:, None] * F, dW0, mask=(d0 < D)[:, None] & fm[None, :])
    tl.store(wp + d1[:, None] * F, dW1, mask=(d1 < D)[:, None] & fm[None, :])
    cp = dcw_ptr + part * C * KS + h * D * KS + kidx[:, None]
    tl.store(cp + d0[None, :] * KS, dcw0, mask=(kidx < KS)[:, None] & (d0 < D)[None, :])
    tl.store(cp + d1[None, :] * KS, dcw1, mask=(kidx < KS)[:, None] & (d1 < D)[None, :])


def _sizes(D: int, F: int) -> tuple[int, int]:
    return max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(F))


def _blocks_per_program(n_blocks: int, n_heads: int, device: torch.device) -> int:
    """Token blocks per backward program: up to ``BWD_MAX_BLOCKS``, fewer when that would leave
    fewer than ``BWD_PROGRAMS_PER_SM`` programs per multiprocessor."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = -(-n_blocks * n_heads // (BWD_PROGRAMS_PER_SM * sms))
    return max(1, min(BWD_MAX_BLOCKS, want))


def _dot_mode(x_dtype: torch.dtype, dot_f32: bool, bf16_dot: str) -> int:
    if dot_f32:
        return _IEEE
    if x_dtype != torch.bfloat16:
        return _TF32X3                    # fp16 has too little range to carry dz's split halves
    if bf16_dot not in ("split", "bf16"):
        raise ValueError(f"bwd_dot={bf16_dot!r} is not a backward dot mode; use 'split' or 'bf16'")
    return _SPLIT_BF16 if bf16_dot == "split" else _BF16


class _ConvFeatureMap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, conv_w, fm_w, state, valid, blocks):
        B, T, C = x.shape
        H, D, F = fm_w.shape
        KS = conv_w.shape[-1]
        x = x.contiguous()          # the kernels address x as [B, T, C] with a compile-time row stride
        cw = conv_w.reshape(C, KS).contiguous()
        fw = fm_w.contiguous()
        if state is not None:
            state = state.to(x.dtype).contiguous()
        BD, BF = _sizes(D, F)
        dot_f32 = not (x.dtype in (torch.bfloat16, torch.float16) and fw.dtype == x.dtype)
        bt = blocks.get("fwd", FWD_BLOCK_T)
        warps = blocks.get("fwd_warps", FWD_WARPS)
        out = _empty((B, T, H, 2 * F), x.dtype, x.device)
        dummy = out
        _conv_feature_fwd_kernel[(triton.cdiv(T, bt), B * H)](
            x, state if state is not None else dummy, cw, fw, valid if valid is not None else dummy, out,
            T, state.stride(0) if state is not None else 0,
            H=H, D=D, F=F, KS=KS, BT=bt, BD=BD, BF=BF, HAS_STATE=state is not None,
            HAS_VALID=valid is not None, DOT_F32=dot_f32, num_warps=warps)
        ctx.save_for_backward(x, cw, fw, state, valid)
        ctx.meta = (conv_w.shape, conv_w.dtype, fm_w.dtype, dot_f32, blocks)
        return out

    @staticmethod
    def backward(ctx, dphi):
        x, cw, fw, state, valid = ctx.saved_tensors
        cw_shape, cw_dtype, fw_dtype, dot_f32, blocks = ctx.meta
        B, T, C = x.shape
        H, D, F = fw.shape
        KS = cw.shape[-1]
        BD, BF = _sizes(D, F)
        dev = x.device
        dphi = dphi.contiguous()
        bt = blocks.get("bwd", BWD_BLOCK_T)
        n_blocks = triton.cdiv(T, bt)
        bpp = blocks.get("bwd_blocks") or _blocks_per_program(n_blocks, B * H, dev)
        nsplit = triton.cdiv(n_blocks, bpp)
        DC = max(16, BD // 2)                                         # channel half (see _du_tile)
        ring = _empty((nsplit * B * H, 2, bt, 2 * DC), x.dtype, dev)  # scratch, see the module doc
        dx = _empty((B, T, C), x.dtype, dev)
        dfw = _empty((nsplit, B, H, D, F), torch.float32, dev)
        dcw = _empty((nsplit, B, C, KS), torch.float32, dev)
        dummy = dx
        _conv_feature_bwd_kernel[(nsplit, B * H)](
            x, state if state is not None else dummy, cw, fw, valid if valid is not None else dummy, dphi,
            ring, dx, dfw, dcw, T, state.stride(0) if state is not None else 0, bpp,
            B=B, H=H, D=D, F=F, KS=KS, BT=bt, DC=DC, BF=BF, BK=triton.next_power_of_2(KS), HALO_T=HALO,
            HAS_STATE=state is not None, HAS_VALID=valid is not None, DOT_F32=dot_f32,
            MODE=_dot_mode(x.dtype, dot_f32, blocks.get("bwd_dot", BWD_DOT)),
            num_warps=blocks.get("bwd_warps", BWD_WARPS),
            num_stages=blocks.get("bwd_stages", BWD_STAGES))
        return (dx, dcw.sum((0, 1)).view(cw_shape).to(cw_dtype), dfw.sum((0, 1)).to(fw_dtype),
                None, None, None)


def conv_feature_map(x: torch.Tensor, conv_weight: torch.Tensor, fm_weight: torch.Tensor,
                     state: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                     blocks: dict[str, int] | None = None) -> torch.Tensor:
    """Causal depthwise conv then Hedgehog feature map, fused; differentiable in x and weights.

    Args:
        x (torch.Tensor): ``[B, T, H*d]`` inputs (q or k; copied when not contiguous).
        conv_weight (torch.Tensor): ``[H*d, 1, K]`` (``CausalDepthwiseConv.weight``), K <= 17.
        fm_weight (torch.Tensor): ``[H, d, f]`` (``HedgehogFeatureMap.weight``).
        state (torch.Tensor, Optional): ``[B, H*d, K-1]`` previous inputs (no gradient).
        valid (torch.Tensor, Optional): ``[B, T]`` int8; rows with 0 get a zero feature vector.
        blocks (dict, Optional): overrides of the launch table (tests, benchmark sweeps):
            ``fwd`` / ``fwd_warps`` (forward token block, warps), ``bwd`` (backward token block,
            a power of 2 >= 16), ``bwd_blocks`` (token blocks per backward program, instead of
            the table's choice),
            ``bwd_warps``, ``bwd_stages``, ``bwd_dot`` (bf16 only: ``"split"`` or ``"bf16"``).

    Returns:
        ``phi [B, T, H, 2f]`` in x's dtype.
    """
    if x.dim() != 3 or fm_weight.dim() != 3 or x.shape[-1] != fm_weight.shape[0] * fm_weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} must be [B, T, H*d] with H*d = {fm_weight.shape[0]} * "
                         f"{fm_weight.shape[1]} from the feature-map weight {tuple(fm_weight.shape)}")
    if conv_weight.shape[0] != x.shape[-1] or conv_weight.dim() != 3:
        raise ValueError(f"conv weight {tuple(conv_weight.shape)} must be [H*d, 1, K] with H*d = {x.shape[-1]}")
    if conv_weight.shape[-1] - 1 > HALO:
        raise ValueError(f"conv size {conv_weight.shape[-1]} is larger than the kernels support ({HALO + 1}); "
                         f"use the PyTorch path (kernels='off')")
    bt = (blocks or {}).get("bwd", BWD_BLOCK_T)
    if bt < max(16, HALO) or bt & (bt - 1):
        raise ValueError(f"backward token block {bt} must be a power of 2 >= {max(16, HALO)}")
    if valid is not None:
        valid = valid.to(torch.int8).contiguous()
    return _ConvFeatureMap.apply(x, conv_weight, fm_weight, state, valid, dict(blocks or {}))
