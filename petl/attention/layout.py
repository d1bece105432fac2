"""Per-sample sequence layout: valid span, documents and group sizes.

The patterns in :mod:`petl.attention.patterns` are defined on each sample's own valid span, so a
sample gets the same segments whether it is batched with longer ones (right or left padding) or
alone. LongLoRA built its cut grid from the batch maximum and mis-assigned padding rows for
batch > 1 (LongLoRA issues #148, #182, #199); building everything per sample avoids both.

Inputs are what a transformers attention function receives:

* ``attention_mask``: ``None`` (no padding, no packing) or the boolean ``[B, 1, L, L]`` mask of
  ``sdpa_mask`` (causal AND padding AND packed documents). Its diagonal is the key-padding mask,
  since every valid token may attend to itself.
* ``position_ids``: ``[B or 1, L]``; a position that does not follow its predecessor by one
  starts a new document (the rule of transformers' ``find_packed_sequence_indices``).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

#: Flex evaluates mask_mod on whole 128-blocks; layout tensors are padded to this multiple.
BLOCK = 128


@dataclass(eq=False)
class SequenceLayout:
    """Where each sample's tokens are and how they group.

    Attributes:
        batch, seq_len (int): B and L of the attention call.
        start, length (Tensor): ``[B]`` int32, first valid index and valid span length.
        group, padded (Tensor): ``[B]`` int32, even group size G and span padded to whole groups
            (``ceil(length/G)*G``, the modulus of the cyclic roll). Filled by :meth:`with_groups`.
        doc, doc_pos (Tensor, Optional): ``[B, Lp]`` int32 document id and position inside the
            document (``Lp`` = L rounded up to 128); None when no row is packed.
        extra (Tensor, Optional): ``[B, Lp, Lp]`` bool, the caller's causal mask (padding,
            documents, sliding windows), ANDed into the causal part of the pattern.
        static (bool): True when nothing depends on the data (no padding, no packing), so masks
            built for this layout can be reused for any call of the same shape.
    """

    batch: int
    seq_len: int
    start: torch.Tensor
    length: torch.Tensor
    doc: torch.Tensor | None = None
    doc_pos: torch.Tensor | None = None
    extra: torch.Tensor | None = None
    static: bool = True
    group: torch.Tensor | None = None
    padded: torch.Tensor | None = None
    memo: dict[Any, Any] = field(default_factory=dict, repr=False)

    def with_groups(self, cfg) -> "SequenceLayout":
        """This layout with ``group``/``padded`` set for ``cfg`` (memoised per group rule)."""
        key = ("groups", cfg.group_ratio, cfg.group_size)
        if key not in self.memo:
            group = cfg.group_for_length(self.length).to(torch.int32)
            padded = torch.clamp((self.length + group - 1) // group * group, min=1).to(torch.int32)
            self.memo[key] = SequenceLayout(self.batch, self.seq_len, self.start, self.length, self.doc,
                                            self.doc_pos, self.extra, self.static, group, padded)
        return self.memo[key]


def _as_bool_mask(mask: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """``[B|1, 1, L, L]`` boolean or additive float mask -> boolean ``[B, L, L]``."""
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[-2:] != (seq_len, seq_len):
        raise ValueError(f"petl attention expects a [B, 1, {seq_len}, {seq_len}] mask during training, "
                         f"got shape {tuple(mask.shape)}; pass a 2-D padding mask to the model instead")
    if mask.dtype != torch.bool:
        blocked = mask <= torch.finfo(mask.dtype).min / 2
        if not torch.all(blocked | (mask == 0)):
            raise ValueError("petl attention accepts boolean or 0/-inf masks only; additive biases would be "
                             "dropped (apply them as a score modification instead)")
        mask = ~blocked
    return mask[:, 0].expand(batch, seq_len, seq_len)


def _pad_last(x: torch.Tensor, size: int, dims: int, value: int | bool) -> torch.Tensor:
    """Pad the last ``dims`` dimensions of ``x`` up to ``size`` with ``value``."""
    pad = []
    for d in range(dims):
        pad += [0, size - x.shape[-1 - d]]
    return torch.nn.functional.pad(x, pad, value=value) if any(pad) else x.contiguous()


def build_layout(batch: int, seq_len: int, device: torch.device, attention_mask: torch.Tensor | None,
                 position_ids: torch.Tensor | None) -> SequenceLayout:
    """Derive the layout (without groups) from what the attention function received."""
    lp = -(-seq_len // BLOCK) * BLOCK
    idx = torch.arange(seq_len, device=device, dtype=torch.int32)
    extra = None
    if attention_mask is None:
        valid = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    else:
        extra = _as_bool_mask(attention_mask.to(device), batch, seq_len)
        valid = extra.diagonal(dim1=-2, dim2=-1)
    any_valid = valid.any(-1)
    start = torch.where(any_valid, valid.int().argmax(-1), 0).to(torch.int32)
    last = seq_len - 1 - valid.flip(-1).int().argmax(-1)
    length = torch.where(any_valid, last - start + 1, 0).to(torch.int32)

    doc = doc_pos = None
    if position_ids is not None:
        pos = position_ids.to(device).expand(batch, seq_len)
        in_span = (idx >= start[:, None]) & (idx < (start + length)[:, None])
        jump = torch.ones_like(valid)
        jump[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
        first = idx[None, :] == start[:, None]
        boundary = (jump & in_span) | first
        if bool((boundary & ~first).any()):  # one host sync per forward; cached by the caller
            doc = boundary.to(torch.int32).cumsum(-1, dtype=torch.int32)
            first_idx = torch.where(boundary, idx, 0).cummax(-1).values
            doc_pos = idx - first_idx
            doc, doc_pos = _pad_last(doc, lp, 1, -1), _pad_last(doc_pos, lp, 1, 0)
    if extra is not None:
        extra = _pad_last(extra, lp, 2, False)
    static = extra is None and doc is None
    return SequenceLayout(batch, seq_len, start, length, doc, doc_pos, extra, static)


class _IdentityCache:
    """Remember the layout of the last few (attention_mask, position_ids) objects.

    All layers of one forward pass receive the same mask and position tensors, so the layout
    (and the host sync it needs) is computed once per forward. Weak references: a cached entry
    never keeps a step's tensors alive, and a dead reference can't alias a new tensor.
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self.entries: list[tuple[tuple, Any]] = []

    @staticmethod
    def _ref(x: torch.Tensor | None):
        return None if x is None else weakref.ref(x)

    def get(self, key: tuple, objs: tuple) -> Any:
        for (k, refs), value in self.entries:
            if k == key and all((r is None and o is None) or (r is not None and r() is o)
                                for r, o in zip(refs, objs)):
                return value
        return None

    def put(self, key: tuple, objs: tuple, value: Any) -> None:
        self.entries.insert(0, ((key, tuple(self._ref(o) for o in objs)), value))
        del self.entries[self.size:]


_CACHE = _IdentityCache()


def layout_for(query: torch.Tensor, attention_mask: torch.Tensor | None,
               position_ids: torch.Tensor | None) -> SequenceLayout:
    """Cached :func:`build_layout` for ``query`` ``[B, H, L, D]``."""
    batch, _, seq_len, _ = query.shape
    key = (batch, seq_len, query.device)
    objs = (attention_mask, position_ids)
    layout = _CACHE.get(key, objs)
    if layout is None:
        layout = build_layout(batch, seq_len, query.device, attention_mask, position_ids)
        _CACHE.put(key, objs, layout)
    return layout
