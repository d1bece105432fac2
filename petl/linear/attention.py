"""``LawcatAttention``: the attention module that replaces a Llama/Mistral/Qwen2 ``self_attn``.

Per layer (adapters.md §3.2; shapes for B batch, T new tokens, H query heads, d head dim):

1. q, k, v from the teacher's own ``q_proj``/``k_proj``/``v_proj`` (kept under the same names, so
   peft LoRA targets them in stage 2); k and v are repeated over the GQA groups first;
2. causal depthwise conv (K=4) across tokens on q and k (not v), no RoPE on this path;
3. Hedgehog feature map on the conv outputs -> ``phi_q, phi_k`` ``[B, T, H, 2f]``;
4. data-dependent per-channel gate ``log alpha`` ``[B, T, H, 2f]`` (per kv head, repeated);
5. normalised gated linear attention: one GLA over ``[v, 1]``; the last column divides (the
   fused path, petl/linear/fused.py, computes the normaliser in its own kernel instead);
6. optional sliding softmax window (RoPE'd q/k) mixed into numerator and denominator;
7. ``o_proj``.

In *distill mode* (stage 1 attention transfer, :mod:`petl.distill`) the module also computes the
teacher's softmax attention with RoPE through transformers' AttentionInterface on the same
q/k/v, stores ``MSE(student, teacher)`` in ``self.lawcat_distill_loss`` and passes the teacher's
output on, so every layer learns against exact teacher inputs.
"""
from __future__ import annotations

import math
import sys

