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


_LORA_LINEAR: Optional[type] = None


def _lora_linear() -> type:
    """peft's LoRA ``Linear`` class, imported once (an import statement per projection call is host time)."""
    global _LORA_LINEAR
    if _LORA_LINEAR is None:
        from peft.tuners.lora import Linear

        _LORA_LINEAR = Linear
    return _LORA_LINEAR


def _in_dtype(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def lora_projection(layer: nn.Module, dtype: torch.dtype) -> Optional[Projection]:
    """The :class:`Projection` that ``layer`` computes, or None if it cannot be fused.

    The frozen weight and bias are cast to ``dtype`` (the compute dtype); the LoRA factors are
    returned as they are (the fused Functions cast them once per group and return their
    gradients in their own dtype). Runs for every projection on every forward (twice per step
    under gradient checkpointing), so it reads submodules and parameters from the module
    dictionaries rather than through ``nn.Module.__getattr__``.
    """
    if layer._forward_hooks or layer._forward_pre_hooks:
        return None  # e.g. peft's per-call adapter_names hooks: keep the layer's own forward
    if type(layer) is nn.Linear:
        base, adapter = layer, None
    else:
        if not isinstance(layer, _lora_linear()) or getattr(layer, "fan_in_fan_out", False):
            return None
        base = layer._modules.get("base_layer")
        if type(base) is not nn.Linear:
            return None  # quantized or nested tuner layer: peft's own forward
        if layer.disable_adapters:
            if layer.merged:
                return None  # peft unmerges on the fly here
            adapter = None
        elif layer.merged:
            adapter = None
        else:
            lora_a = layer._modules["lora_A"]._modules
            active = [a for a in layer.active_adapters if a in lora_a]
            if len(active) > 1:
                return None
            adapter = active[0] if active else None
    weight, bias = base._parameters["weight"], base._parameters.get("bias")
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return None
    weight, bias = _in_dtype(weight, dtype), _in_dtype(bias, dtype)
    if adapter is None:
        return Projection(weight, bias)
    if adapter in getattr(layer, "lora_variant", {}) or getattr(layer, "lora_bias", {}).get(adapter):
        return None
    dropout = layer._modules["lora_dropout"]._modules[adapter]
    if isinstance(dropout, nn.Dropout) and dropout.p > 0 and dropout.training:
        warn_once(f"petl.kernels: LoRA dropout {dropout.p} has no fused kernel; those projections run peft's "
                  "unfused path while training (set lora_dropout=0 to fuse them)")
        return None
    return Projection(weight, bias, layer._modules["lora_A"]._modules[adapter]._parameters["weight"],
                      layer._modules["lora_B"]._modules[adapter]._parameters["weight"], float(layer.scaling[adapter]))


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
        # a self-checkpointing decoder layer (petl.kernels.lora_layer) keeps transformers' flag in _petl_gc
        checkpointed = owner is not None and owner.__dict__.get("_petl_gc", getattr(owner, "gradient_checkpointing",
                                                                                      False))
        return not (checkpointed and owner.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused, use_triton = kernel_plan(x.device, self._petl_kernels, self._petl_triton)
        if fused and getattr(self.config, "hidden_act", None) in SWIGLU_ACTIVATIONS:
            dtype = compute_dtype(x)
            projs = [lora_projection(m, dtype) for m in (self.gate_proj, self.up_proj, self.down_proj)]
            if all(p is not None for p in projs):
                y = lora_swiglu_mlp(_in_dtype(x, dtype).reshape(-1, x.shape[-1]), *projs, recompute=self._recompute(),
                                    use_triton=use_triton)
                return y.view(*x.shape[:-1], -1)
        return super().forward(x)


_ATTENTION_FUNCTIONS = None


def _attention_functions():
    """transformers' ``ALL_ATTENTION_FUNCTIONS`` registry, imported on first use."""
    global _ATTENTION_FUNCTIONS
    if _ATTENTION_FUNCTIONS is None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        _ATTENTION_FUNCTIONS = ALL_ATTENTION_FUNCTIONS
    return _ATTENTION_FUNCTIONS


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
        x = _in_dtype(hidden_states, dtype).reshape(bsz * seq, hidden)
        q, k, v = lora_projections(x, (pq, pk, pv))
        q, k = apply_rope(q.view(bsz, seq, -1, self.head_dim), k.view(bsz, seq, -1, self.head_dim),
                          *position_embeddings, use_triton=use_triton)
        v = v.view(bsz, seq, -1, self.head_dim)
        attention = _attention_functions().get_interface(self.config._attn_implementation, type(self)._petl_eager)
        extras = _ATTENTION_EXTRAS.get(type(self)._petl_base.__name__, lambda m: {})(self)
        out, weights = attention(self, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask,
                                 dropout=0.0 if not self.training else self.attention_dropout,
                                 scaling=self.scaling, **extras, **kwargs)
        (y,) = lora_projections(_in_dtype(out.reshape(bsz * seq, -1), dtype), (po,))
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
