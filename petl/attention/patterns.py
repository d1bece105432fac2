"""Training-time attention patterns (S2 and SF) as rules, in one place.

Every backend (dense reference, FlexAttention, varlen) derives its mask from :func:`make_mask_mod`,
so the meaning of a pattern is written once. The rules, for sample ``b``, query head ``h``,
query row ``q`` and key column ``k`` (``p = index - start[b]`` is the position inside the
sample's valid span of length ``n[b]``; ``G = group[b]``, even):

* **unshifted heads** (``h < h0``): segment ``p // G``.
* **shifted heads, non-cyclic** (default, LongLoRA's varlen path and SinkLoRA's S&R):
  segment ``(p + G/2) // G``, i.e. spans ``[0,G/2), [G/2,3G/2), ...`` with no wrap-around.
* **shifted heads, cyclic** (LongLoRA's ``roll`` path, for paper parity): rolled coordinate
  ``r = (p - G/2) mod N`` with ``N = ceil(n/G)*G`` (the span padded internally to whole groups);
  segment ``r // G`` and causality is tested on ``r``, which lets the first G/2 tokens see the
  last ones (the known leak).
* a key is allowed iff it is in the query's segment and not after it (in ``r`` when cyclic),
  **or** it is a sink (one of the first ``n_sink`` tokens of the query's document) not after the
  query, **or** ``sink_bidirectional`` is set and the query itself is a sink;
* and always: both tokens lie in the valid span and in the same document (packed rows).

``h0 = floor(H * (1 - shift_head_fraction))``: the last heads are shifted, as in LongLoRA where
heads ``[H//2, H)`` are rolled. GQA: the pattern is defined per *query* head and query head ``h``
reads key/value head ``h // (Hq / Hkv)``. That is exactly LongLoRA's "repeat_kv before the split"
semantics, computed without copying K/V (a KV head shared by both halves serves each query head
with that head's own mask).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from petl.attention.layout import SequenceLayout

PATTERNS = ("s2", "sf")
BACKENDS = ("auto", "reference", "flex", "varlen", "grouped", "triton")

#: mask_mod(b, h, q_idx, kv_idx) -> bool tensor; works on broadcast index tensors and in Flex.
MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PatternConfig:
    """Parameters of one training-time attention pattern.

    Args:
        pattern (str): ``"s2"`` (LongLoRA shifted sparse attention) or ``"sf"`` (SinkLoRA sink
            fixed attention: non-cyclic shift + sink tokens).
        group_ratio (float): group size as a fraction of each sample's valid length,
            ``G = int(n * group_ratio)`` rounded down to an even number (at least 2).
            Default: 0.25.
        group_size (int, Optional): fixed even group size; overrides ``group_ratio`` (LongLoRA's
            ``sft_group_size``). Default: None.
        cyclic (bool): S2 only; LongLoRA's roll semantics (leaks G/2 future tokens into the first
            group of the shifted heads). Default: False.
        shift_head_fraction (float): fraction of heads (the last ones) that use shifted
            segments. Default: 0.5.
        n_sink (int): SF only; the first ``n_sink`` tokens of every document are keys every later
            query may attend to. Default: 4 for ``sf``, 0 for ``s2``.
        sink_bidirectional (bool): SF only; sink queries also attend to every later token of
            their document (paper-faithful, but leaks the future; warns). Default: False.
        backend (str): ``"auto"`` (on CUDA the fastest backend that supports the call, the
            reference elsewhere; ``PETL_ATTENTION_BACKEND`` / ``PETL_KERNELS`` override it),
            ``"reference"``, ``"grouped"``, ``"triton"``, ``"flex"`` or ``"varlen"`` (see
            :mod:`petl.attention.dispatch`). Default: ``"auto"``.
    """

    pattern: str = "s2"
    group_ratio: float = 0.25
    group_size: int | None = None
    cyclic: bool = False
    shift_head_fraction: float = 0.5
    n_sink: int = 0
    sink_bidirectional: bool = False
    backend: str = "auto"

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def from_params(cls, pattern: str, **params: Any) -> "PatternConfig":
        """Build from user parameters, filling pattern defaults (``n_sink=4`` for ``sf``)."""
        if pattern not in PATTERNS:
            raise ValueError(f"unknown attention pattern {pattern!r}; choose one of {PATTERNS} (or 'full')")
        names = {f.name for f in fields(cls)} - {"pattern"}
        unknown = sorted(set(params) - names)
        if unknown:
            raise ValueError(f"unknown {pattern} attention parameter(s) {unknown}; valid: {sorted(names)}")
        if pattern == "sf":
            params.setdefault("n_sink", 4)
        return cls(pattern=pattern, **params)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (stored on ``model.config.petl_attention``)."""
        return asdict(self)

    def shifted_from(self, num_heads: int) -> int:
        """First shifted query head ``h0``: heads ``[h0, num_heads)`` use shifted segments."""
        return int(math.floor(num_heads * (1.0 - self.shift_head_fraction) + 1e-9))

    def group_for_length(self, n: torch.Tensor) -> torch.Tensor:
        """Per-sample even group size for valid lengths ``n`` (int tensor ``[B]``)."""
        if self.group_size is not None:
            return torch.full_like(n, self.group_size)
        g = torch.floor(n.to(torch.float64) * self.group_ratio).to(n.dtype)
        return torch.clamp(g - g % 2, min=2)


