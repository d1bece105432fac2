"""Pack documents into fixed-length blocks for causal-LM (continued pre-training / context extension).

Documents are tokenized, each is wrapped in BOS ... EOS, all are joined into one token stream in
dataset order, and the stream is cut into blocks of `block_size` tokens. A block is addressed by its
global token range, so the result does not depend on `num_proc` or on map batch boundaries, and
nothing is random: the same data and tokenizer always give the same blocks.

Position ids. By default (`restart_positions=True`) a block's `position_ids` restart at 0 wherever a
document starts inside it; transformers turns such rows into block-diagonal attention when no
`attention_mask` is passed (see `DataCollatorForCausalLM`), so packed documents do not attend to each
other. A document cut by a block boundary continues in the next block **from position 0 as well**,
not from its offset in the document: each block is then a self-contained set of sequences starting
at 0, exactly what RoPE saw for the first fragment, and no position exceeds `block_size - 1` (the
context the model is being extended to). With `restart_positions=False` every block gets plain
0..block_size-1, which is LongLoRA's fine-tune.py behaviour: documents joined with EOS and attended
as one long sequence.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import datasets
import numpy as np
import pyarrow.compute as pc
from datasets.fingerprint import Hasher

from petl.data._utils import check_positive_int, progress_bars, require_column

_TOKENIZE_BATCH = 1000
_BLOCK_TOKENS_PER_BATCH = 1 << 20  # ~1M tokens per packing map batch bounds its memory


def pack_for_causal_lm(
    dataset: datasets.Dataset | datasets.IterableDataset,
    tokenizer,
    *,
    block_size: int,
    text_field: str = "text",
    add_bos: bool = True,
    add_eos: bool = True,
    drop_last: bool = True,
    restart_positions: bool = True,
    num_proc: int | None = None,
    progress: bool = True,
) -> datasets.Dataset | datasets.IterableDataset:
    """Tokenize, join and cut documents into blocks of `block_size` tokens.

    Args:
        dataset (Dataset | IterableDataset): records with a string column `text_field`. A streaming
            dataset gives a streaming result with the same blocks, packed lazily.
        tokenizer (PreTrainedTokenizerBase): called with ``add_special_tokens=False``; BOS/EOS are
            added here, once per document, so tokenizers that add them themselves are not doubled.
        block_size (int): tokens per block (the training context length).
        text_field (str, Optional): column holding the documents. Default: ``"text"``.
        add_bos (bool, Optional): put ``tokenizer.bos_token_id`` before each document. Default: True.
        add_eos (bool, Optional): put ``tokenizer.eos_token_id`` after each document. Default: True.
        drop_last (bool, Optional): drop the final partial block; when False it is kept, shorter
            than `block_size` (the collator pads it). Default: True.
        restart_positions (bool, Optional): restart ``position_ids`` at 0 at each document start
            and at each block start (see the module docstring); False gives 0..block_size-1 per block,
            LongLoRA's behaviour (documents joined with EOS, attended as one sequence). Default: True.
        num_proc (int, Optional): worker processes for tokenization and packing; results are
            identical for any value. Default: None (one process).
        progress (bool, Optional): show datasets' progress bars. Default: True.

    Returns:
        Dataset with columns ``input_ids``, ``labels`` (a copy of ``input_ids``; the model shifts
        them) and ``position_ids``, each a list of ``block_size`` int32 per row.

    Example:
        >>> blocks = pack_for_causal_lm(ds, tok, block_size=8192)
        >>> blocks[0]["position_ids"][:4]
        [0, 1, 2, 3]
    """
    check_positive_int(block_size, "block_size")
    if num_proc is not None:
        check_positive_int(num_proc, "num_proc")
    require_column(dataset, text_field, arg="text_field")
    bos = _special_id(tokenizer, "bos", add_bos)
    eos = _special_id(tokenizer, "eos", add_eos)
    encode_kwargs = {"tokenizer": tokenizer, "text_field": text_field, "bos": bos, "eos": eos}
    if isinstance(dataset, datasets.IterableDataset):
        return datasets.IterableDataset.from_generator(
            _stream_blocks, features=_block_features(),
            gen_kwargs={"dataset": dataset, "block_size": block_size, "restart": restart_positions,
                        "drop_last": drop_last, **encode_kwargs})
    with progress_bars(progress):
        tokenized = dataset.map(_tokenize_batch, batched=True, batch_size=_TOKENIZE_BATCH,
                                remove_columns=dataset.column_names, num_proc=num_proc,
                                fn_kwargs=encode_kwargs, desc="Tokenizing")
        column = tokenized.with_format("arrow")[:]["input_ids"]
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
        ends = np.cumsum(lengths)
        total = int(ends[-1]) if len(ends) else 0
        n_blocks = total // block_size if drop_last else -(-total // block_size)
        if n_blocks == 0:
            raise ValueError(f"packing produced no blocks: the dataset has {total} tokens, fewer than "
                             f"block_size={block_size}; lower block_size or pass drop_last=False.")
        per_batch = max(1, _BLOCK_TOKENS_PER_BATCH // block_size)
        index = datasets.Dataset.from_dict({"block": np.arange(n_blocks, dtype=np.int64)})
        fingerprint = Hasher.hash(["petl-pack-v1", tokenized._fingerprint, block_size, restart_positions, n_blocks])
        return index.map(_blocks_batch, batched=True, batch_size=per_batch, writer_batch_size=per_batch,
                         remove_columns=["block"], num_proc=num_proc, features=_block_features(),
                         new_fingerprint=fingerprint, cache_file_name=_cache_file(tokenized, fingerprint),
                         fn_kwargs={"tokenized": tokenized, "ends": ends, "total": total,
                                    "block_size": block_size, "restart": restart_positions},
                         desc=f"Packing into {block_size}-token blocks")


def _cache_file(tokenized: datasets.Dataset, fingerprint: str) -> str | None:
    """Write blocks next to the tokenization cache (memory-mapped, reused on a rerun); an in-memory
    source stays in memory, as datasets does for it."""
    if not tokenized.cache_files:
        return None
    return os.path.join(os.path.dirname(tokenized.cache_files[0]["filename"]), f"petl-packed-{fingerprint}.arrow")


def _special_id(tokenizer, which: str, wanted: bool) -> int | None:
    if not wanted:
        return None
    token_id = getattr(tokenizer, f"{which}_token_id", None)
    if token_id is None:
        raise ValueError(f"the tokenizer has no {which}_token; set tokenizer.{which}_token or pass add_{which}=False.")
    return int(token_id)


def _block_features() -> datasets.Features:
    ids = datasets.Sequence(datasets.Value("int32"))
    return datasets.Features({"input_ids": ids, "labels": ids, "position_ids": ids})


def _encode_documents(texts: list, tokenizer, bos: int | None, eos: int | None) -> list[np.ndarray]:
    """Token ids of each document, wrapped in the optional BOS/EOS. # list of [L_doc] int32"""
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"every document must be a str, found {type(text).__name__}; "
                            "drop or fill empty records first (e.g. dataset.filter).")
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    head = [bos] if bos is not None else []
    tail = [eos] if eos is not None else []
    return [np.asarray(head + list(doc) + tail, dtype=np.int32) for doc in ids]


