"""A Llama-family decoder layer as ONE autograd Function that checkpoints itself.

Under gradient checkpointing, transformers runs each decoder layer through
``torch.utils.checkpoint``: the host issues the layer twice per step (forward, then the
recomputation), each time through per-op autograd Functions, graph building and saved-tensor
hooks. At 4 x 2048 tokens on a 0.9B model that host work is slower than the GPU. Here the layer

    x1 = x0 + o_proj(attn(rope(q, k), v))     q, k, v = LoRA projections of n1 = rmsnorm_1(x0)
    x2 = x1 + down(silu(gate(n2)) * up(n2))   n2 = rmsnorm_2(x1)           (LoRA on all seven)

is :class:`DecoderLayerFunction`: its forward runs the host functions of the fused ops with no
graph and saves only ``x0``; its backward recomputes the forward keeping what each hand-derived
backward needs, then calls those backwards in reverse order:

    MLP (swiglu_mlp_backward) -> rmsnorm_2 -> o_proj (project_backward) -> attention
    -> RoPE transpose -> q/k/v (project_backward) -> rmsnorm_1;  residuals add the upstream grad

The attention is the model's registered attention function (``sdpa``, ``eager``, petl's
``petl_s2``/``petl_sf``); its backward is ``torch.autograd.grad`` on a local graph of that one op
(rebuilt in the recomputation), so every registered pattern keeps its exact meaning. Returned
gradients: the layer input, every LoRA A/B factor, and the norm weights when they require grad
(LoRA+); the frozen base weights get none. Nothing random runs (dropout must be 0), so the
recomputation needs no RNG state.

The module side is :class:`FusedDecoderLayer`, a mixin put in front of ``LlamaDecoderLayer`` (and
the Mistral/Qwen2 equivalents) by :func:`petl.kernels.fuse_lora`. Its ``gradient_checkpointing``
attribute is a property that always reads False (transformers' checkpoint wrapper therefore never
wraps the layer a second time) and stores what transformers writes into ``_petl_gc``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from petl.kernels.lora_linear import Factors, Projection, cast_factors, project_backward, project_forward
from petl.kernels.lora_mlp import swiglu_mlp_backward, swiglu_mlp_forward
from petl.kernels.lora_modules import (_ATTENTION_EXTRAS, SWIGLU_ACTIVATIONS, _attention_functions, compute_dtype,
                                       kernel_plan, lora_projection, warn_once)
from petl.kernels.rmsnorm import rms_norm_backward, rms_norm_forward
from petl.kernels.rope import rope_backward, rope_forward, rope_tables

LAYER_CHECKPOINT_MODES = (True, False, "auto")


@dataclass
class LayerPlan:
    """Everything one layer call needs besides the input: parameters, tables, the attention call.

    projs: q, k, v, o, gate, up, down (:class:`Projection`, weights in the compute dtype);
    norms: ((weight ``[H]``, eps), (weight, eps)) of the input and post-attention RMSNorm;
    cos/sin ``[B or 1, L, D]`` in the compute dtype; mask: what the model passes to attention.
    """

    projs: Sequence[Projection]
    norms: tuple[tuple[torch.Tensor, float], tuple[torch.Tensor, float]]
    cos: torch.Tensor
    sin: torch.Tensor
    mask: Optional[torch.Tensor]
    attention: Callable
    module: nn.Module  # the attention module, passed to the attention function
    attn_kwargs: dict
    scaling: float
    head_dim: int
    dtype: torch.dtype
    use_triton: bool


@dataclass
class LayerFactors:
    """The LoRA factors of the four projection groups, cast once per forward (parameters, not activations)."""

    qkv: Factors
    o: Factors
    gate_up: Factors
    down: Factors

    @classmethod
    def of(cls, projs: Sequence[Projection], dtype: torch.dtype) -> "LayerFactors":
        return cls(cast_factors(projs[0:3], dtype), cast_factors(projs[3:4], dtype), cast_factors(projs[4:6], dtype),
                   cast_factors(projs[6:7], dtype))


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def layer_forward(x0: torch.Tensor, plan: LayerPlan, f: LayerFactors, keep: bool):
    """The layer on ``x0`` ``[B, L, H]``: returns ``x2`` ``[B, L, H]`` (``keep=False``) or the saved state.

    ``keep=True`` is the recomputation: it skips the down projection's output and returns the
    tensors the backward reads, with the attention recorded as a local graph on leaf q/k/v.
    """
    bsz, seq, hidden = x0.shape
    dt, tri = plan.dtype, plan.use_triton
    pq, pk, pv, po, pg, pu, pd = plan.projs
    (w1, eps1), (w2, eps2) = plan.norms
    x0f = x0.reshape(bsz * seq, hidden).contiguous()  # [T, H]
    n1, rstd1 = rms_norm_forward(x0f, w1, eps1, tri)
    n1c = _cast(n1, dt)
    (q, k, v), xa_qkv = project_forward(n1c, (pq, pk, pv), f.qkv)
    q, k = rope_forward(q.view(bsz, seq, -1, plan.head_dim), k.view(bsz, seq, -1, plan.head_dim), plan.cos, plan.sin,
                        tri)
    v = v.view(bsz, seq, -1, plan.head_dim)
    if keep:
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with torch.enable_grad() if keep else torch.no_grad():
        a, _ = plan.attention(plan.module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), plan.mask,
                              dropout=0.0, scaling=plan.scaling, **plan.attn_kwargs)  # [B, L, Hq, D]
    a_flat = _cast(a.detach().reshape(bsz * seq, -1), dt)
    (o,), xa_o = project_forward(a_flat, (po,), f.o)
    x1 = x0f + o
    n2, rstd2 = rms_norm_forward(x1, w2, eps2, tri)
    n2c = _cast(n2, dt)
    y, xa_gu, g, u, ha = swiglu_mlp_forward(n2c, (pg, pu, pd), f.gate_up, f.down, tri, need_y=not keep)
    if not keep:
        return (x1 + y).view(bsz, seq, hidden)
    return dict(x0f=x0f, n1=n1, n1c=n1c, rstd1=rstd1, xa_qkv=xa_qkv, q=q, k=k, v=v, a=a, a_flat=a_flat, xa_o=xa_o,
                x1=x1, n2=n2, n2c=n2c, rstd2=rstd2, xa_gu=xa_gu, g=g, u=u, ha=ha)


def layer_backward(dx2: torch.Tensor, x0: torch.Tensor, plan: LayerPlan, f: LayerFactors, need_dx0: bool,
                   need_dw: tuple[bool, bool]):
    """(dx0 ``[B, L, H]`` or None, dw1, dw2, [dA, dB] for q, k, v, o, gate, up, down) for upstream ``dx2``.

    ``need_dx0=False`` (the first layer over frozen embeddings) skips the q/k/v input gradient and
    the first norm's backward unless its weight trains.
    """
    bsz, seq, hidden = x0.shape
    dt, tri = plan.dtype, plan.use_triton
    pq, pk, pv, po, pg, pu, pd = plan.projs
    (w1, _), (w2, _) = plan.norms
    s = layer_forward(x0, plan, f, keep=True)  # entries are popped when last used: the peak stays one layer's
    d2 = dx2.reshape(bsz * seq, hidden).contiguous()  # grad of x1 through the second residual, too
    dn2, g_mlp = swiglu_mlp_backward(_cast(d2, dt), s.pop("n2c"), s.pop("xa_gu"), s.pop("ha"), s.pop("g"),
                                     s.pop("u"), (pg, pu, pd), f.gate_up, f.down, True, tri, inplace=True)
    dx1_norm, dw2 = rms_norm_backward(_cast(dn2, s.pop("n2").dtype).contiguous(), s.pop("x1"), w2, s.pop("rstd2"),
                                      need_dw[1], tri)
    del dn2
    dx1 = d2 + dx1_norm
    da, g_o = project_backward(s.pop("a_flat"), s.pop("xa_o"), (po,), (_cast(dx1, dt),), True, f.o)
    a = s.pop("a")
    dq, dk, dv = torch.autograd.grad(a, (s.pop("q"), s.pop("k"), s.pop("v")), _cast(da, a.dtype).view_as(a))
    del a, da
    dq, dk = rope_backward(dq, dk, plan.cos, plan.sin, tri)
    tokens = bsz * seq
    dys = tuple(_cast(t.reshape(tokens, -1), dt) for t in (dq, dk, dv))
    del dq, dk, dv
    dn1, g_qkv = project_backward(s["n1c"], s["xa_qkv"], (pq, pk, pv), dys, need_dx0 or need_dw[0], f.qkv)
    if dn1 is None:
        return None, None, dw2, [*g_qkv, *g_o, *g_mlp]
    dx0_norm, dw1 = rms_norm_backward(_cast(dn1, s["n1"].dtype).contiguous(), s["x0f"], w1, s["rstd1"], need_dw[0],
                                      tri)
    dx0 = _cast(dx1 + dx0_norm, x0.dtype).view(bsz, seq, hidden) if need_dx0 else None
    return dx0, dw1, dw2, [*g_qkv, *g_o, *g_mlp]


class DecoderLayerFunction(torch.autograd.Function):
    """One decoder layer; the forward saves only its input, the backward recomputes and back-propagates."""

    @staticmethod
    def forward(ctx, x0: torch.Tensor, plan: LayerPlan, w1: torch.Tensor, w2: torch.Tensor,
                *params: Optional[torch.Tensor]) -> torch.Tensor:
        f = LayerFactors.of(plan.projs, plan.dtype)
        with torch.autocast(x0.device.type, enabled=False):  # the recomputation runs without autocast too
            out = layer_forward(x0, plan, f, keep=False)
        ctx.plan, ctx.factors = plan, f
        ctx.save_for_backward(x0)
        return out

    @staticmethod
    def backward(ctx, dx2: torch.Tensor):
        (x0,) = ctx.saved_tensors
        with torch.autocast(x0.device.type, enabled=False):
            dx0, dw1, dw2, grads = layer_backward(dx2, x0, ctx.plan, ctx.factors, ctx.needs_input_grad[0],
                                                  (ctx.needs_input_grad[2], ctx.needs_input_grad[3]))
        flat: list[Optional[torch.Tensor]] = []
        for i in range(7):
            flat += [None, None, *grads[2 * i: 2 * i + 2]]
        return (dx0, None, dw1, dw2, *flat)


def decoder_layer(x0: torch.Tensor, plan: LayerPlan) -> torch.Tensor:
    """Apply the self-checkpointing layer to ``x0`` ``[B, L, H]`` -> ``[B, L, H]``."""
    (w1, _), (w2, _) = plan.norms
    flat = [t for p in plan.projs for t in p.flat()]
    return DecoderLayerFunction.apply(x0, plan, w1, w2, *flat)


def _norm_params(module: nn.Module) -> Optional[tuple[torch.Tensor, float]]:
    """(weight, eps) of an RMSNorm, or of the active copy inside peft's ``ModulesToSaveWrapper`` (LoRA+)."""
    if module._forward_hooks or module._forward_pre_hooks:
        return None
    if type(module).__name__ == "ModulesToSaveWrapper":
        if module.disable_adapters or any(a not in module.modules_to_save for a in module.active_adapters):
            module = module.original_module
        elif len(module.active_adapters) == 1:
            module = module.modules_to_save[module.active_adapters[0]]
        else:
            return None
        if module._forward_hooks or module._forward_pre_hooks:
            return None
    if not type(module).__name__.endswith("RMSNorm") or not hasattr(module, "variance_epsilon"):
        return None
    return module._parameters["weight"], float(module.variance_epsilon)