def _validate(cfg: PatternConfig) -> None:
    """One-line errors naming the bad parameter and the fix."""
    if cfg.pattern not in PATTERNS:
        raise ValueError(f"unknown attention pattern {cfg.pattern!r}; choose one of {PATTERNS}")
    if not isinstance(cfg.group_ratio, (int, float)) or not 0 < cfg.group_ratio <= 1:
        raise ValueError(f"group_ratio must be a number in (0, 1], got {cfg.group_ratio!r}")
    if cfg.group_size is not None and (not isinstance(cfg.group_size, int) or isinstance(cfg.group_size, bool)
                                       or cfg.group_size < 2 or cfg.group_size % 2):
        raise ValueError(f"group_size must be an even int >= 2 (the shift is group_size/2), got {cfg.group_size!r}")
    if not isinstance(cfg.shift_head_fraction, (int, float)) or not 0 <= cfg.shift_head_fraction <= 1:
        raise ValueError(f"shift_head_fraction must be in [0, 1], got {cfg.shift_head_fraction!r}")
    for name in ("cyclic", "sink_bidirectional"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(cfg, name)!r}")
    if not isinstance(cfg.n_sink, int) or isinstance(cfg.n_sink, bool) or cfg.n_sink < 0:
        raise ValueError(f"n_sink must be an int >= 0, got {cfg.n_sink!r}")
    if cfg.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {cfg.backend!r}")
    if cfg.pattern == "s2" and (cfg.n_sink or cfg.sink_bidirectional):
        raise ValueError("sink tokens belong to the 'sf' pattern; use pattern='sf' (n_sink=..., sink_bidirectional=...)")
    if cfg.pattern == "sf" and cfg.cyclic:
        raise ValueError("SF-Attn is non-cyclic by definition (S&R removes the wrap); use pattern='s2' with cyclic=True")
    if cfg.sink_bidirectional and cfg.n_sink == 0:
        raise ValueError("sink_bidirectional=True needs n_sink > 0")
    if cfg.sink_bidirectional:
        warnings.warn("sink_bidirectional=True lets sink tokens attend to future tokens, which then reach every "
                      "position through the sinks in the next layer; inference is causal, so this trains on "
                      "information the model will not have", UserWarning, stacklevel=3)


def make_mask_mod(cfg: PatternConfig, num_heads: int, layout: "SequenceLayout") -> MaskMod:
    """Return ``mask_mod(b, h, q_idx, kv_idx) -> allowed`` for ``cfg`` over ``layout``.

    Index arguments are integer tensors that broadcast against each other (scalars inside
    FlexAttention, ``[B,1,1,1]``/``[1,H,1,1]``/``[1,1,Lq,1]``/``[1,1,1,Lk]`` for a dense mask).
    Layout tensors are padded so that indices up to a multiple of 128 stay in bounds.
    """
    h0 = cfg.shifted_from(num_heads)
    cyclic, n_sink, bidir = cfg.cyclic, cfg.n_sink, cfg.sink_bidirectional
    start, length, group, padded = layout.start, layout.length, layout.group, layout.padded
    doc, doc_pos, extra = layout.doc, layout.doc_pos, layout.extra

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        s, n, g = start[b], length[b], group[b]
        pq, pk = q - s, kv - s
        inside = (pq >= 0) & (pq < n) & (pk >= 0) & (pk < n)
        shifted = h >= h0
        half = g // 2
        if cyclic:
            npad = padded[b]
            rq = torch.where(shifted, (pq - half + npad) % npad, pq)
            rk = torch.where(shifted, (pk - half + npad) % npad, pk)
            allowed = (rq // g == rk // g) & (rk <= rq)
        else:
            off = torch.where(shifted, half, 0)
            allowed = ((pq + off) // g == (pk + off) // g) & (pk <= pq)
        if n_sink:
            k_in_doc = doc_pos[b, kv] if doc_pos is not None else pk
            allowed = allowed | ((k_in_doc < n_sink) & (pk <= pq))
            if bidir:
                q_in_doc = doc_pos[b, q] if doc_pos is not None else pq
                allowed = allowed | (q_in_doc < n_sink)
        allowed = allowed & inside
        if doc is not None:
            allowed = allowed & (doc[b, q] == doc[b, kv])
        if extra is not None:
            # the caller's mask is causal by construction: it only constrains keys not after the query
            allowed = allowed & ((kv > q) | extra[b, q, kv])
        return allowed

    return mask_mod


def head_classes(cfg: PatternConfig, num_heads: int) -> tuple[list[int], torch.Tensor]:
    """Heads come in at most two classes (unshifted, shifted) with identical masks.

    Returns one representative head index per present class and, for every head, the index of
    its class (``[H]`` long), so a mask is evaluated once per class and gathered per head.
    """
    h0 = cfg.shifted_from(num_heads)
    if 0 < h0 < num_heads:
        return [0, h0], (torch.arange(num_heads) >= h0).long()
    return [0], torch.zeros(num_heads, dtype=torch.long)  # all heads shifted (h0 == 0) or none


def dense_mask(cfg: PatternConfig, num_heads: int, layout: "SequenceLayout") -> torch.Tensor:
    """Materialise the pattern as a boolean mask ``[B, H, L, L]`` (True = may attend)."""
    device = layout.start.device
    reps, cls = head_classes(cfg, num_heads)
    idx = torch.arange(layout.seq_len, device=device)
    b = torch.arange(layout.batch, device=device)
    h = torch.tensor(reps, device=device)
    mask_mod = make_mask_mod(cfg, num_heads, layout)
    mask = mask_mod(b.view(-1, 1, 1, 1), h.view(1, -1, 1, 1), idx.view(1, 1, -1, 1), idx.view(1, 1, 1, -1))
    mask = mask.expand(layout.batch, len(reps), layout.seq_len, layout.seq_len)
    return mask.index_select(1, cls.to(device))

