"""Long documents -> model inputs: truncation or section-aware chunks (``task.long_document``).

An encoder sees at most ``max_length`` tokens. ``truncate`` keeps the first (or last) tokens;
``chunk`` cuts the document into chunks of at most ``max_length`` tokens that each become one row
of the model, and the chunks' logits are pooled later (:mod:`petl.tasks.aggregate`).

Chunking is section-aware: the document is split into sections (:mod:`petl.tasks.splitting`),
whole sections are packed greedily into a chunk while they fit, and only a section longer than a
chunk is cut into windows (``chunk_overlap`` tokens shared by consecutive windows). Chunks are cut
at token boundaries of the document's own tokenisation and then re-encoded as text, so each chunk
gets the tokenizer's special tokens and, for pairs, the second text (``text_pair``: a question or
hypothesis that every chunk must see).
"""
from __future__ import annotations

import bisect
from typing import Any, Optional

from petl.tasks.splitting import section_spans


def section_token_ranges(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token ranges ``[(t0, t1), ...]`` of character spans, given each token's (start, end) offsets.

    A token belongs to the section its first character falls in; sections with no token vanish.
    """
    starts = [s for s, _ in spans]
    ranges: list[list[int]] = []
    last = -1
    for i, (char_start, _) in enumerate(offsets):
        section = max(bisect.bisect_right(starts, char_start) - 1, 0)
        if section != last:
            ranges.append([i, i + 1])
            last = section
        else:
            ranges[-1][1] = i + 1
    return [(a, b) for a, b in ranges]


def pack_chunks(ranges: list[tuple[int, int]], body: int, overlap: int = 0,
                max_chunks: Optional[int] = None) -> list[tuple[int, int]]:
    """Pack consecutive token ranges (sections) into chunks of at most ``body`` tokens.

    Sections are added to the current chunk while they fit; a section longer than ``body`` is cut
    into windows of ``body`` tokens advancing by ``body - overlap``. Returns token ranges of the
    chunks, at most ``max_chunks`` (the first ones).
    """
    if body < 1:
        raise ValueError(f"a chunk must hold at least one document token, got a budget of {body}; "
                         "raise task.max_length or shorten the text pair")
    if not 0 <= overlap < body:
        raise ValueError(f"chunk overlap {overlap} must be in [0, {body}) for chunks of {body} tokens")
    chunks: list[tuple[int, int]] = []
    current: Optional[list[int]] = None
    for start, end in ranges:
        if end - start > body:
            if current:
                chunks.append((current[0], current[1]))
                current = None
            pos = start
            while True:
                chunks.append((pos, min(pos + body, end)))
                if pos + body >= end:
                    break
                pos += body - overlap
        elif current is not None and end - current[0] <= body:
            current[1] = end
        else:
            if current:
                chunks.append((current[0], current[1]))
            current = [start, end]
        if max_chunks is not None and len(chunks) >= max_chunks:
            return chunks[:max_chunks]
    if current:
        chunks.append((current[0], current[1]))
    return chunks[:max_chunks] if max_chunks is not None else chunks


def document_chunks(text: str, tokenizer: Any, *, body: int, strategy: str = "chunk", overlap: int = 0,
                    max_chunks: Optional[int] = None, section_split: str = "none",
                    truncation_side: str = "right") -> list[str]:
    """Character substrings of ``text``, each at most ``body`` tokens long.

    ``strategy="truncate"`` (or ``"extend"``) returns one substring: the first (``truncation_side="right"``) or last
    ``body`` tokens. ``"chunk"`` returns the section-aware chunks of :func:`pack_chunks`.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False,
                    return_token_type_ids=False, verbose=False)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    if not offsets:
        return [text]
    if strategy != "chunk":
        keep = offsets[:body] if truncation_side == "right" else offsets[-body:]
        return [text[keep[0][0]:keep[-1][1]]]
    ranges = section_token_ranges(offsets, section_spans(text, section_split))
    return [text[offsets[a][0]:offsets[b - 1][1]] for a, b in pack_chunks(ranges, body, overlap, max_chunks)]


def encode_document(text: str, tokenizer: Any, *, max_length: int, text_pair: Optional[str] = None,
                    strategy: str = "truncate", overlap: int = 0, max_chunks: Optional[int] = None,
                    section_split: str = "none", truncation_side: str = "right") -> dict[str, list[list[int]]]:
    """Encode one document as ``C`` rows of at most ``max_length`` tokens (C = 1 when truncating).

    Args:
        text (str): the long document.
        tokenizer: a fast tokenizer (offsets are needed).
        max_length (int): tokens per row, special tokens and ``text_pair`` included.
        text_pair (str, Optional): short second text placed after each chunk (question, hypothesis);
            cut to half of ``max_length`` if longer.
        strategy, overlap, max_chunks, section_split, truncation_side: see :func:`document_chunks`.

    Returns:
        ``{"input_ids": [[...], ...], "attention_mask": ..., ["token_type_ids": ...]}`` # [C, T_c]
    """
    pair_ids = []
    if text_pair:
        pair_ids = tokenizer(text_pair, add_special_tokens=False, return_attention_mask=False,
                             return_token_type_ids=False, verbose=False)["input_ids"][: max_length // 2]
    special = tokenizer.num_special_tokens_to_add(pair=bool(text_pair))
    body = max_length - special - len(pair_ids)
    pieces = document_chunks(text, tokenizer, body=body, strategy=strategy, overlap=overlap,
                             max_chunks=max_chunks, section_split=section_split, truncation_side=truncation_side)
    pairs = [text_pair] * len(pieces) if text_pair else None
    # re-encoding a cut can differ by a token at its edges; truncation keeps the bound exact
    enc = tokenizer(pieces, pairs, truncation="longest_first" if text_pair else True, max_length=max_length,
                    verbose=False)
    return {key: [list(row) for row in enc[key]] for key in ("input_ids", "attention_mask", "token_type_ids")
            if key in enc}
