"""Triton kernels for LAWCAT's causal short convolution + Hedgehog feature map, fused.

For one head h and token t (adapters.md §3.2 steps 2-3; K the conv size, f the feature width):

    u_t   = round_to_x_dtype( sum_{j<K} w[c, K-1-j] x_{t-j}[c] )      # x_{t<0} from the conv state
    z_t   = u_t @ W_h                                                   # [f], float32 accumulate
    phi_t = [softmax(z_t), softmax(-z_t)].clamp_min(1e-12)              # [2f], stored in x's dtype

which is exactly what :class:`~petl.linear.modules.CausalDepthwiseConv` followed by
:class:`~petl.linear.modules.HedgehogFeatureMap` compute in PyTorch (conv output in x's dtype,
then a float32 einsum and softmax), in one pass: x is read once (the K shifted reads hit the
cache) and phi written once, instead of about fifteen float32 passes.

Backward (the same maths as autograd through the two modules):

    dz  = s1 (d1 - <d1, s1>) - s2 (d2 - <d2, s2>)      # d1/d2 the halves of dphi, 0 where clamped
    du  = dz @ W_h^T,   dW_h += u^T dz                 # kernel 1, persistent over token blocks
    dx_t = sum_j w[K-1-j] du_{t+j},   dw[K-1-j] += sum_t du_t x_{t-j}      # kernel 2

The conv state gets no gradient (it comes from the cache, detached). Reference:
the two PyTorch modules in float64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_T_FWD = 64
FWD_WARPS = 4      # H200, N=32k, d=128: 0.35 ms with 4 warps, 0.76 ms with 8 (benchmarks/results/lawcat_layer.json)
BLOCK_T_BWD = 32
BLOCK_T_CONV = 64
BLOCK_C_CONV = 128
CLAMP = 1e-12


def _empty(shape, dtype, device) -> torch.Tensor:
    """Output allocation (a seam for tests, which poison outputs with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _conv_tile(x_ptr, state_ptr, cw_ptr, b, rows, ch, chm, T, sxb, sxt, ssb,
               KS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, HAS_STATE: tl.constexpr):
    """float32 causal conv of rows x channels ``ch``; x_{t<0} from state[b, c, K-1+t]."""
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    rm = rows < T
    for j in tl.static_range(KS):
        w = tl.load(cw_ptr + ch * KS + (KS - 1 - j), mask=chm, other=0.0).to(tl.float32)
        src = rows - j
        m = (rm & (src >= 0))[:, None] & chm[None, :]
        xv = tl.load(x_ptr + b.to(tl.int64) * sxb + src[:, None].to(tl.int64) * sxt + ch[None, :],
                     mask=m, other=0.0).to(tl.float32)
        if HAS_STATE:
            sidx = KS - 1 + src
            sm = (rm & (src < 0) & (sidx >= 0))[:, None] & chm[None, :]
            xv += tl.load(state_ptr + b.to(tl.int64) * ssb + ch[None, :] * (KS - 1) + sidx[:, None],
                          mask=sm, other=0.0).to(tl.float32)
        acc += xv * w[None, :]
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
                             T, sxb, sxt, ssb,
                             H: tl.constexpr, D: tl.constexpr, F: tl.constexpr, KS: tl.constexpr,
                             BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
                             HAS_STATE: tl.constexpr, HAS_VALID: tl.constexpr, DOT_F32: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_t * BT + tl.arange(0, BT)
    rm = rows < T
    dcols = tl.arange(0, BD)
    dm = dcols < D
    fcols = tl.arange(0, BF)
    fm = fcols < F
    acc = _conv_tile(x_ptr, state_ptr, cw_ptr, b, rows, h * D + dcols, dm, T, sxb, sxt, ssb,
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
    offs = ((b.to(tl.int64) * T + rows[:, None]) * H + h) * (2 * F) + fcols[None, :]
    m2 = rm[:, None] & fm[None, :]
    tl.store(out_ptr + offs, s1.to(out_ptr.dtype.element_ty), mask=m2)
    tl.store(out_ptr + offs + F, s2.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _feature_bwd_kernel(x_ptr, state_ptr, cw_ptr, fw_ptr, valid_ptr, dphi_ptr, du_ptr, dfw_ptr,
                        T, sxb, sxt, ssb,
                        B: tl.constexpr, H: tl.constexpr, D: tl.constexpr, F: tl.constexpr,
                        KS: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
                        HAS_STATE: tl.constexpr, HAS_VALID: tl.constexpr, DOT_F32: tl.constexpr,
                        PREC: tl.constexpr):
    pid_s = tl.program_id(0)
    nsplit = tl.num_programs(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    dcols = tl.arange(0, BD)
    dm = dcols < D
    fcols = tl.arange(0, BF)
    fm = fcols < F
    ch = h * D + dcols
    W = tl.load(fw_ptr + h * D * F + dcols[:, None] * F + fcols[None, :], mask=dm[:, None] & fm[None, :],
                other=0.0)
    Wf = W.to(tl.float32)
    dW = tl.zeros([BD, BF], dtype=tl.float32)
    for tb in range(pid_s, tl.cdiv(T, BT), nsplit):
        rows = tb * BT + tl.arange(0, BT)
        rm = rows < T
        acc = _conv_tile(x_ptr, state_ptr, cw_ptr, b, rows, ch, dm, T, sxb, sxt, ssb, KS, BT, BD, HAS_STATE)
        u = acc.to(x_ptr.dtype.element_ty)
        z = _logits(u, W, DOT_F32)
        s1, s2 = _two_softmax(z, fm)
        offs = ((b.to(tl.int64) * T + rows[:, None]) * H + h) * (2 * F) + fcols[None, :]
        m2 = rm[:, None] & fm[None, :]
        d1 = tl.load(dphi_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        d2 = tl.load(dphi_ptr + offs + F, mask=m2, other=0.0).to(tl.float32)
        d1 = tl.where(s1 >= 1e-12, d1, 0.0)
        d2 = tl.where(s2 >= 1e-12, d2, 0.0)
        if HAS_VALID:
            vr = tl.load(valid_ptr + b * T + rows, mask=rm, other=0) != 0
            d1 = tl.where(vr[:, None], d1, 0.0)
            d2 = tl.where(vr[:, None], d2, 0.0)
        dz = s1 * (d1 - tl.sum(d1 * s1, axis=1)[:, None]) - s2 * (d2 - tl.sum(d2 * s2, axis=1)[:, None])
        du = tl.dot(dz, tl.trans(Wf), input_precision=PREC)
        tl.store(du_ptr + (b.to(tl.int64) * T + rows[:, None]) * (H * D) + ch[None, :],
                 du.to(du_ptr.dtype.element_ty), mask=rm[:, None] & dm[None, :])
        dW = tl.dot(tl.trans(u.to(tl.float32)), dz, dW, input_precision=PREC)
    tl.store(dfw_ptr + ((pid_s * B + b) * H + h).to(tl.int64) * D * F + dcols[:, None] * F + fcols[None, :],
             dW, mask=dm[:, None] & fm[None, :])


@triton.jit
def _conv_bwd_kernel(x_ptr, state_ptr, cw_ptr, du_ptr, dx_ptr, dcw_ptr, T, sxb, sxt, ssb,
                     B: tl.constexpr, C: tl.constexpr, KS: tl.constexpr, BT: tl.constexpr,
                     BC: tl.constexpr, HAS_STATE: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    NCB: tl.constexpr = (C + BC - 1) // BC
    b = pid_c // NCB
    ch = (pid_c % NCB) * BC + tl.arange(0, BC)
    chm = ch < C
    rows = pid_t * BT + tl.arange(0, BT)
    rm = rows < T
    du_base = du_ptr + b.to(tl.int64) * T * C
    dut = tl.load(du_base + rows[:, None].to(tl.int64) * C + ch[None, :], mask=rm[:, None] & chm[None, :],
                  other=0.0).to(tl.float32)
    dx = tl.zeros([BT, BC], dtype=tl.float32)
    dcw_base = dcw_ptr + (pid_t * B + b).to(tl.int64) * C * KS
    for j in tl.static_range(KS):
        w = tl.load(cw_ptr + ch * KS + (KS - 1 - j), mask=chm, other=0.0).to(tl.float32)
        fut = rows + j
        dun = tl.load(du_base + fut[:, None].to(tl.int64) * C + ch[None, :],
                      mask=(fut < T)[:, None] & chm[None, :], other=0.0).to(tl.float32)
        dx += dun * w[None, :]
        src = rows - j
        m = (rm & (src >= 0))[:, None] & chm[None, :]
        xv = tl.load(x_ptr + b.to(tl.int64) * sxb + src[:, None].to(tl.int64) * sxt + ch[None, :],
                     mask=m, other=0.0).to(tl.float32)
        if HAS_STATE:
            sidx = KS - 1 + src
            sm = (rm & (src < 0) & (sidx >= 0))[:, None] & chm[None, :]
            xv += tl.load(state_ptr + b.to(tl.int64) * ssb + ch[None, :] * (KS - 1) + sidx[:, None],
                          mask=sm, other=0.0).to(tl.float32)
        tl.store(dcw_base + ch * KS + (KS - 1 - j), tl.sum(dut * xv, axis=0), mask=chm)
    tl.store(dx_ptr + b.to(tl.int64) * T * C + rows[:, None].to(tl.int64) * C + ch[None, :],
             dx.to(dx_ptr.dtype.element_ty), mask=rm[:, None] & chm[None, :])


def _sizes(D: int, F: int) -> tuple[int, int]:
    return max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(F))


def _num_splits(n_blocks: int, n_heads: int, device: torch.device) -> int:
    """Programs per head for the persistent backward: about four per multiprocessor."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(n_blocks, -(-4 * sms // max(1, n_heads))))


class _ConvFeatureMap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, conv_w, fm_w, state, valid, blocks):
        B, T, C = x.shape
        H, D, F = fm_w.shape
        KS = conv_w.shape[-1]
        if x.stride(-1) != 1:
            x = x.contiguous()
        cw = conv_w.reshape(C, KS).contiguous()
        fw = fm_w.contiguous()
        if state is not None:
            state = state.to(x.dtype).contiguous()
        BD, BF = _sizes(D, F)
        dot_f32 = not (x.dtype in (torch.bfloat16, torch.float16) and fw.dtype == x.dtype)
        bt = blocks.get("fwd", BLOCK_T_FWD)
        warps = blocks.get("fwd_warps", FWD_WARPS)
        out = _empty((B, T, H, 2 * F), x.dtype, x.device)
        dummy = out
        _conv_feature_fwd_kernel[(triton.cdiv(T, bt), B * H)](
            x, state if state is not None else dummy, cw, fw, valid if valid is not None else dummy, out,
            T, x.stride(0), x.stride(1), state.stride(0) if state is not None else 0,
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
        bt = blocks.get("bwd", BLOCK_T_BWD)
        nsplit = _num_splits(triton.cdiv(T, bt), B * H, dev)
        du = _empty((B, T, C), x.dtype, dev)
        dfw = _empty((nsplit, B, H, D, F), torch.float32, dev)
        dummy = du
        st = state if state is not None else dummy
        ssb = state.stride(0) if state is not None else 0
        _feature_bwd_kernel[(nsplit, B * H)](
            x, st, cw, fw, valid if valid is not None else dummy, dphi, du, dfw,
            T, x.stride(0), x.stride(1), ssb,
            B=B, H=H, D=D, F=F, KS=KS, BT=bt, BD=BD, BF=BF, HAS_STATE=state is not None,
            HAS_VALID=valid is not None, DOT_F32=dot_f32, PREC="ieee" if dot_f32 else "tf32x3",
            num_warps=8)
        btc, bc = blocks.get("conv", BLOCK_T_CONV), min(BLOCK_C_CONV, max(16, triton.next_power_of_2(C)))
        ntb = triton.cdiv(T, btc)
        dx = _empty((B, T, C), x.dtype, dev)
        dcw = _empty((ntb, B, C, KS), torch.float32, dev)
        _conv_bwd_kernel[(ntb, B * triton.cdiv(C, bc))](
            x, st, cw, du, dx, dcw, T, x.stride(0), x.stride(1), ssb,
            B=B, C=C, KS=KS, BT=btc, BC=bc, HAS_STATE=state is not None, num_warps=4)
        return (dx, dcw.sum((0, 1)).view(cw_shape).to(cw_dtype), dfw.sum((0, 1)).to(fw_dtype),
                None, None, None)


def conv_feature_map(x: torch.Tensor, conv_weight: torch.Tensor, fm_weight: torch.Tensor,
                     state: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                     blocks: dict[str, int] | None = None) -> torch.Tensor:
    """Causal depthwise conv then Hedgehog feature map, fused; differentiable in x and weights.

    Args:
        x (torch.Tensor): ``[B, T, H*d]`` inputs (q or k; the channel dim must be contiguous).
        conv_weight (torch.Tensor): ``[H*d, 1, K]`` (``CausalDepthwiseConv.weight``).
        fm_weight (torch.Tensor): ``[H, d, f]`` (``HedgehogFeatureMap.weight``).
        state (torch.Tensor, Optional): ``[B, H*d, K-1]`` previous inputs (no gradient).
        valid (torch.Tensor, Optional): ``[B, T]`` int8; rows with 0 get a zero feature vector.
        blocks (dict, Optional): token block sizes ``{"fwd", "bwd", "conv"}`` (tests use small ones)
            and ``"fwd_warps"`` (benchmark sweeps).

    Returns:
        ``phi [B, T, H, 2f]`` in x's dtype.
    """
    if x.dim() != 3 or fm_weight.dim() != 3 or x.shape[-1] != fm_weight.shape[0] * fm_weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} must be [B, T, H*d] with H*d = {fm_weight.shape[0]} * "
                         f"{fm_weight.shape[1]} from the feature-map weight {tuple(fm_weight.shape)}")
    if conv_weight.shape[0] != x.shape[-1] or conv_weight.dim() != 3:
        raise ValueError(f"conv weight {tuple(conv_weight.shape)} must be [H*d, 1, K] with H*d = {x.shape[-1]}")
    if valid is not None:
        valid = valid.to(torch.int8).contiguous()
    return _ConvFeatureMap.apply(x, conv_weight, fm_weight, state, valid, dict(blocks or {}))
