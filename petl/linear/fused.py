"""LAWCAT's fused prefill/training path: petl's Triton kernels around a GLA core.

The PyTorch path (attention.py) spends most of its time outside the GLA core: the conv, the
Hedgehog feature map and the gate run as about thirty float32 elementwise passes, and the ones
column makes the core's value width d + 1 (fla pads it to d + 16). The fused path computes

1. ``phi_q, phi_k`` with :func:`~petl.linear.kernel_features.conv_feature_map` (one pass each);
2. the gate logits with the gate's two small Linear layers (``GlaGate.logits``);
3. the float32 log gate g and the normaliser ``den_t = phi_q_t . z_t`` with
   :func:`~petl.linear.kernel_normaliser.gate_normaliser`, chunk-parallel: per-chunk summaries
   (reads phi_k and the logits, writes g), a short scan over the chunk states, then den (reads
   phi_q, phi_k and the logits);
4. the numerator over v alone (V = d) with the GLA core: fla's ``chunk_gla`` or petl's chunked
   PyTorch form;
5. ``o = num / (den + eps)`` with :func:`~petl.linear.kernel_normaliser.normalise`.

When no gradient is needed (``torch.is_grad_enabled()`` is False, or nothing requires grad:
generation's prefill, evaluation), steps 3-5 run instead as petl's two forward-only kernels
(:func:`~petl.linear.kernel_prefill.lawcat_prefill`: chunk states, then gate, scores, normaliser
and division per chunk), for feature/head widths in ``kernel_prefill.SUPPORTED_DIMS``; training
keeps the path above.

It computes the same function as the PyTorch path (tests/test_lawcat_kernels.py checks outputs,
gradients and cache continuation against it). Dispatch (:func:`use_fused`): no sliding window,
a ``fla`` or ``chunked`` core, a bf16/fp16/fp32 model, more than one new token, and petl's
kernel switch on for the device (``LawcatConfig.kernels`` > ``PETL_KERNELS`` > auto = CUDA with
Triton).
"""
from __future__ import annotations

import torch

from ..kernels.switch import use_kernels
from .chunked import chunked_gla

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: float32 runs only in the CPU interpreter: on CUDA the float32 feature-map backward's tiles need
#: about 364 KB of shared memory, more than an H100/H200 multiprocessor has (GPU-tested: bf16/fp16)
_CUDA_DTYPES = (torch.bfloat16, torch.float16)


def use_fused(config, device: torch.device, dtype: torch.dtype, core: str, num_tokens: int) -> bool:
    """Whether a LAWCAT forward with these settings runs the fused Triton path."""
    dtypes = _CUDA_DTYPES if device.type == "cuda" else _DTYPES
    if config.window_size > 0 or core not in ("fla", "chunked") or dtype not in dtypes or num_tokens < 2:
        return False
    return use_kernels(device, config.kernels)


def _new_conv_state(x: torch.Tensor, state: torch.Tensor | None, K: int) -> torch.Tensor:
    """The last K-1 inputs ``[B, C, K-1]`` after appending ``x [B, T, C]`` to ``state``."""
    B, T, C = x.shape
    tail = x[:, -(K - 1):].transpose(1, 2) if K > 1 else x[:, :0].transpose(1, 2)
    if T >= K - 1:
        return tail.contiguous()
    prev = state.to(x.dtype) if state is not None else x.new_zeros(B, C, K - 1)
    return torch.cat([prev, tail], dim=-1)[..., -(K - 1):].contiguous()


