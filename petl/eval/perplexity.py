"""Perplexity of a causal LM by context length, in the sliding or the LongLoRA protocol.

Why two protocols: papers on context extension (LongLoRA, SinkLoRA, PI, YaRN) report numbers from
LongLoRA's eval.py, which averages per-window losses over overlapping windows and scores every token
of a window, including its first ones that see almost no context. The standard strided protocol
(Press et al.; the transformers guide) scores each token once with at least ``length - stride``
tokens of context. The second is the better measure of long-context modelling; the first is what
reproduces published tables. They give different numbers on the same model and data; see
docs/evaluation.md.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from petl.eval._runtime import base_model, inference_mode, input_device, progress_bar
from petl.eval.windows import LONGLORA_STRIDE, Window, longlora_windows, sliding_windows

Mode = Literal["sliding", "longlora"]

#: Positions per log-softmax chunk: bounds the upcast copy of the logits to chunk x vocab floats.
NLL_CHUNK = 2048


def perplexity(model: torch.nn.Module, token_ids: Any, *, lengths: Sequence[int],
               mode: Mode = "sliding", stride: int | None = None, batch_size: int = 1,
               max_windows: int | None = None, progress: bool = True,
               full_attention: bool = True) -> dict[int, dict[str, Any]]:
    """Perplexity at each context length in ``lengths``.

    Args:
        model (nn.Module): a transformers causal LM or a peft ``PeftModel`` (anything whose
            ``forward(input_ids=[B, T])`` returns ``.logits`` of shape ``[B, T, V]``). Run in eval
            mode under ``torch.no_grad`` on its own device and dtype; its state is restored after.
        token_ids: one long text as a 1-D LongTensor / array / list of ints ``[N]``, or several
            documents (a list of those, or a 2-D tensor ``[D, N]``). Windows never cross documents.
        lengths (list[int]): window lengths (tokens) to evaluate.
        mode (str): ``"sliding"`` (stride windows, score new tokens only, token-weighted mean NLL)
            or ``"longlora"`` (LongLoRA eval.py: every token of each window, mean of per-window
            losses). Default: ``"sliding"``.
        stride (int, Optional): window advance. Default: ``length // 2`` for sliding, 256 (eval.py's
            ``sliding_window``) for longlora.
        batch_size (int): windows per forward pass; windows of equal length are batched together.
            The result does not depend on it (up to floating-point summation order). Default: 1.
        max_windows (int, Optional): evaluate only the first ``max_windows`` windows per length.
        progress (bool): show a tqdm bar per length. Default: True.
        full_attention (bool): switch a training-time attention pattern (S2/SF) to SDPA for the
            call. Default: True.

    Returns:
        ``{length: {"ppl", "nll", "windows", "tokens", "documents", "skipped_documents", "mode",
        "stride"}}``; ``nll`` is in nats, ``tokens`` counts scored tokens (with multiplicity in
        longlora mode), documents shorter than ``length`` tokens are skipped.
    """
    docs = as_documents(token_ids)
    _validate(lengths, mode, stride, batch_size, max_windows)
    device = input_device(model)
    keep_ok = _accepts_logits_to_keep(model)
    results: dict[int, dict[str, Any]] = {}
    with inference_mode(model, full=full_attention):
        for length in lengths:
            step = stride if stride is not None else (length // 2 if mode == "sliding"
                                                       else LONGLORA_STRIDE)
            if mode == "sliding" and not 1 <= step <= length:
                raise ValueError(f"sliding stride must be in [1, length={length}], got {step}")
            windows, used, skipped = _plan(docs, length, step, mode, max_windows)
            if not windows:
                need = length + step + 1 if mode == "longlora" else length
                raise ValueError(
                    f"no {mode} window of length {length} fits the data (longest document: "
                    f"{max(len(d) for d in docs)} tokens; {mode} mode needs >= {need}); "
                    "pass shorter lengths or more text")
            sums, counts = _score(model, docs, windows, batch_size, device, keep_ok,
                                  desc=f"ppl@{length}", progress=progress)
            results[length] = _summarise(sums, counts, mode, step, used, skipped)
    return results


def as_documents(token_ids: Any) -> list[torch.Tensor]:
    """Normalise the accepted inputs to a list of 1-D int64 CPU tensors (one per document)."""
    if isinstance(token_ids, torch.Tensor) or hasattr(token_ids, "__array__"):
        t = _tensor(token_ids)
        if t.dim() == 1:
            docs = [t]
        elif t.dim() == 2:
            docs = list(t)
        else:
            raise ValueError(f"token_ids must be 1-D [N] or 2-D [D, N], got shape {tuple(t.shape)}")
    elif isinstance(token_ids, (list, tuple)) and token_ids and isinstance(token_ids[0], int):
        docs = [_tensor(token_ids)]
    elif isinstance(token_ids, (list, tuple)) and token_ids:
        docs = [_tensor(d) for d in token_ids]
    else:
        raise ValueError("token_ids must be a 1-D token tensor or a non-empty list of documents; "
                         "use petl.eval.load_eval_tokens(path, tokenizer) to make one")
    out = []
    for d in docs:
        if d.dim() != 1 or d.is_floating_point() or d.is_complex():
            raise ValueError(f"each document must be a 1-D integer tensor, got {d.dtype} "
                             f"{tuple(d.shape)}")
        out.append(d.to(device="cpu", dtype=torch.long))
    return out


def _tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    arr = np.asarray(x)
    # Copy integer arrays to int64: memmaps are read-only and uint16 is LongLoRA's storage type.
    if arr.dtype.kind in "iu":
        return torch.from_numpy(arr.astype(np.int64))
    return torch.as_tensor(arr)


def _validate(lengths: Sequence[int], mode: str, stride: int | None, batch_size: int,
              max_windows: int | None) -> None:
    if mode not in ("sliding", "longlora"):
        raise ValueError(f"mode must be 'sliding' or 'longlora', got {mode!r}")
    if not lengths or any(int(n) != n or n < 2 for n in lengths):
        raise ValueError(f"lengths must be a non-empty list of ints >= 2, got {list(lengths)}")
    if stride is not None and stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 (or None for all), got {max_windows}")


def _plan(docs: list[torch.Tensor], length: int, step: int, mode: str,
          max_windows: int | None) -> tuple[list[tuple[int, Window]], int, int]:
    """All (document index, window) pairs in order, capped at ``max_windows``."""
    planned: list[tuple[int, Window]] = []
    used = skipped = 0
    for i, doc in enumerate(docs):
        n = len(doc)
        if n < length:
            skipped += 1
            continue
        ws = sliding_windows(n, length, step) if mode == "sliding" else longlora_windows(
            n, length, step)
        if not ws:
            skipped += 1
            continue
        used += 1
        planned.extend((i, w) for w in ws)
        if max_windows is not None and len(planned) >= max_windows:
            return planned[:max_windows], used, skipped
    return planned, used, skipped


def _score(model: torch.nn.Module, docs: list[torch.Tensor], windows: list[tuple[int, Window]],
           batch_size: int, device: torch.device, keep_ok: bool, desc: str,
           progress: bool) -> tuple[list[float], list[int]]:
    """Per-window NLL sums (float64) and scored-token counts, in window order."""
    sums = [0.0] * len(windows)
    counts = [0] * len(windows)
    by_len: dict[int, list[int]] = {}
    for k, (_, (b, e, _)) in enumerate(windows):
        by_len.setdefault(e - b, []).append(k)
    bar = progress_bar(len(windows), desc, progress)
    try:
        for idxs in by_len.values():
            for s in range(0, len(idxs), batch_size):
                chunk = idxs[s:s + batch_size]
                ids = torch.stack([docs[windows[k][0]][windows[k][1][0]:windows[k][1][1]]
                                   for k in chunk]).to(device)  # [B, T]
                rel = [windows[k][1][2] - windows[k][1][0] for k in chunk]
                for k, (total, n) in zip(chunk, _window_nll(model, ids, rel, keep_ok)):
                    sums[k], counts[k] = total, n
                bar.update(len(chunk))
    finally:
        bar.close()
    return sums, counts


def _window_nll(model: torch.nn.Module, ids: torch.Tensor, score_from: list[int],
                keep_ok: bool) -> list[tuple[float, int]]:
    """NLL sum and count of tokens ``ids[b, score_from[b]:]`` for each row of ``ids`` [B, T]."""
    T = ids.shape[1]
    keep = T - min(score_from) + 1  # logits at positions score_from-1 .. T-1
    kwargs = {"logits_to_keep": keep} if keep_ok and keep < T else {}
    logits = model(input_ids=ids, use_cache=False, **kwargs).logits  # [B, K, V]
    K = logits.shape[1]
    targets = ids[:, T - K + 1:]  # [B, K-1]; logits[:, j] predicts position T-K+1+j
    dtype = torch.promote_types(logits.dtype, torch.float32)  # fp16/bf16 -> fp32; fp64 stays
    nll = torch.empty(targets.shape, dtype=dtype, device=logits.device)
    for s in range(0, K - 1, NLL_CHUNK):
        lg = logits[:, s:min(s + NLL_CHUNK, K - 1)].to(dtype)  # [B, c, V]
        nll[:, s:s + lg.shape[1]] = F.cross_entropy(
            lg.reshape(-1, lg.shape[-1]), targets[:, s:s + lg.shape[1]].reshape(-1),
            reduction="none").view(lg.shape[0], -1)
    positions = torch.arange(T - K + 1, T, device=nll.device)  # [K-1]
    start = torch.tensor(score_from, device=nll.device)[:, None]  # [B, 1]
    mask = positions[None, :] >= start  # [B, K-1]
    totals = (nll.double() * mask).sum(dim=1).tolist()
    return [(t, T - s) for t, s in zip(totals, score_from)]


def _summarise(sums: list[float], counts: list[int], mode: str, step: int, used: int,
               skipped: int) -> dict[str, Any]:
    tokens = sum(counts)
    if mode == "sliding":
        nll = math.fsum(sums) / tokens  # token-weighted mean
    else:
        nll = math.fsum(s / c for s, c in zip(sums, counts)) / len(sums)  # mean of window means
    return {"ppl": math.exp(nll), "nll": nll, "windows": len(sums), "tokens": tokens,
            "documents": used, "skipped_documents": skipped, "mode": mode, "stride": step}


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the underlying transformers model can return only the last K positions' logits."""
    try:
        return "logits_to_keep" in inspect.signature(base_model(model).forward).parameters
    except (TypeError, ValueError):
        return False
