"""Chunked parallel form of gated linear attention in pure PyTorch (training and prefill).

The sequence is cut into chunks of C tokens. Inside a chunk the output is a masked
"attention" ``A @ v`` with ``A[i, j] = sum_f q[i,f] k[j,f] exp(G[i,f] - G[j,f])`` (G the
in-chunk cumulative log gate); across chunks a state ``[F, V]`` is carried by a loop over
chunks. All gate arithmetic stays in log space and every ``exp`` gets a non-positive
argument, so nothing overflows whatever the gate values (g <= 0 is required):

* inter-chunk terms use ``q * exp(G)`` and ``k * exp(G_last - G)`` (both <= 1);
* inside a chunk, sub-chunks of c tokens: a query sub-chunk ``a`` and an earlier key sub-chunk
  factor through the first row r of ``a``: ``exp(G_i - G_r) * exp(G_r - G_j)``, each <= 1;
* the diagonal sub-blocks (i, j in the same sub-chunk) are computed exactly from the
  ``[c, c, F]`` tensor of differences, masked to j <= i before the ``exp``.

This is the same decomposition flash-linear-attention's ``chunk_gla`` uses, written with
batched matmuls; it is the CUDA fallback when fla is not installed and the form the tests
compare against :func:`petl.linear.naive.naive_recurrent_gla`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def chunked_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                initial_state: torch.Tensor | None = None, chunk_size: int = 64,
                sub_chunk_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated linear attention in chunks; same contract as ``naive_recurrent_gla``.

    Args:
        q, k (torch.Tensor): ``[B, T, H, F]``.
        v (torch.Tensor): ``[B, T, H, V]``.
        g (torch.Tensor): log forget gate ``[B, T, H, F]``, every entry <= 0.
        initial_state (torch.Tensor, Optional): ``[B, H, F, V]``. Default: zeros.
        chunk_size (int): C. Default: 64.
        sub_chunk_size (int): c, must divide C (reduced to C when it does not). Default: 16.

    Returns:
        ``(o [B, T, H, V], final_state [B, H, F, V])`` in float32 (float64 for float64 inputs).
    """
    dtype = torch.promote_types(torch.float32, torch.promote_types(q.dtype, v.dtype))
    B, T, H, Fd = q.shape
    V = v.shape[-1]
    C = chunk_size
    c = sub_chunk_size if (sub_chunk_size <= C and C % sub_chunk_size == 0) else C
    pad = (-T) % C
    # Zero padding is exact: k = 0 adds nothing to the state and g = 0 does not decay it.
    qf, kf, vf, gf = (F.pad(t.to(dtype), (0, 0, 0, 0, 0, pad)) for t in (q, k, v, g))
    N = (T + pad) // C

    def chunks(t: torch.Tensor) -> torch.Tensor:   # [B, N*C, H, X] -> [B, H, N, C, X]
        return t.view(B, N, C, H, t.shape[-1]).permute(0, 3, 1, 2, 4)

    qc, kc, vc = chunks(qf), chunks(kf), chunks(vf)
    G = chunks(gf).cumsum(dim=3)                                              # [B, H, N, C, F]
    A = _intra_chunk_scores(qc, kc, G, c)                                     # [B, H, N, C, C]
    o = A @ vc                                                                # [B, H, N, C, V]

    g_last = G[..., -1:, :]                                                   # [B, H, N, 1, F]
    k_to_end = kc * (g_last - G).exp()
    updates = k_to_end.transpose(-1, -2) @ vc                                 # [B, H, N, F, V]
    decay = g_last.squeeze(-2).exp()[..., None]                               # [B, H, N, F, 1]
    state = (torch.zeros(B, H, Fd, V, dtype=dtype, device=q.device)
             if initial_state is None else initial_state.to(dtype))
    starts = []
    for n in range(N):
        starts.append(state)
        state = decay[:, :, n] * state + updates[:, :, n]
    o = o + (qc * G.exp()) @ torch.stack(starts, dim=2)                       # inter-chunk part
    o = o.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, V)[:, :T]
    return o, state


def _intra_chunk_scores(q: torch.Tensor, k: torch.Tensor, G: torch.Tensor, c: int) -> torch.Tensor:
    """Causal in-chunk scores ``A[i, j] = sum_f q_i k_j exp(G_i - G_j)`` for j <= i, else 0.

    Args: q, k, G ``[B, H, N, C, F]``; c the sub-chunk size. Returns ``[B, H, N, C, C]``.
    """
    B, H, N, C, Fd = q.shape
    S = C // c
    A = q.new_zeros(B, H, N, C, C)
    # Diagonal sub-blocks, exact: differences masked to j <= i before exp, so every argument <= 0.
    Gs = G.view(B, H, N, S, c, Fd)
    diff = Gs[..., :, None, :] - Gs[..., None, :, :]                           # [.., S, c, c, F]
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    decay = diff.masked_fill(~causal[:, :, None], float("-inf")).exp()
    diag = torch.einsum("...if,...ijf,...jf->...ij", q.view(B, H, N, S, c, Fd), decay,
                        k.view(B, H, N, S, c, Fd))                              # [.., S, c, c]
    for a in range(S):
        rows = slice(a * c, (a + 1) * c)
        A[..., rows, rows] = diag[..., a, :, :]
        if a == 0:
            continue
        ref = G[..., a * c:a * c + 1, :]                                       # first row of sub-chunk a
        q_hat = q[..., rows, :] * (G[..., rows, :] - ref).exp()
        k_hat = k[..., :a * c, :] * (ref - G[..., :a * c, :]).exp()
        A[..., rows, :a * c] = q_hat @ k_hat.transpose(-1, -2)
    return A
