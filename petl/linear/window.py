"""Optional sliding softmax window of the LAWCAT layer (LoLCATs-style hybrid, off by default).

With a window of W tokens, query t reads tokens s in (t-W, t] through exp-scores of the RoPE'd
teacher q/k (max-subtracted over the window, weighted by a per-head factor in (0, 1)) and the
older tokens s <= t-W through the gated linear state. Both forms below work on an *extended*
sequence: the last W tokens of earlier calls (from the cache) followed by the T new ones, so
prefill, chunked prefill and decoding compute the same function.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def window_terms(q_rope: torch.Tensor, k_ext: torch.Tensor, v_ext: torch.Tensor,
                 valid_ext: torch.Tensor | None, window: int, scale: float) -> torch.Tensor:
    """Exp-score sums over the last ``window`` tokens, ``sum_s exp(score_ts - max_t) v_s``.

    Args:
        q_rope (torch.Tensor): RoPE'd queries of the new tokens ``[B, T, H, Dk]``.
        k_ext (torch.Tensor): RoPE'd keys, past then new, ``[B, P+T, H, Dk]``.
        v_ext (torch.Tensor): values with the ones column, ``[B, P+T, H, V]``.
        valid_ext (torch.Tensor, Optional): ``[B, P+T]`` bool, False for padding tokens.
        window (int): W.
        scale (float): score scale.

    Returns:
        ``[B, T, H, V]`` float32 (or float64); the last column is the window's denominator.
    """
    dtype = torch.promote_types(torch.float32, q_rope.dtype)
    B, T, H, Dk = q_rope.shape
    P = k_ext.shape[1] - T
    blk = max(1, min(T, window))
    nb = -(-T // blk)
    span = blk + window - 1
    # Keys for query block i start at extended index P + i*blk - (W-1); pad so all are in range.
    left = window - 1
    right = nb * blk - T
    kp = F.pad(k_ext.to(dtype), (0, 0, 0, 0, left, right))
    vp = F.pad(v_ext.to(dtype), (0, 0, 0, 0, left, right))
    k_blocks = kp[:, P:].unfold(1, span, blk)                                 # [B, nb, H, Dk, span]
    v_blocks = vp[:, P:].unfold(1, span, blk)                                 # [B, nb, H, V, span]
    qb = F.pad(q_rope.to(dtype), (0, 0, 0, 0, 0, right)).view(B, nb, blk, H, Dk)
    scores = torch.einsum("bnihd,bnhds->bnhis", qb, k_blocks) * scale        # [B, nb, H, blk, span]
    q_pos = torch.arange(blk, device=q_rope.device)[:, None]
    k_pos = torch.arange(span, device=q_rope.device)[None, :] - (window - 1)  # relative to block start
    allowed = (k_pos <= q_pos) & (k_pos > q_pos - window)                     # [blk, span]
    block_start = P + torch.arange(nb, device=q_rope.device) * blk            # extended index
    k_abs = block_start[:, None] + k_pos                                      # [nb, span]
    mask = allowed[None] & (k_abs >= 0)[:, None, :] & (k_abs < P + T)[:, None, :]
    mask = mask[None, :, None]                                                # [1, nb, 1, blk, span]
    if valid_ext is not None:
        vpad = F.pad(valid_ext, (left, right), value=False)[:, P:].unfold(1, span, blk)
        mask = mask & vpad[:, :, None, None, :]
    scores = scores.masked_fill(~mask, float("-inf"))
    m = scores.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).min)   # rows with no key
    e = (scores - m).exp()
    out = torch.einsum("bnhis,bnhvs->bnihv", e, v_blocks)                     # [B, nb, blk, H, V]
    return out.reshape(B, nb * blk, H, -1)[:, :T]


def delayed_keys(phi_k_ext: torch.Tensor, v_ext: torch.Tensor, g_ext: torch.Tensor,
                 window: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values that enter the linear state W steps late, pre-decayed over those W steps.

    At new step t the token ``s = t - W`` joins the state that holds tokens older than the
    window; its key is scaled by ``prod_{r=s+1..t} exp(g_r)`` so the ordinary GLA recurrence
    (``S_t = Diag(exp g_t) S_{t-1} + k'_t v'_t^T``) reproduces the exact decay. Tokens before
    the extended sequence are already in the cached state; slots without a token get zeros.

    Args:
        phi_k_ext (torch.Tensor): ``[B, P+T, H, F]`` feature-mapped keys, past then new.
        v_ext (torch.Tensor): ``[B, P+T, H, V]``.
        g_ext (torch.Tensor): ``[B, P+T, H, F]`` log gates.
        window (int): W (>= 1).
        T (int): number of new tokens.

    Returns:
        ``(k' [B, T, H, F], v' [B, T, H, V])``.
    """
    P = phi_k_ext.shape[1] - T
    # Windowed gate sums from a float64 running sum: differences of long cumsums stay exact.
    G = F.pad(g_ext.double().cumsum(dim=1), (0, 0, 0, 0, 1, 0))              # G[i] = sum_{<i}
    idx = torch.arange(T, device=g_ext.device) + P                           # extended index of t
    src = idx - window                                                        # token that joins
    ok = src >= 0
    src_c = src.clamp_min(0)
    decay = (G[:, idx + 1] - G[:, src_c + 1]).exp().to(g_ext.dtype)          # sum g over (s, t]
    k_new = phi_k_ext[:, src_c].to(decay.dtype) * decay
    v_new = v_ext[:, src_c]
    okb = ok[None, :, None, None]
    return (k_new * okb).to(phi_k_ext.dtype), v_new * okb
