"""The three trainable pieces LAWCAT adds to an attention layer (adapters.md §3.2 steps 3-5).

* :class:`CausalDepthwiseConv` — short convolution across tokens on q and k, with a rolling
  state of the last ``K - 1`` inputs so decoding continues exactly where prefill stopped;
* :class:`HedgehogFeatureMap` — ``phi(u) = [softmax(u W_h), softmax(-u W_h)]`` per head;
* :class:`GlaGate` — data-dependent per-channel decay ``log alpha = logsigmoid(W2 W1 x + b) / 16``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class CausalDepthwiseConv(nn.Module):
    """Depthwise causal conv over time: ``y_t = sum_{j<K} w[K-1-j] * x_{t-j}`` per channel.

    Args:
        channels (int): number of channels (``heads * head_dim``).
        kernel_size (int): K. Default: 4.
        init (str): ``"identity"`` puts 1 on the current-token tap and ``eps`` on the others, so
            the converted layer starts close to the teacher's q and k; ``"random"`` keeps
            PyTorch's Conv1d init. Default: ``"identity"``.
        eps (float): the non-current taps under ``"identity"``. Default: 1e-3.
    """

    def __init__(self, channels: int, kernel_size: int = 4, init: str = "identity",
                 eps: float = 1e-3) -> None:
        super().__init__()
        self.channels, self.kernel_size = channels, kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        if init == "identity":
            with torch.no_grad():
                self.weight.fill_(eps)
                self.weight[..., -1] = 1.0
        else:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: x ``[B, T, C]``; state ``[B, C, K-1]`` (the previous inputs) or None (zeros).

        Returns: ``(y [B, T, C], new_state [B, C, K-1])``.
        """
        B, T, C = x.shape
        xt = x.transpose(1, 2)                                                   # [B, C, T]
        if state is None:
            state = xt.new_zeros(B, C, self.kernel_size - 1)
        full = torch.cat([state.to(xt.dtype), xt], dim=-1)                      # [B, C, K-1+T]
        y = F.conv1d(full, self.weight.to(xt.dtype), groups=C)                   # [B, C, T]
        return y.transpose(1, 2), full[..., full.shape[-1] - (self.kernel_size - 1):]


class HedgehogFeatureMap(nn.Module):
    """Hedgehog feature map per head: ``[softmax(u W_h), softmax(-u W_h)]``, clamped at 1e-12.

    Outputs are positive, so the LAWCAT normaliser ``phi(q)^T z`` is positive.

    Args:
        num_heads (int): H (one ``W_h`` per query head).
        head_dim (int): d, the input width.
        feature_dim (int): f; the output has 2f features.
        init (str): ``"identity"`` (``W_h`` = the first f columns of the identity, the paper's
            ``--lk_zero_init``) or ``"random"`` (normal, std ``d ** -0.5``). Default: identity.
    """

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int,
                 init: str = "identity") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, feature_dim))
        with torch.no_grad():
            if init == "identity":
                self.weight.zero_()
                n = min(head_dim, feature_dim)
                self.weight[:, torch.arange(n), torch.arange(n)] = 1.0
            else:
                self.weight.normal_(0.0, head_dim ** -0.5)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """Args: u ``[B, T, H, d]``. Returns ``[B, T, H, 2f]`` in u's dtype."""
        dtype = torch.promote_types(u.dtype, torch.float32)  # softmax in >= float32
        z = torch.einsum("bthd,hdf->bthf", u.to(dtype), self.weight.to(dtype))
        phi = torch.cat([z.softmax(dim=-1), (-z).softmax(dim=-1)], dim=-1).clamp_min(1e-12)
        return phi.to(u.dtype)


class GlaGate(nn.Module):
    """Low-rank data-dependent forget gate, one value per key feature per key/value head.

    ``log alpha_t = logsigmoid(W2 W1 x_t + b) / normalizer``. W2 and b start at 0, so every
    channel starts at ``alpha = exp(log(1/2) / 16) ~= 0.958`` (adapters.md §3.2 step 5).

    Args:
        hidden_size (int): model width.
        num_kv_heads (int): key/value heads (the gate is repeated over each GQA group).
        feature_size (int): 2f, the feature-map width.
        low_rank (int): rank of ``W2 W1``. Default: 16.
        normalizer (float): divides the log-sigmoid. Default: 16.
    """

    def __init__(self, hidden_size: int, num_kv_heads: int, feature_size: int,
                 low_rank: int = 16, normalizer: float = 16.0) -> None:
        super().__init__()
        self.num_kv_heads, self.feature_size, self.normalizer = num_kv_heads, feature_size, normalizer
        self.down = nn.Linear(hidden_size, low_rank, bias=False)
        self.up = nn.Linear(low_rank, num_kv_heads * feature_size, bias=True)
        nn.init.xavier_uniform_(self.down.weight, gain=2 ** -2.5)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid logits ``W2 W1 x + b``, ``[B, T, H_kv, 2f]`` in the weights' dtype (the fused
        kernels apply the log-sigmoid themselves)."""
        out = self.up(self.down(x.to(self.down.weight.dtype)))
        return out.view(*x.shape[:-1], self.num_kv_heads, self.feature_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``[B, T, hidden]``. Returns the log gate ``[B, T, H_kv, 2f]`` in float32 (float64 for a float64 model)."""
        logits = self.logits(x)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.logsigmoid(logits) / self.normalizer
