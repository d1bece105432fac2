"""``fuse_lora(model)``: put petl's fused LoRA training kernels into a loaded Llama-family model.

Mechanism (no transformers/peft globals are touched): each ``LlamaAttention`` / ``LlamaMLP`` /
``LlamaRMSNorm`` *instance* (and the Mistral/Qwen2 equivalents) is replaced in its parent by an
instance of a subclass whose ``forward`` is fused (:mod:`petl.kernels.lora_modules`). The new
instance keeps the same children, parameters, buffers and attributes, and the class keeps its
name, so state-dict keys, ``save_pretrained``/``from_pretrained``, ``merge_and_unload`` and
``config.architectures`` are unchanged. peft's LoRA layers stay where they are; the fused forwards
read their factors. The loss path uses three forward hooks (public PyTorch API): the top-level
module's pre-hook takes ``labels`` out of the call, the lm_head's pre-hook keeps its input and lets
it produce zero-length logits, and the top-level post-hook computes the fused linear
cross-entropy (:mod:`petl.kernels.cross_entropy`) and returns the output with that loss and
``logits=None``. So the ``[tokens, vocab]`` logits never exist while training.
"""
from __future__ import annotations

import copy
import importlib
import weakref
from typing import Any, Optional

import torch
from torch import nn

from petl.kernels.cross_entropy import IGNORE_INDEX, causal_lm_loss
from petl.kernels.lora_layer import LAYER_CHECKPOINT_MODES, FusedDecoderLayer
from petl.kernels.lora_modules import FusedAttention, FusedRMSNorm, FusedSwiGLUMLP, kernel_plan
from petl.kernels.switch import KERNEL_MODES

#: model_type -> (modeling module, attention class, MLP class, RMSNorm class, decoder layer class)
SUPPORTED = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaAttention", "LlamaMLP", "LlamaRMSNorm",
              "LlamaDecoderLayer"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "MistralAttention", "MistralMLP", "MistralRMSNorm",
                "MistralDecoderLayer"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2Attention", "Qwen2MLP", "Qwen2RMSNorm",
              "Qwen2DecoderLayer"),
}
_STATE = "_petl_fused"
_CLASSES: dict[tuple[type, type], type] = {}


def _fused_class(base: type, mixin: type) -> type:
    """``class <base.__name__>(mixin, base)``, cached (same name: checkpoints and configs stay as they were).

    The class exists only at run time, so pickle (``torch.save(model)``, ``copy.deepcopy``) cannot
    find it by name: its instances reduce to :func:`_new_fused` with (base, mixin), which rebuilds
    the class from the cache."""
    key = (base, mixin)
    if key not in _CLASSES:
        attrs = {"__module__": __name__, "__qualname__": base.__qualname__, "_petl_base": base,
                 "_petl_mixin": mixin, "__reduce_ex__": _reduce_fused, "__setstate__": _setstate_fused}
        if mixin is FusedAttention:
            attrs["_petl_eager"] = staticmethod(importlib.import_module(base.__module__).eager_attention_forward)
        _CLASSES[key] = type(base.__name__, (mixin, base), attrs)
    return _CLASSES[key]


class _Owner:
    """Pickle's stand-in for the weak reference from a fused MLP to its decoder layer."""

    def __init__(self, module: Optional[nn.Module]) -> None:
        self.module = module


def _new_fused(base: type, mixin: type) -> nn.Module:
    """An empty instance of the fused ``(mixin, base)`` class (unpickling; state follows)."""
    cls = _fused_class(base, mixin)
    return cls.__new__(cls)


def _reduce_fused(self: nn.Module, protocol: int) -> tuple:
    state = dict(self.__dict__)
    owner = state.get("_petl_owner")
    if isinstance(owner, weakref.ref):
        state["_petl_owner"] = _Owner(owner())
    return _new_fused, (type(self)._petl_base, type(self)._petl_mixin), state


def _setstate_fused(self: nn.Module, state: dict) -> None:
    owner = state.get("_petl_owner")
    if isinstance(owner, _Owner):
        state = {**state, "_petl_owner": weakref.ref(owner.module) if owner.module is not None else None}
    type(self)._petl_base.__setstate__(self, state)