import torch
import torch.nn as nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .cache import LawcatCacheLayer, lawcat_cache_layer
from .config import LawcatConfig
from .modules import CausalDepthwiseConv, GlaGate, HedgehogFeatureMap
from .fused import fused_attend, use_fused
from .ops import gla, resolve_backend
from .window import delayed_keys, window_terms


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on ``x [B, T, H, d]`` with ``cos, sin [B, T, d]`` (Llama convention)."""
    cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)
    return x * cos + _rotate_half(x) * sin


def key_padding(attention_mask, T: int) -> torch.Tensor | None:
    """``[B, T]`` bool (False = padding) for the new tokens, or None when nothing is padded.

    A token attends to itself unless it is padding, so the mask's diagonal (query j, key
    ``S - T + j``) marks the real tokens in every mask layout transformers passes: 2D, 4D bool
    (sdpa) or 4D additive float (eager); causal or sliding. A BlockMask (flex) is taken as
    unpadded.
    """
    if not isinstance(attention_mask, torch.Tensor):
        return None
    m = attention_mask
    if m.dim() == 2:
        valid = m[:, -T:].bool()
    elif m.dim() == 4:
        rows = torch.arange(T, device=m.device)
        diag = m[:, 0, rows if m.shape[2] == T else rows.clamp_max(m.shape[2] - 1), m.shape[-1] - T + rows]
        valid = diag if diag.dtype == torch.bool else diag > torch.finfo(diag.dtype).min / 2
    else:
        return None
    return None if bool(valid.all()) else valid


class LawcatAttention(nn.Module):
    """LAWCAT linear attention built around a loaded softmax attention module.

    Args:
        base (nn.Module): the model's attention module (``LlamaAttention``, ``MistralAttention``,
            ``Qwen2Attention``, ...); its projections (and q/k norms, if any) are reused.
        config (LawcatConfig): LAWCAT hyper-parameters.
    """

    def __init__(self, base: nn.Module, config: LawcatConfig) -> None:
        super().__init__()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not isinstance(getattr(base, name, None), nn.Module):
                raise TypeError(f"{type(base).__name__} has no {name}: LAWCAT converts attention "
                                "modules with separate q/k/v/o projections (Llama, Mistral, Qwen2/3)")
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = base.q_proj, base.k_proj, base.v_proj, base.o_proj
        self.q_norm = getattr(base, "q_norm", None)
        self.k_norm = getattr(base, "k_norm", None)
        self.config = base.config
        self.layer_idx = base.layer_idx
        self.head_dim = base.head_dim
        self.num_heads = self.q_proj.out_features // self.head_dim
        self.num_kv_heads = self.k_proj.out_features // self.head_dim
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.scaling = getattr(base, "scaling", self.head_dim ** -0.5)
        self.attention_dropout = getattr(base, "attention_dropout", 0.0)
        self.is_causal = True
        self.sliding_window = getattr(base, "sliding_window", getattr(base.config, "sliding_window", None))
        self._teacher_eager = getattr(sys.modules.get(type(base).__module__), "eager_attention_forward", None)
        self.lawcat_config = config

        H, d = self.num_heads, self.head_dim
        f = config.feature_dim or d // 2
        self.feature_size = 2 * f
        self.lawcat_conv_q = CausalDepthwiseConv(H * d, config.conv_size, config.conv_init, config.conv_init_eps)
        self.lawcat_conv_k = CausalDepthwiseConv(H * d, config.conv_size, config.conv_init, config.conv_init_eps)
        self.lawcat_feature_map_q = HedgehogFeatureMap(H, d, f, config.feature_map_init)
        self.lawcat_feature_map_k = (None if config.tie_feature_maps
                                     else HedgehogFeatureMap(H, d, f, config.feature_map_init))
        self.lawcat_gate = GlaGate(self.q_proj.in_features, self.num_kv_heads, self.feature_size,
                                   config.gate_low_rank, config.gate_logit_normalizer)
        self.lawcat_window_factor = None
        if config.window_size > 0:
            p = config.window_factor_init
            self.lawcat_window_factor = nn.Parameter(torch.full((H,), math.log(p / (1 - p))))
        self.lawcat_distill = False
        self.lawcat_distill_loss: torch.Tensor | None = None
        ref = self.q_proj.weight
        dtype = ref.dtype if ref.dtype.is_floating_point else torch.float32  # quantized base
        for name, module in self.named_children():
            if name.startswith("lawcat_"):
                module.to(device=ref.device, dtype=dtype)
        if self.lawcat_window_factor is not None:
            self.lawcat_window_factor.data = self.lawcat_window_factor.data.to(ref.device, dtype)

    def forward(self, hidden_states: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, past_key_values=None, cache=None,
                **kwargs) -> tuple[torch.Tensor, None]:
        """Same call contract as the replaced module (transformers 5.17 ``past_key_values`` or
        5.24 ``cache``). ``hidden_states`` ``[B, T, hidden]`` -> ``([B, T, hidden], None)``."""
        cache = cache if cache is not None else past_key_values
        B, T, _ = hidden_states.shape
        H, d = self.num_heads, self.head_dim
        q = self.q_proj(hidden_states).view(B, T, H, d)
        k = self.k_proj(hidden_states).view(B, T, self.num_kv_heads, d)
        v = self.v_proj(hidden_states).view(B, T, self.num_kv_heads, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        valid = key_padding(attention_mask, T)
        if self.lawcat_distill:
            return self._distill_forward(hidden_states, q, k, v, valid, position_embeddings,
                                         attention_mask, kwargs)
        layer_cache = lawcat_cache_layer(cache, self.layer_idx) if cache is not None else None
        o = self.attend(hidden_states, q, k, v, valid, position_embeddings, layer_cache)
        return self.o_proj(o.reshape(B, T, H * d)), None

    def attend(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               valid: torch.Tensor | None = None, position_embeddings=None,
               layer_cache: LawcatCacheLayer | None = None) -> torch.Tensor:
        """LAWCAT's replacement of the softmax-attention call: conv, feature map, gate and
        normalised GLA on projected ``q [B, T, H, d]``, ``k, v [B, T, H_kv, d]`` (x ``[B, T,
        hidden]`` feeds the gate). Returns ``[B, T, H, d]`` in x's dtype; updates ``layer_cache``.

        Runs the fused Triton path (petl/linear/fused.py) when it applies, else the PyTorch path.
        """
        cfg = self.lawcat_config
        T = q.shape[1]
        if T > 1 and cfg.window_size == 0:
            core = resolve_backend(cfg.backend, q.device, cfg.kernels)
            if use_fused(cfg, q.device, q.dtype, core, T):
                return fused_attend(self, x, q, k, v, valid, layer_cache, core)
        return self._student(x, q, k, v, valid, position_embeddings, layer_cache)

    def _student(self, x, q, k, v, valid, position_embeddings,
                 layer_cache: LawcatCacheLayer | None) -> torch.Tensor:
        """PyTorch path: normalised LAWCAT output ``[B, T, H, d]`` in x's dtype; updates ``layer_cache``."""
        cfg = self.lawcat_config
        B, T, H, d = q.shape
        G = self.num_key_value_groups
        k_rep, v_rep = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
        g = self.lawcat_gate(x).repeat_interleave(G, dim=2)                  # [B, T, H, 2f] fp32
        if valid is not None:  # where, not multiply: padded rows may hold NaN (eager softmax)
            mask = valid[:, :, None, None]
            q, k_rep, v_rep, g = (torch.where(mask, t, torch.zeros_like(t)) for t in (q, k_rep, v_rep, g))
        conv = layer_cache.conv_states if layer_cache is not None else {}
        qc, conv_q = self.lawcat_conv_q(q.reshape(B, T, H * d), conv.get("q"))
        kc, conv_k = self.lawcat_conv_k(k_rep.reshape(B, T, H * d), conv.get("k"))
        phi_q = self.lawcat_feature_map_q(qc.view(B, T, H, d))
        phi_k = (self.lawcat_feature_map_k or self.lawcat_feature_map_q)(kc.view(B, T, H, d))
        if valid is not None:
            phi_k = torch.where(valid[:, :, None, None], phi_k, torch.zeros_like(phi_k))
        v_aug = torch.cat([v_rep, torch.ones_like(v_rep[..., :1])], dim=-1)   # [B, T, H, d+1]
        state0 = layer_cache.recurrent_state if layer_cache is not None else None
        W = cfg.window_size
        window_state: dict[str, torch.Tensor] = {}
        if W > 0:
            num, state, window_state = self._windowed(q, k_rep, phi_q, phi_k, v_aug, g, valid,
                                                      position_embeddings, layer_cache, state0)
        else:
            num, state = gla(phi_q, phi_k, v_aug, g, state0, cfg.backend, cfg.chunk_size, cfg.kernels)
        num = num.to(torch.promote_types(num.dtype, torch.float32))
        o = num[..., :d] / (num[..., d:] + cfg.eps)
        if layer_cache is not None:
            layer_cache.update_state(T, {"q": conv_q, "k": conv_k}, state, window_state)
        return o.to(x.dtype)

    def _windowed(self, q, k_rep, phi_q, phi_k, v_aug, g, valid, position_embeddings,
                  layer_cache, state0):
        """Window softmax terms + delayed linear terms; returns (num, state, window buffers)."""
        cfg = self.lawcat_config
        W, T = cfg.window_size, q.shape[1]
        if position_embeddings is None:
            raise ValueError("window_size > 0 needs position_embeddings (RoPE) from the decoder layer")
        cos, sin = position_embeddings
        q_r, k_r = apply_rope(q, cos, sin), apply_rope(k_rep, cos, sin)
        new = {"k_rope": k_r, "v": v_aug, "phi_k": phi_k, "g": g,
               "valid": valid if valid is not None else torch.ones(q.shape[:2], dtype=torch.bool, device=q.device)}
        past = layer_cache.window if layer_cache is not None else {}
        ext = {n: torch.cat([past[n], t], dim=1) if n in past else t for n, t in new.items()}
        win = window_terms(q_r, ext["k_rope"], ext["v"], ext["valid"], W, self.scaling)
        k_del, v_del = delayed_keys(ext["phi_k"], ext["v"], ext["g"], W, T)
        lin, state = gla(phi_q, k_del, v_del, g, state0, cfg.backend, cfg.chunk_size, cfg.kernels)
        factor = torch.sigmoid(self.lawcat_window_factor.to(win.dtype))[None, None, :, None]
        num = lin.to(win.dtype) + factor * win
        keep = {n: t[:, -W:] for n, t in ext.items()}
        return num, state, keep

    def _distill_forward(self, x, q, k, v, valid, position_embeddings, attention_mask, kwargs):
        """Stage-1 forward: student vs teacher MSE stored; the teacher output flows on."""
        B, T, H, d = q.shape
        with torch.no_grad():
            cos, sin = position_embeddings
            q_r, k_r = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            impl = getattr(self.config, "_attn_implementation", None) or "sdpa"
            default = self._teacher_eager if impl == "eager" and self._teacher_eager else ALL_ATTENTION_FUNCTIONS["sdpa"]
            fn = default if impl == "eager" else ALL_ATTENTION_FUNCTIONS.get_interface(impl, default)
            kwargs = {n: t for n, t in kwargs.items() if n not in ("use_cache", "output_attentions")}
            teacher, _ = fn(self, q_r.transpose(1, 2), k_r.transpose(1, 2), v.transpose(1, 2),
                            attention_mask, dropout=0.0, scaling=self.scaling,
                            sliding_window=self.sliding_window, **kwargs)      # [B, T, H, d]
        student = self.attend(x, q, k, v, valid, position_embeddings, None)
        err = (student.float() - teacher.float()).pow(2)
        if valid is not None:
            w = valid[:, :, None, None].float()
            self.lawcat_distill_loss = (err * w).sum() / (w.sum() * H * d).clamp_min(1.0)
        else:
            self.lawcat_distill_loss = err.mean()
        return self.o_proj(teacher.to(x.dtype).reshape(B, T, H * d)), None

    def extra_repr(self) -> str:
        c = self.lawcat_config
        return (f"layer_idx={self.layer_idx}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
                f"feature_size={self.feature_size}, conv={c.conv_size}, window={c.window_size}")
