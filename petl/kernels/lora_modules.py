"""Fused forwards for the attention, MLP and RMSNorm modules of Llama-family models.

Each class here is a mixin placed in front of the model's own class (``LlamaAttention``...), so a
fused module *is* a ``LlamaAttention`` with the same children, parameters and attributes; only
``forward`` changes. It takes the fused path when the kernel switch allows it for the input's
device and every projection is a plain frozen ``nn.Linear`` or a peft LoRA ``Linear`` with one
active adapter, no dropout in training, no DoRA/variant and no hooks; otherwise it calls the
model's own forward (which runs peft's layers unchanged). The attention itself always goes
through the registered attention interface (``sdpa``, ``petl_s2``, ...), so S2/SF still apply.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn

from petl.kernels.lora_linear import Projection, lora_projections
from petl.kernels.lora_mlp import lora_swiglu_mlp
from petl.kernels.rmsnorm import rms_norm
from petl.kernels.rope import apply_rope
from petl.kernels.switch import interpreting, kernel_mode, triton_available, use_kernels

SWIGLU_ACTIVATIONS = ("silu", "swish")
_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


def kernel_plan(device: torch.device, kernels: Optional[str], triton: Optional[bool]) -> tuple[bool, bool]:
    """(take the fused path, use Triton for the element-wise parts) for tensors on ``device``.

    ``kernels`` is the switch (``auto``/``on``/``off``, None = ``$PETL_KERNELS``); ``triton=False``
    keeps the fused LoRA autograd functions but runs norm/RoPE/SwiGLU/CE in PyTorch, on any device
    when the switch is ``on`` (debugging, CPU tests).
    """
    mode = kernel_mode(kernels)
    if mode == "off":
        return False, False
    if triton is False:
        return mode == "on" or device.type == "cuda", False
    fused = use_kernels(device, kernels)
    return fused, fused and triton_available() and (device.type == "cuda" or interpreting())


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on for x's device, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def lora_projection(layer: nn.Module, dtype: torch.dtype) -> Optional[Projection]:
    """The :class:`Projection` that ``layer`` computes, cast to ``dtype``, or None if it cannot be fused."""
    if layer._forward_hooks or layer._forward_pre_hooks:
        return None  # e.g. peft's per-call adapter_names hooks: keep the layer's own forward
    if type(layer) is nn.Linear:
        base, adapter = layer, None
    else:
        from peft.tuners.lora import Linear as LoraLinear

        if not isinstance(layer, LoraLinear) or getattr(layer, "fan_in_fan_out", False):
            return None
        base = layer.get_base_layer()
        if type(base) is not nn.Linear:
            return None
        if layer.disable_adapters:
            if layer.merged:
                return None  # peft unmerges on the fly here
            adapter = None
        elif layer.merged:
            adapter = None
        else:
            active = [a for a in layer.active_adapters if a in layer.lora_A]
            if len(active) > 1:
                return None
            adapter = active[0] if active else None
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    bias = base.bias.to(dtype) if base.bias is not None else None
    if adapter is None:
        return Projection(base.weight.to(dtype), bias)
    if adapter in getattr(layer, "lora_variant", {}) or getattr(layer, "lora_bias", {}).get(adapter):
        return None
    dropout = layer.lora_dropout[adapter]
    if isinstance(dropout, nn.Dropout) and dropout.p > 0 and dropout.training:
        warn_once(f"petl.kernels: LoRA dropout {dropout.p} has no fused kernel; those projections run peft's "
                  "unfused path while training (set lora_dropout=0 to fuse them)")
        return None
    return Projection(base.weight.to(dtype), bias, layer.lora_A[adapter].weight.to(dtype),
                      layer.lora_B[adapter].weight.to(dtype), float(layer.scaling[adapter]))


class FusedRMSNorm:
    """RMSNorm through the Triton kernel (saves x and rstd only)."""

    _petl_kernels: Optional[str] = None
    _petl_triton: Optional[bool] = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        fused, use_triton = kernel_plan(hidden_states.device, self._petl_kernels, self._petl_triton)
        if not fused:
            return super().forward(hidden_states)
        return rms_norm(hidden_states, self.weight, self.variance_epsilon, use_triton)


class FusedSwiGLUMLP:
    """gate/up/down with LoRA and SwiGLU in one autograd Function.

    ``_petl_recompute``: None decides per call — gate/up outputs are saved inside a layer that
    gradient checkpointing replays anyway, and recomputed in the backward otherwise.
    """

    _petl_kernels: Optional[str] = None
    _petl_triton: Optional[bool] = None
    _petl_recompute: Optional[bool] = None
    _petl_owner = None  # weakref to the decoder layer, set by fuse_lora

    def _recompute(self) -> bool:
        if self._petl_recompute is not None:
            return self._petl_recompute
        owner = self._petl_owner() if self._petl_owner is not None else None
        return not (owner is not None and getattr(owner, "gradient_checkpointing", False) and owner.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused, use_triton = kernel_plan(x.device, self._petl_kernels, self._petl_triton)
        if fused and getattr(self.config, "hidden_act", None) in SWIGLU_ACTIVATIONS:
            dtype = compute_dtype(x)
            projs = [lora_projection(m, dtype) for m in (self.gate_proj, self.up_proj, self.down_proj)]
            if all(p is not None for p in projs):
                y = lora_swiglu_mlp(x.to(dtype).reshape(-1, x.shape[-1]), *projs, recompute=self._recompute(),
                                    use_triton=use_triton)
                return y.view(*x.shape[:-1], -1)
        return super().forward(x)


#: attention kwargs each family passes to the attention interface beyond Llama's
_ATTENTION_EXTRAS = {
    "MistralAttention": lambda m: {"sliding_window": getattr(m.config, "sliding_window", None)},
    "Qwen2Attention": lambda m: {"sliding_window": m.sliding_window},
}


class FusedAttention:
    """q/k/v LoRA projections from one saved x, Triton RoPE, the registered attention, fused o_proj."""

    _petl_kernels: Optional[str] = None
    _petl_triton: Optional[bool] = None
    _petl_eager = None  # the model module's eager_attention_forward (transformers' default)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, *args: Any,
                **kwargs: Any):
        plan = self._petl_plan(hidden_states, position_embeddings, args, kwargs)
        if plan is None:
            return super().forward(hidden_states, position_embeddings, attention_mask, *args, **kwargs)
        use_triton, (pq, pk, pv, po), dtype = plan
        kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}
        bsz, seq, hidden = hidden_states.shape
        x = hidden_states.to(dtype).reshape(bsz * seq, hidden)
        q, k, v = lora_projections(x, (pq, pk, pv))
        q, k = apply_rope(q.view(bsz, seq, -1, self.head_dim), k.view(bsz, seq, -1, self.head_dim),
                          *position_embeddings, use_triton=use_triton)
        v = v.view(bsz, seq, -1, self.head_dim)
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, type(self)._petl_eager)
        extras = _ATTENTION_EXTRAS.get(type(self)._petl_base.__name__, lambda m: {})(self)
        out, weights = attention(self, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask,
                                 dropout=0.0 if not self.training else self.attention_dropout,
                                 scaling=self.scaling, **extras, **kwargs)
        (y,) = lora_projections(out.reshape(bsz * seq, -1).to(dtype), (po,))
        return y.view(bsz, seq, -1), weights

    def _petl_plan(self, hidden_states, position_embeddings, args, kwargs):
        if args or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            return None  # decoding with a KV cache: the model's own forward
        if position_embeddings is None or any(t.requires_grad for t in position_embeddings):
            return None
        fused, use_triton = kernel_plan(hidden_states.device, self._petl_kernels, self._petl_triton)
        if not fused:
            return None
        dtype = compute_dtype(hidden_states)
        projs = tuple(lora_projection(m, dtype) for m in (self.q_proj, self.k_proj, self.v_proj, self.o_proj))
        if any(p is None for p in projs):
            return None
        return use_triton, projs, dtype
