"""Token-based AST adapters: prompt tuning (shallow / deep) and prefix tuning.

Neither is a change of weights, so neither merges. Both insert their tokens right after CLS, as
the reference code does (a VPT-style layout): prompts *replace* the distillation token,
``[CLS, P_1..P_N, patches]``; prefixes are extra keys and values ``[k_CLS, K_1..K_M, k_rest]``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .layer import AudioAdapterLayer


class PromptLayer(nn.Module, AudioAdapterLayer):
    """Prompts at the input of one AST layer (``ASTLayer``, hidden states ``[B, S, D]``).

    Layer 0 (``insert=True``) swaps the distillation token for the N prompts; with ``deep=True``
    every later layer overwrites positions 1..N with its own fresh prompts (VPT-deep).
    """

    adapter_layer_names = ("audio_adapter_prompt",)
    other_param_names = ("audio_adapter_insert",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, prompts: torch.Tensor, insert: bool,
                 inference_mode: bool = False, **kwargs: Any) -> None:
        super().__init__()
        self._init_base(base_layer, **kwargs)
        self.audio_adapter_prompt = nn.ParameterDict({})
        self.audio_adapter_insert: dict[str, bool] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, prompts, insert, inference_mode)

    def update_layer(self, adapter_name: str, prompts: torch.Tensor, insert: bool,
                     inference_mode: bool = False) -> None:
        """Add ``prompts``: ``[N, D]``; ``insert`` marks the first layer."""
        self.audio_adapter_prompt[adapter_name] = nn.Parameter(prompts)
        self.audio_adapter_insert[adapter_name] = insert
        self._place_adapter(adapter_name, inference_mode)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        names = self._active(self.audio_adapter_prompt)
        if len(names) > 1:
            raise ValueError(f"prompt adapters {names} are active together; their prompts would occupy the same "
                             "positions: activate one at a time")
        if names:
            name = names[0]
            prompts = self.audio_adapter_prompt[name].to(hidden_states.dtype)  # [N, D]
            prompts = prompts.unsqueeze(0).expand(hidden_states.shape[0], -1, -1)
            skip = 2 if self.audio_adapter_insert[name] else 1 + prompts.shape[1]
            hidden_states = torch.cat([hidden_states[:, :1], prompts, hidden_states[:, skip:]], dim=1)
        return self.base_layer(hidden_states, *args, **kwargs)

    def __repr__(self) -> str:
        return "audio_adapter." + super().__repr__()


def _eager_attention() -> Callable:
    from transformers.models.audio_spectrogram_transformer import modeling_audio_spectrogram_transformer as ast

    return ast.eager_attention_forward


class PrefixAttention(nn.Module, AudioAdapterLayer):
    """Prefix tuning of an ``ASTAttention``: M learned keys and M learned values per layer.

    The prefixes live in the projected space (they bypass W_k and W_v; no reparameterisation MLP)
    and are inserted after the CLS key/value, so every query attends to ``S + M`` keys. The
    attention itself is whatever ``config._attn_implementation`` selects (sdpa, eager, ...), called
    through transformers' AttentionInterface with the wrapped module, so its projections, scaling
    and dropout are the base layer's own.
    """

    adapter_layer_names = ("audio_adapter_prefix_key", "audio_adapter_prefix_value")

    def __init__(self, base_layer: nn.Module, adapter_name: str, keys: torch.Tensor, values: torch.Tensor,
                 inference_mode: bool = False, **kwargs: Any) -> None:
        super().__init__()
        self._init_base(base_layer, **kwargs)
        self.audio_adapter_prefix_key = nn.ParameterDict({})
        self.audio_adapter_prefix_value = nn.ParameterDict({})
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, keys, values, inference_mode)

    def update_layer(self, adapter_name: str, keys: torch.Tensor, values: torch.Tensor,
                     inference_mode: bool = False) -> None:
        """Add prefixes ``keys``, ``values``: ``[M, D]`` each."""
        self.audio_adapter_prefix_key[adapter_name] = nn.Parameter(keys)
        self.audio_adapter_prefix_value[adapter_name] = nn.Parameter(values)
        self._place_adapter(adapter_name, inference_mode)

    def _heads(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        # [B, L, D] -> [B, H, L, hd]
        return x.view(batch, x.shape[1], -1, self.base_layer.head_dim).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, Any]:
        names = self._active(self.audio_adapter_prefix_key)
        if not names:
            return self.base_layer(hidden_states, attention_mask, **kwargs)
        attn = self.base_layer
        batch, seq, _ = hidden_states.shape
        dtype = hidden_states.dtype
        pk = torch.cat([self.audio_adapter_prefix_key[n] for n in names]).to(dtype)  # [M, D]
        pv = torch.cat([self.audio_adapter_prefix_value[n] for n in names]).to(dtype)
        q = self._heads(attn.q_proj(hidden_states), batch)  # [B, H, S, hd]
        k = attn.k_proj(hidden_states)  # [B, S, D]
        v = attn.v_proj(hidden_states)
        k = torch.cat([k[:, :1], pk.expand(batch, -1, -1), k[:, 1:]], dim=1)  # [B, S+M, D]
        v = torch.cat([v[:, :1], pv.expand(batch, -1, -1), v[:, 1:]], dim=1)
        k, v = self._heads(k, batch), self._heads(v, batch)
        if attention_mask is not None:  # open the prefix columns for every query
            attention_mask = _extend_mask(attention_mask, pk.shape[0])
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, _eager_attention())
        out, weights = interface(attn, q, k, v, attention_mask,
                                 dropout=0.0 if not attn.training else attn.attention_dropout,
                                 scaling=attn.scaling, **kwargs)
        out = out.reshape(batch, seq, -1).contiguous()  # [B, S, H*hd]
        return attn.o_proj(out), weights

    def __repr__(self) -> str:
        return "audio_adapter." + super().__repr__()


def _extend_mask(mask: torch.Tensor, extra: int) -> torch.Tensor:
    """Insert ``extra`` always-visible key columns after column 0 of a ``[B, 1, S, S]`` mask."""
    if mask.dtype == torch.bool:
        fill = torch.ones(*mask.shape[:-1], extra, dtype=torch.bool, device=mask.device)
    else:  # additive float mask: 0 keeps a key visible
        fill = torch.zeros(*mask.shape[:-1], extra, dtype=mask.dtype, device=mask.device)
    return torch.cat([mask[..., :1], fill, mask[..., 1:]], dim=-1)
