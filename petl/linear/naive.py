"""Recurrent references for LAWCAT's gated linear attention: plain loops over time.

These define what the chunked PyTorch form, the flash-linear-attention fast path and the
step-by-step decoding must compute. They are deliberately simple (one token per iteration,
float32 or wider) and run on CPU. Maths (docs/lawcat.md):

    S_t = Diag(exp g_t) S_{t-1} + k_t v_t^T          # state [F, V]
    o_t = q_t^T S_t

With a ones column appended to v the last output column is the normaliser
``q_t^T z_t``, ``z_t = Diag(exp g_t) z_{t-1} + k_t`` (adapters.md §3.2 step 6).
"""
from __future__ import annotations

import torch


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def naive_recurrent_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                        initial_state: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated linear attention, one token at a time.

    Args:
        q (torch.Tensor): queries (feature-mapped), ``[B, T, H, F]``.
        k (torch.Tensor): keys (feature-mapped), ``[B, T, H, F]``.
        v (torch.Tensor): values, ``[B, T, H, V]``.
        g (torch.Tensor): log forget gate per key channel, ``[B, T, H, F]`` (<= 0).
        initial_state (torch.Tensor, Optional): ``[B, H, F, V]``. Default: zeros.

    Returns:
        ``(o [B, T, H, V], final_state [B, H, F, V])``, both in the compute dtype: float32, or
        float64 when any input is float64 (the caller normalises before casting down).
    """
    dtype = _compute_dtype(q, k, v, g)
    B, T, H, F = q.shape
    state = (torch.zeros(B, H, F, v.shape[-1], dtype=dtype, device=q.device)
             if initial_state is None else initial_state.to(dtype))
    qf, kf, vf, gf = (t.to(dtype) for t in (q, k, v, g))
    outs = []
    for t in range(T):
        state = state * gf[:, t].exp()[..., None] + kf[:, t, :, :, None] * vf[:, t, :, None, :]
        outs.append(torch.einsum("bhf,bhfv->bhv", qf[:, t], state))
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, H, v.shape[-1], dtype=dtype)
    return o, state


def naive_recurrent_lawcat(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor,
                           g: torch.Tensor, *, window: int = 0,
                           q_rope: torch.Tensor | None = None, k_rope: torch.Tensor | None = None,
                           window_factor: torch.Tensor | None = None, scale: float | None = None,
                           eps: float = 1e-10) -> torch.Tensor:
    """Normalised LAWCAT attention from scratch, with the optional softmax window.

    Without a window (``window=0``) token t reads every s <= t with weight
    ``sum_f phi_q[t,f] phi_k[s,f] prod_{r=s+1..t} exp(g[r,f])``; the output is the weighted mean
    of v. With ``window=W`` the last W tokens s in (t-W, t] instead get
    ``f_h * exp(q_rope[t].k_rope[s] * scale - max)`` (the max over that window) and only older
    tokens use the gated linear weight; numerator and denominator are summed jointly.

    Args:
        phi_q, phi_k (torch.Tensor): feature-mapped queries/keys, ``[B, T, H, F]``.
        v (torch.Tensor): values, ``[B, T, H, D]``.
        g (torch.Tensor): log forget gate, ``[B, T, H, F]``.
        window (int): softmax window length W (0 = off).
        q_rope, k_rope (torch.Tensor, Optional): RoPE'd queries/keys ``[B, T, H, Dk]`` for the
            window scores. Required when ``window > 0``.
        window_factor (torch.Tensor, Optional): per-head weight of the window terms in (0, 1),
            ``[H]``. Required when ``window > 0``.
        scale (float, Optional): score scale. Default: ``Dk ** -0.5``.
        eps (float): added to the denominator. Default: 1e-10.

    Returns:
        ``o [B, T, H, D]`` in v.dtype.
    """
    dtype = _compute_dtype(phi_q, phi_k, v, g)
    B, T, H, F = phi_q.shape
    D = v.shape[-1]
    pq, pk, gf = phi_q.to(dtype), phi_k.to(dtype), g.to(dtype)
    v_aug = torch.cat([v.to(dtype), torch.ones_like(v[..., :1], dtype=dtype)], dim=-1)
    if window > 0:
        if q_rope is None or k_rope is None or window_factor is None:
            raise ValueError("window > 0 needs q_rope, k_rope and window_factor")
        qr, kr = q_rope.to(dtype), k_rope.to(dtype)
        scale = qr.shape[-1] ** -0.5 if scale is None else scale
        fac = window_factor.to(dtype)[None, :, None]                       # [1, H, 1]
    state = torch.zeros(B, H, F, D + 1, dtype=dtype, device=v.device)  # holds tokens s <= t-W
    outs = []
    for t in range(T):
        state = state * gf[:, t].exp()[..., None]
        s = t - window
        if s >= 0:
            decay = gf[:, s + 1:t + 1].sum(dim=1).exp()                  # prod of the gates after s
            state = state + (pk[:, s] * decay)[..., None] * v_aug[:, s, :, None, :]
        num = torch.einsum("bhf,bhfv->bhv", pq[:, t], state)
        if window > 0:
            lo = max(0, t - window + 1)
            scores = torch.einsum("bhd,bshd->bhs", qr[:, t], kr[:, lo:t + 1]) * scale
            e = (scores - scores.amax(dim=-1, keepdim=True)).exp()
            num = num + fac * torch.einsum("bhs,bshv->bhv", e, v_aug[:, lo:t + 1])
        outs.append(num[..., :D] / (num[..., D:] + eps))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, D, dtype=dtype)
    return o.to(v.dtype)