def _rebuild(module: nn.Module, cls: type) -> nn.Module:
    """A new instance of ``cls`` sharing ``module``'s children, parameters, buffers and attributes."""
    new = cls.__new__(cls)
    state = dict(module.__dict__)
    for key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        state[key] = copy.copy(state[key])
    new.__dict__.update(state)
    return new


def _base_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _swap(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def fuse_lora(model: nn.Module, kernels: Optional[str] = None, *, triton: Optional[bool] = None,
              fused_loss: bool = True, mlp_recompute: Optional[bool] = None,
              layer_checkpoint: bool | str = "auto") -> nn.Module:
    """Switch a Llama/Mistral/Qwen2 causal LM (or a peft ``PeftModel`` of one) to petl's fused kernels.

    Args:
        model (nn.Module): the object you call in training (``PeftModel`` or ``PreTrainedModel``);
            the loss hooks go on it, so calling an inner module skips the fused loss (not the
            fused layers).
        kernels (str, Optional): ``auto`` (fused on CUDA, peft's unfused path elsewhere), ``on``,
            ``off``; None reads ``$PETL_KERNELS``. Decided per call from the input's device.
        triton (bool, Optional): False runs RMSNorm/RoPE/SwiGLU/cross-entropy in PyTorch inside the
            fused LoRA functions (debugging; any device with ``kernels="on"``). Default: Triton
            where it can run.
        fused_loss (bool): compute the training loss with the fused linear cross-entropy
            (``logits`` is then None in training outputs). Default: True.
        mlp_recompute (bool, Optional): recompute gate/up in the MLP backward (saves
            ``2 * intermediate_size`` activations per token); None: only in layers that gradient
            checkpointing does not replay.
        layer_checkpoint (bool | str): run each decoder layer as one self-checkpointing autograd
            Function (:mod:`petl.kernels.lora_layer`: the forward records no graph and saves only
            the layer input; the backward recomputes the layer and calls each op's backward
            directly). ``"auto"``: when the model trains with gradient checkpointing (it then
            replaces transformers' per-layer ``torch.utils.checkpoint``); True: whenever training
            with gradients; False: the per-module fused path. Default: ``"auto"``.

    Returns:
        ``model``, modified in place (undo with :func:`unfuse_lora`).

    Example:
        >>> model = fuse_lora(get_peft_model(model, LoraConfig(r=16, target_modules="all-linear")))
    """
    if kernels not in (None,) + KERNEL_MODES:
        raise ValueError(f"fuse_lora: kernels={kernels!r} is not a kernel mode; use one of {KERNEL_MODES}")
    if not any(layer_checkpoint is m for m in LAYER_CHECKPOINT_MODES):
        raise ValueError(f"fuse_lora: layer_checkpoint={layer_checkpoint!r} is not one of True, False, 'auto'")
    base = _base_model(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(f"fuse_lora supports {', '.join(SUPPORTED)} models, not {model_type!r}; "
                         "train it with train.kernels=off (peft's unfused path)")
    if getattr(base, _STATE, None) is not None:
        unfuse_lora(model)
    module_path, *names = SUPPORTED[model_type]
    classes = [getattr(importlib.import_module(module_path), n) for n in names]
    mixins = dict(zip(classes, (FusedAttention, FusedSwiGLUMLP, FusedRMSNorm, FusedDecoderLayer)))
    swaps = [(name, m) for name, m in base.named_modules() if type(m) in mixins and "forward" not in m.__dict__]
    for name, module in swaps:
        new = _rebuild(module, _fused_class(type(module), mixins[type(module)]))
        new._petl_kernels, new._petl_triton = kernels, triton
        if isinstance(new, FusedSwiGLUMLP):
            new._petl_recompute = mlp_recompute
        if isinstance(new, FusedDecoderLayer):
            new._petl_layer_checkpoint = layer_checkpoint
            new.__dict__["_petl_gc"] = bool(new.__dict__.pop("gradient_checkpointing", False))
        _swap(base, name, new)
    owners = {id(child): parent for parent in base.modules() for child in parent.children()}  # after the swaps
    for module in base.modules():
        if isinstance(module, FusedSwiGLUMLP):
            owner = owners.get(id(module))
            module._petl_owner = weakref.ref(owner) if owner is not None else None
    hooks = _install_loss_hooks(model, base, kernels, triton) if fused_loss else []
    setattr(base, _STATE, {"modules": [n for n, _ in swaps], "hooks": hooks})
    return model


def unfuse_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`fuse_lora`: original module classes back, loss hooks removed."""
    base = _base_model(model)
    state = getattr(base, _STATE, None)
    if state is None:
        return model
    for name in state["modules"]:
        module = base.get_submodule(name)
        if hasattr(type(module), "_petl_base"):
            old = _rebuild(module, type(module)._petl_base)
            if isinstance(module, FusedDecoderLayer):
                old.__dict__.pop("_petl_gc", None)
                old.__dict__["gradient_checkpointing"] = module._petl_gc
            _swap(base, name, old)
    for handle in state["hooks"]:
        handle.remove()
    delattr(base, _STATE)
    return model


def is_fused(model: nn.Module) -> bool:
    """True when :func:`fuse_lora` has been applied to ``model`` (and not undone)."""
    return getattr(_base_model(model), _STATE, None) is not None


class _LossCall:
    """State of one training forward between the hooks (labels in, hidden states captured)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.labels = self.shift_labels = self.num_items = self.hidden = None
        self.use_triton = True


class _TakeLabels:
    """Top-level pre-hook: a training call with labels (and a fusable head) keeps its labels here
    instead of passing them on, so transformers computes no logits-based loss."""

    def __init__(self, call: _LossCall, head: nn.Linear, kernels: Optional[str], triton: Optional[bool]) -> None:
        self.call, self.head, self.kernels, self.triton = call, head, kernels, triton

    def __call__(self, module, args, kwargs):
        call = self.call
        call.reset()
        labels = kwargs.get("labels")
        if (labels is None or not module.training or not torch.is_grad_enabled() or kwargs.get("return_dict") is False
                or kwargs.get("logits_to_keep") not in (None, 0)):
            return None
        fused, use_triton = kernel_plan(self.head.weight.device, self.kernels, self.triton)
        if not fused:
            return None
        kwargs = dict(kwargs)
        call.labels = kwargs.pop("labels")
        call.shift_labels = kwargs.pop("shift_labels", None)
        call.num_items = kwargs.get("num_items_in_batch")
        call.use_triton = use_triton
        return args, kwargs


class _KeepHidden:
    """lm_head pre-hook: keep the hidden states and let the head produce zero-length logits."""

    def __init__(self, call: _LossCall) -> None:
        self.call = call

    def __call__(self, module, args):
        call = self.call
        if call.labels is None or call.hidden is not None or len(args) != 1:
            return None
        call.hidden = args[0]
        return (args[0][..., :0, :],)  # zero-length logits; the loss is computed from the hidden states


class _FusedLoss:
    """Top-level post-hook: the fused linear cross-entropy from the kept hidden states and labels."""

    def __init__(self, call: _LossCall, head: nn.Linear) -> None:
        self.call, self.head = call, head

    def __call__(self, module, args, kwargs, output):
        call = self.call
        if call.labels is None:
            return None
        hidden, labels, shift, num_items, use_triton = (call.hidden, call.labels, call.shift_labels, call.num_items,
                                                        call.use_triton)
        call.reset()
        if hidden is None:
            raise RuntimeError("petl fused loss: the model's lm_head was not called; "
                               "use fuse_lora(..., fused_loss=False)")
        loss = causal_lm_loss(hidden, self.head.weight, labels, shift_labels=shift, num_items_in_batch=num_items,
                              ignore_index=IGNORE_INDEX, use_triton=use_triton)
        fields: dict[str, Any] = {k: v for k, v in output.items() if k not in ("loss", "logits")}
        return type(output)(loss=loss, logits=None, **fields)


def _install_loss_hooks(top: nn.Module, base: nn.Module, kernels: Optional[str], triton: Optional[bool]) -> list:
    """The three loss hooks (objects, not closures: a fused model pickles and deep-copies whole)."""
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.bias is not None or getattr(base.config, "final_logit_softcapping", None):
        return []  # a wrapped (peft) or biased head keeps transformers' loss
    call = _LossCall()
    return [top.register_forward_pre_hook(_TakeLabels(call, head, kernels, triton), with_kwargs=True),
            head.register_forward_pre_hook(_KeepHidden(call)),
            top.register_forward_hook(_FusedLoss(call, head), with_kwargs=True)]