def _tokenize_batch(batch: dict, *, tokenizer, text_field: str, bos, eos) -> dict:
    return {"input_ids": _encode_documents(batch[text_field], tokenizer, bos, eos)}


def _rows(ids: np.ndarray, doc_pos: np.ndarray, block_size: int, restart: bool) -> dict:
    """Cut a block-aligned token run into rows. ids, doc_pos: [N], N a multiple of block_size except
    possibly for the final partial row. doc_pos is each token's index inside its document."""
    block_pos = np.arange(len(ids), dtype=np.int64) % block_size
    # Inside a block, position = tokens since the later of (document start, block start).
    pos = np.minimum(doc_pos, block_pos) if restart else block_pos
    cuts = range(0, len(ids), block_size)
    input_ids = [ids[i:i + block_size] for i in cuts]
    return {"input_ids": input_ids, "labels": [r.copy() for r in input_ids],
            "position_ids": [pos[i:i + block_size].astype(np.int32) for i in cuts]}


def _positions_in_docs(lengths: np.ndarray) -> np.ndarray:
    """[sum(lengths)] index of every token inside its document."""
    starts = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)


def _blocks_batch(batch: dict, *, tokenized: datasets.Dataset, ends: np.ndarray, total: int,
                  block_size: int, restart: bool) -> dict:
    first, last = int(batch["block"][0]), int(batch["block"][-1])
    lo, hi = first * block_size, min((last + 1) * block_size, total)  # global token range
    d0 = int(np.searchsorted(ends, lo, side="right"))  # first document ending after lo
    d1 = int(np.searchsorted(ends, hi, side="left")) + 1  # one past the document holding token hi-1
    flat = pc.list_flatten(tokenized.with_format("arrow")[d0:d1]["input_ids"])
    first_start = int(ends[d0 - 1]) if d0 > 0 else 0
    # Only [lo, hi) is converted, so a document much longer than a batch is never copied whole.
    ids = flat.slice(lo - first_start, hi - lo).to_numpy()
    tokens = np.arange(lo, hi, dtype=np.int64)
    doc = np.searchsorted(ends, tokens, side="right")  # document of every token
    doc_start = np.where(doc > 0, ends[np.maximum(doc - 1, 0)], 0)
    return _rows(ids, tokens - doc_start, block_size, restart)


def _stream_blocks(dataset: datasets.IterableDataset, tokenizer, text_field: str, bos, eos,
                   block_size: int, restart: bool, drop_last: bool) -> Iterator[dict]:
    """The same blocks as the in-memory path, built from a stream with a carry-over buffer."""
    ids = np.zeros(0, dtype=np.int32)
    doc_pos = np.zeros(0, dtype=np.int64)
    for batch in dataset.iter(batch_size=_TOKENIZE_BATCH):
        docs = _encode_documents(batch[text_field], tokenizer, bos, eos)
        if not docs:
            continue
        ids = np.concatenate([ids, *docs])
        doc_pos = np.concatenate([doc_pos, _positions_in_docs(np.array([len(d) for d in docs], dtype=np.int64))])
        full = len(ids) // block_size * block_size
        if full:
            yield from _unbatch(_rows(ids[:full], doc_pos[:full], block_size, restart))
            ids, doc_pos = ids[full:], doc_pos[full:]
    if len(ids) and not drop_last:
        yield from _unbatch(_rows(ids, doc_pos, block_size, restart))


def _unbatch(rows: dict) -> Iterator[dict]:
    for i in range(len(rows["input_ids"])):
        yield {k: v[i].tolist() for k, v in rows.items()}