def fused_attend(layer, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 valid: torch.Tensor | None, layer_cache, core: str, blocks: dict | None = None
                 ) -> torch.Tensor:
    """Normalised LAWCAT attention of ``layer`` (a LawcatAttention) on projected q/k/v.

    Args:
        x (torch.Tensor): hidden states ``[B, T, hidden]`` (the gate's input).
        q (torch.Tensor): ``[B, T, H, d]``; k, v ``[B, T, H_kv, d]``.
        valid (torch.Tensor, Optional): ``[B, T]`` bool, False at padding.
        layer_cache (LawcatCacheLayer, Optional): continued and updated in place.
        core (str): ``"fla"`` or ``"chunked"``.
        blocks (dict, Optional): launch-table overrides (tests, benchmark sweeps): the keys of
            :func:`~petl.linear.kernel_features.conv_feature_map`'s ``blocks``, ``norm`` /
            ``norm_f`` for :func:`~petl.linear.kernel_normaliser.gate_normaliser`'s chunk and
            feature block, ``prefill`` (False: never the prefill kernels, e.g. to time the fla
            path) and ``prefill_<key>`` for :func:`~petl.linear.kernel_prefill.lawcat_prefill`'s
            ``blocks``.

    Returns:
        ``[B, T, H, d]`` in x's dtype.
    """
    from .fla_backend import fla_chunk_gla
    from .kernel_features import conv_feature_map
    from .kernel_normaliser import gate_normaliser, normalise
    from .kernel_prefill import lawcat_prefill, prefill_supported

    cfg = layer.lawcat_config
    blocks = blocks or {}
    B, T, H, d = q.shape
    G = layer.num_key_value_groups
    prefill = (blocks.get("prefill", True) and prefill_supported(layer.feature_size, d, q.dtype)
               and not _needs_grad(layer, x, q, k, v))
    k_rep = k.repeat_interleave(G, dim=2) if G > 1 else k
    if valid is not None:  # where, not multiply: padded rows may hold NaN (eager softmax)
        m = valid[:, :, None, None]
        q, k_rep = (torch.where(m, t, torch.zeros_like(t)) for t in (q, k_rep))
    conv = layer_cache.conv_states if layer_cache is not None else {}
    xq, xk = q.reshape(B, T, H * d), k_rep.reshape(B, T, H * d)
    fm_q = layer.lawcat_feature_map_q
    fm_k = layer.lawcat_feature_map_k or fm_q
    phi_q = conv_feature_map(xq, layer.lawcat_conv_q.weight, fm_q.weight, conv.get("q"), None, blocks)
    phi_k = conv_feature_map(xk, layer.lawcat_conv_k.weight, fm_k.weight, conv.get("k"), valid, blocks)
    logits = layer.lawcat_gate.logits(x)                                     # [B, T, H_kv, 2f]
    state0 = layer_cache.recurrent_state if layer_cache is not None else None
    S0, z0 = (state0[..., :d], state0[..., d]) if state0 is not None else (None, None)
    if prefill:  # the kernel drops padded values and reads kv head h // G itself
        o, S, zT = lawcat_prefill(phi_q, phi_k, v, logits, layer.lawcat_gate.normalizer, valid,
                                  (S0, z0) if state0 is not None else None, cfg.eps,
                                  layer_cache is not None, x.dtype,
                                  {key[8:]: val for key, val in blocks.items() if key.startswith("prefill_")})
        _update_cache(layer_cache, cfg.conv_size, T, xq, xk, conv, S, zT)
        return o
    v_rep = v.repeat_interleave(G, dim=2) if G > 1 else v
    if valid is not None:
        v_rep = torch.where(valid[:, :, None, None], v_rep, torch.zeros_like(v_rep))
    g, den, zT = gate_normaliser(logits, phi_q, phi_k, z0, layer.lawcat_gate.normalizer, valid,
                                 **{arg: blocks[key] for key, arg in (("norm", "block_t"), ("norm_f", "block_f"))
                                    if key in blocks})
    if core == "fla":
        num, S = fla_chunk_gla(phi_q, phi_k, v_rep, g, S0, output_final_state=layer_cache is not None)
    else:
        num, S = chunked_gla(phi_q, phi_k, v_rep, g, S0, chunk_size=cfg.chunk_size)
    o = normalise(num, den, cfg.eps, x.dtype)
    _update_cache(layer_cache, cfg.conv_size, T, xq, xk, conv, S, zT)
    return o


def _needs_grad(layer, *inputs: torch.Tensor) -> bool:
    """Whether this forward records a graph (an input or a LAWCAT parameter requires grad)."""
    if not torch.is_grad_enabled():
        return False
    return any(t.requires_grad for t in inputs) or any(
        p.requires_grad for n, p in layer.named_parameters() if n.startswith("lawcat_"))


def _update_cache(layer_cache, K: int, T: int, xq: torch.Tensor, xk: torch.Tensor, conv: dict,
                  S: torch.Tensor, zT: torch.Tensor) -> None:
    """Write the conv tails and the ``[B, H, F, V + 1]`` recurrent state (S with z as last column)."""
    if layer_cache is None:
        return
    layer_cache.update_state(T, {"q": _new_conv_state(xq, conv.get("q"), K),
                                 "k": _new_conv_state(xk, conv.get("k"), K)},
                             torch.cat([S.float(), zT[..., None]], dim=-1), {})