_CACHE_KEYS = ("cache", "past_key_values")
_LAYER_KEYS = _CACHE_KEYS + ("attention_mask", "position_embeddings")


class FusedDecoderLayer:
    """Decoder layer that runs as one self-checkpointing :class:`DecoderLayerFunction` while training.

    ``_petl_layer_checkpoint``: True (whenever training with gradients), False (never: today's
    per-module fused path), ``"auto"`` (when gradient checkpointing is enabled on the model).
    Otherwise, or when the layer cannot be fused (LoRA dropout, attention dropout, an attention
    implementation other than sdpa/eager/petl_*, KV cache, hooks), it runs the model's own
    forward over the fused submodules and checkpoints it itself if gradient checkpointing is on.
    """

    _petl_kernels: Optional[str] = None
    _petl_triton: Optional[bool] = None
    _petl_layer_checkpoint: Any = "auto"
    _petl_gc: bool = False

    @property
    def gradient_checkpointing(self) -> bool:
        return False  # transformers' wrapper must not checkpoint this layer: it checkpoints itself

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.__dict__["_petl_gc"] = bool(value)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        training = self.training and torch.is_grad_enabled()
        checkpointing = self._petl_gc and training
        mode = self._petl_layer_checkpoint
        layer = not args and (mode is True and training or mode == "auto" and checkpointing)
        if layer and not checkpointing and any(kwargs.get(k) is not None for k in _CACHE_KEYS):
            warn_once("petl.kernels: layer_checkpoint=True checkpoints every decoder layer, which cannot fill a KV "
                      "cache; training forwards run without one (as with gradient checkpointing)")
        if checkpointing or layer:  # what transformers' checkpoint wrapper does to the call
            kwargs = {k: v for k, v in kwargs.items() if k not in _CACHE_KEYS}
            if kwargs.get("use_cache"):
                kwargs["use_cache"] = False
        if layer:
            plan = self._petl_layer_plan(hidden_states, kwargs)
            if plan is not None:
                return decoder_layer(hidden_states, plan)
        own = partial(type(self)._petl_base.forward, self, **kwargs)
        if not checkpointing:
            return own(hidden_states, *args)
        func = self.__dict__.get("_gradient_checkpointing_func")
        if func is None:
            func = partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        return func(own, hidden_states, *args)

    def _petl_layer_plan(self, hidden_states: torch.Tensor, kwargs: dict) -> Optional[LayerPlan]:
        if any(kwargs.get(k) is not None for k in _CACHE_KEYS) or hidden_states.dim() != 3:
            return None
        pe = kwargs.get("position_embeddings")
        if pe is None or any(t.requires_grad for t in pe):
            return None
        fused, use_triton = kernel_plan(hidden_states.device, self._petl_kernels, self._petl_triton)
        if not fused:
            return None
        attn, mlp = self._modules["self_attn"], self._modules["mlp"]
        if attn._forward_hooks or attn._forward_pre_hooks or mlp._forward_hooks or mlp._forward_pre_hooks:
            return None
        impl = attn.config._attn_implementation or "eager"
        eager = getattr(type(attn), "_petl_eager", None)
        if eager is None or not (impl in ("sdpa", "eager") or impl.startswith("petl_")):
            return None
        if getattr(mlp.config, "hidden_act", None) not in SWIGLU_ACTIVATIONS:
            return None
        if self.training and getattr(attn, "attention_dropout", 0.0):
            warn_once(f"petl.kernels: attention dropout {attn.attention_dropout} cannot be recomputed by the "
                      "self-checkpointing layer; those layers run the per-module path (set attention_dropout=0)")
            return None
        norms = tuple(_norm_params(self._modules[n]) for n in ("input_layernorm", "post_attention_layernorm"))
        if norms[0] is None or norms[1] is None:
            return None
        dtype = compute_dtype(hidden_states)
        projs = tuple(lora_projection(m, dtype) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                                                          mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        if any(p is None for p in projs):
            return None
        cos, sin = pe
        if use_triton:
            cos, sin = rope_tables(cos, sin, dtype)
        elif cos.dtype != dtype:
            cos, sin = cos.to(dtype), sin.to(dtype)
        attn_kwargs = {k: v for k, v in kwargs.items() if k not in _LAYER_KEYS}
        attn_kwargs.update(_ATTENTION_EXTRAS.get(type(attn)._petl_base.__name__, lambda m: {})(attn))
        return LayerPlan(projs, norms, cos, sin, kwargs.get("attention_mask"),
                         _attention_functions().get_interface(impl, eager), attn, attn_kwargs, attn.scaling,
                         attn.head_dim, dtype, use_triton)
