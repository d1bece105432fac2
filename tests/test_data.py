"""Tests for petl.data: loading, packing, SFT masking, collation. CPU only, no downloads.

The tokenizer is a WordLevel model with a hand-written vocabulary, so expected token ids are written
out by hand below (a=4, b=5, ..., k=14; see VOCAB).
"""
from __future__ import annotations

import gzip
import json
import logging

import datasets
import numpy as np
import pytest
import torch

from petl.data import (
    LLAMA2_SYSTEM_PROMPT, DataCollatorForCausalLM, build_sft_dataset, format_sft_prompt,
    load_text_dataset, pack_for_causal_lm,
)

BOS, EOS, PAD = 1, 2, 0
HAND_WORDS = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k",
              "[", "INST", "]", "[/", "what", "is", "ok", "<|", "|>", "user", "assistant", "system"]
VOCAB = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: 4 + i for i, w in enumerate(HAND_WORDS)}}
A, B_, C, D, E, F, G, H, I_, J, K, LB, INST, RB, LBS, WHAT, IS, OK = range(4, 22)


@pytest.fixture(autouse=True)
def _quiet_progress():
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def _word_tokenizer(extra_text: str = ""):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(VOCAB)
    pre = pre_tokenizers.Whitespace()
    for word, _ in pre.pre_tokenize_str(extra_text):  # template words get ids after the hand-written ones
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tok():
    return _word_tokenizer()


# ---------------------------------------------------------------- loading

RECORDS = [{"text": "a b c", "id": 0}, {"text": "d e", "id": 1}, {"text": "f g h", "id": 2}]


def _write(path, fmt, records=RECORDS):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif fmt == "json":
        path.write_text(json.dumps(records))
    elif fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        path.write_text("text" + sep + "id\n" + "".join(f"{r['text']}{sep}{r['id']}\n" for r in records))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(records), path)
    elif fmt == "jsonl.gz":
        with gzip.open(path, "wt") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "tsv", "parquet", "jsonl.gz"])
def test_each_file_format_loads(tmp_path, fmt):
    path = _write(tmp_path / f"data.{fmt}", fmt)
    ds = load_text_dataset(str(path))
    assert isinstance(ds, datasets.Dataset)
    assert ds["text"][:] == ["a b c", "d e", "f g h"]
    assert [int(x) for x in ds["id"][:]] == [0, 1, 2]


def test_txt_document_paragraph_line(tmp_path):
    (tmp_path / "one.txt").write_text("a b\n\nc d\ne\n\n\n")
    (tmp_path / "two.txt").write_text("f g")
    docs = load_text_dataset(str(tmp_path))  # directory, one record per file, sorted by name
    assert docs["text"][:] == ["a b\n\nc d\ne\n\n\n", "f g"]
    paras = load_text_dataset(str(tmp_path / "one.txt"), txt_sample_by="paragraph")
    assert [p.strip() for p in paras["text"]] == ["a b", "c d\ne"]  # blank paragraphs dropped
    lines = load_text_dataset(str(tmp_path / "one.txt"), txt_sample_by="line", text_field="body")
    assert lines.column_names == ["body"] and lines["body"][:] == ["a b", "c d", "e"]


def test_directory_split_slice_max_samples_streaming(tmp_path):
    _write(tmp_path / "b.jsonl", "jsonl", RECORDS[1:])
    _write(tmp_path / "a.jsonl", "jsonl", RECORDS[:1])
    (tmp_path / "notes.md").write_text("ignored: not a data suffix")
    (tmp_path / ".hidden.jsonl").write_text('{"text": "never"}\n')
    assert load_text_dataset(str(tmp_path))["text"][:] == ["a b c", "d e", "f g h"]
    assert load_text_dataset(str(tmp_path), split="train[1:]")["text"][:] == ["d e", "f g h"]
    assert load_text_dataset(str(tmp_path), max_samples=2)["text"][:] == ["a b c", "d e"]
    stream = load_text_dataset(str(tmp_path), streaming=True, max_samples=2)
    assert isinstance(stream, datasets.IterableDataset)
    assert [r["text"] for r in stream] == ["a b c", "d e"]


def test_loading_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no such file or directory: '.*missing\.jsonl'"):
        load_text_dataset(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "data.xyz"
    bad.write_text("x")
    with pytest.raises(ValueError, match=r"unknown file extension '\.xyz' .*supported: \.txt, \.jsonl"):
        load_text_dataset(str(bad))
    path = _write(tmp_path / "d.jsonl", "jsonl")
    with pytest.raises(ValueError, match=r"text_field='body' is not a column .*columns are \['text', 'id'\]"):
        load_text_dataset(str(path), text_field="body")
    with pytest.raises(ValueError, match="data_files applies to a Hub id"):
        load_text_dataset(str(path), data_files="x.jsonl")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _write(mixed / "a.jsonl", "jsonl")
    _write(mixed / "b.csv", "csv")
    with pytest.raises(ValueError, match=r"mixes formats \(csv: 1 files, json: 1 files\)"):
        load_text_dataset(str(mixed))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no data files in directory"):
        load_text_dataset(str(tmp_path / "empty"))


def test_hub_id_goes_to_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        if path == "owner/scripted":
            raise RuntimeError("Dataset scripts are no longer supported, but found scripted.py")
        return datasets.Dataset.from_dict({"text": ["x", "y", "z"], "meta": [1, 2, 3]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_text_dataset("togethercomputer/RedPajama-Data-1T-Sample", split="train", max_samples=2)
    assert ds["text"][:] == ["x", "y"]
    assert calls[-1] == ("togethercomputer/RedPajama-Data-1T-Sample",
                         {"name": None, "split": "train", "data_files": None, "streaming": False})
    load_text_dataset("json", data_files="hf://datasets/o/n/*.jsonl", trust_remote_code=True)
    assert calls[-1][1]["data_files"] == "hf://datasets/o/n/*.jsonl" and calls[-1][1]["trust_remote_code"]
    with pytest.raises(RuntimeError, match=r"'owner/scripted' is a script-based dataset.*data_files="):
        load_text_dataset("owner/scripted")
    with pytest.raises(ValueError, match=r"text_field='body' is not a column .*\['text', 'meta'\]"):
        load_text_dataset("owner/name", text_field="body")


# ---------------------------------------------------------------- packing

DOCS = ["a b c", "d e", "f g h i j k", "a"]
# Token stream with BOS/EOS: [1,4,5,6,2 | 1,7,8,2 | 1,9,10,11,12,13,14,2 | 1,4,2]  (20 tokens)


def _packed(ds):
    return [(r["input_ids"], r["labels"], r["position_ids"]) for r in ds]


def test_pack_hand_computed_block4(tok):
    blocks = pack_for_causal_lm(datasets.Dataset.from_dict({"text": DOCS}), tok, block_size=4, progress=False)
    assert blocks.column_names == ["input_ids", "labels", "position_ids"]
    ids = [[1, 4, 5, 6], [2, 1, 7, 8], [2, 1, 9, 10], [11, 12, 13, 14], [2, 1, 4, 2]]
    pos = [[0, 1, 2, 3], [0, 0, 1, 2], [0, 0, 1, 2], [0, 1, 2, 3], [0, 0, 1, 2]]
    assert _packed(blocks) == [(i, i, p) for i, p in zip(ids, pos)]


def test_pack_hand_computed_block6_partial_and_plain_positions(tok):
    ds = datasets.Dataset.from_dict({"text": DOCS})
    blocks = pack_for_causal_lm(ds, tok, block_size=6, drop_last=False, progress=False)
    ids = [[1, 4, 5, 6, 2, 1], [7, 8, 2, 1, 9, 10], [11, 12, 13, 14, 2, 1], [4, 2]]
    pos = [[0, 1, 2, 3, 4, 0], [0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 0], [0, 1]]
    assert _packed(blocks) == [(i, i, p) for i, p in zip(ids, pos)]
    assert len(pack_for_causal_lm(ds, tok, block_size=6, progress=False)) == 3  # drop_last
    plain = pack_for_causal_lm(ds, tok, block_size=6, restart_positions=False, progress=False)
    assert _packed(plain) == [(i, i, list(range(6))) for i in ids[:3]]
    bare = pack_for_causal_lm(ds, tok, block_size=5, add_bos=False, add_eos=False, progress=False)
    assert _packed(bare) == [([4, 5, 6, 7, 8], [4, 5, 6, 7, 8], [0, 1, 2, 0, 1]),
                             ([9, 10, 11, 12, 13], [9, 10, 11, 12, 13], [0, 1, 2, 3, 4])]


def _reference_pack(docs: list[list[int]], block_size: int, restart: bool) -> list[tuple]:
    """Token-by-token reference: position = tokens since the later of document start and block start."""
    stream = [(t, j) for d in docs for j, t in enumerate(d)]
    rows = []
    for s in range(0, len(stream) - block_size + 1, block_size):
        chunk = stream[s:s + block_size]
        ids = [t for t, _ in chunk]
        rows.append((ids, ids, [min(j, k) if restart else k for k, (_, j) in enumerate(chunk)]))
    return rows


@pytest.mark.parametrize("block_size", [1, 3, 7, 16])
def test_pack_matches_reference_any_num_proc_and_streaming(tok, tmp_path, block_size):
    rng = np.random.default_rng(0)
    words = HAND_WORDS[:11]
    texts = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(0, 12, size=40)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    ds = load_text_dataset(str(path))
    docs = [[BOS] + [VOCAB[w] for w in t.split()] + [EOS] for t in texts]
    for restart in (True, False):
        expected = _reference_pack(docs, block_size, restart)
        one = pack_for_causal_lm(ds, tok, block_size=block_size, restart_positions=restart, progress=False)
        assert _packed(one) == expected
    if block_size == 7:  # worker processes are slow to start; one size shows num_proc changes nothing
        two = pack_for_causal_lm(ds, tok, block_size=block_size, num_proc=2, progress=False)
        assert _packed(two) == _reference_pack(docs, block_size, True)
    stream = pack_for_causal_lm(ds.to_iterable_dataset(), tok, block_size=block_size)
    assert isinstance(stream, datasets.IterableDataset)
    assert _packed(stream) == _reference_pack(docs, block_size, True)


def test_pack_does_not_double_tokenizer_bos():
    from petl.testing import tiny_tokenizer

    bpe = tiny_tokenizer()
    assert bpe("the fox")["input_ids"][0] == bpe.bos_token_id  # this tokenizer adds BOS itself
    blocks = pack_for_causal_lm(datasets.Dataset.from_dict({"text": ["the fox"]}), bpe, block_size=64,
                                drop_last=False, progress=False)
    row = blocks[0]["input_ids"]
    assert row == [bpe.bos_token_id] + bpe("the fox", add_special_tokens=False)["input_ids"] + [bpe.eos_token_id]


def test_packed_rows_attend_within_documents_only(tok):
    """transformers turns restarting position_ids (no attention_mask, no cache) into per-document
    attention: a packed row's logits equal those of each document run on its own. use_cache=False is
    required: with the config default (True) a cache is created and the detection is skipped."""
    from petl.testing import tiny_causal_lm

    blocks = pack_for_causal_lm(datasets.Dataset.from_dict({"text": DOCS}), tok, block_size=10, progress=False)
    batch = DataCollatorForCausalLM(tok)(list(blocks))
    assert "attention_mask" not in batch
    for impl in ("eager", "sdpa"):
        model = tiny_causal_lm("llama", attn_implementation=impl, vocab_size=32)
        with torch.no_grad():
            packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
            for row in range(batch["input_ids"].shape[0]):
                pos = batch["position_ids"][row].tolist()
                starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
                for s, e in zip(starts[:-1], starts[1:]):
                    alone = model(input_ids=batch["input_ids"][row:row + 1, s:e]).logits[0]
                    torch.testing.assert_close(packed[row, s:e], alone, atol=1e-5, rtol=1e-5)


def test_packing_errors(tok):
    ds = datasets.Dataset.from_dict({"text": DOCS})
    with pytest.raises(ValueError, match="block_size must be a positive integer, got 0"):
        pack_for_causal_lm(ds, tok, block_size=0)
    with pytest.raises(ValueError, match=r"no blocks: the dataset has 20 tokens, fewer than block_size=64"):
        pack_for_causal_lm(ds, tok, block_size=64, progress=False)
    with pytest.raises(ValueError, match=r"text_field='body' is not a column .*\['text'\]"):
        pack_for_causal_lm(ds, tok, block_size=4, text_field="body")
    no_bos = _word_tokenizer()
    no_bos.bos_token = None
    with pytest.raises(ValueError, match="tokenizer has no bos_token; .*add_bos=False"):
        pack_for_causal_lm(ds, no_bos, block_size=4)
    with pytest.raises(TypeError, match="every document must be a str, found NoneType"):
        pack_for_causal_lm(datasets.Dataset.from_dict({"text": ["a", None]}), tok, block_size=2, progress=False)


# ---------------------------------------------------------------- SFT

PROMPT_WHAT = [LB, INST, RB, WHAT, IS, A, LBS, INST, RB]  # "[INST]what is a[/INST]"


def _sft(tok, records, **kw):
    ds = datasets.Dataset.from_list(records)
    return [(r["input_ids"], r["labels"]) for r in build_sft_dataset(ds, tok, progress=False, **kw)]


def test_sft_longalpaca_masks_exactly_the_prompt(tok):
    rows = _sft(tok, [{"instruction": "what is a", "input": "", "output": "b c"}], max_length=64)
    assert rows == [([BOS] + PROMPT_WHAT + [B_, C, EOS], [-100] * 10 + [B_, C, EOS])]


def test_sft_templates_render_exactly():
    assert format_sft_prompt("Q?", template="longalpaca") == "[INST]Q?[/INST]"
    sys_prompt = (
        "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while "
        "being safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, "
        "or illegal content. Please ensure that your responses are socially unbiased and positive in nature."
        "\n\nIf a question does not make any sense, or is not factually coherent, explain why instead of "
        "answering something not correct. If you don't know the answer to a question, please don't share "
        "false information.")
    assert LLAMA2_SYSTEM_PROMPT == sys_prompt
    assert format_sft_prompt("Q?", "DOC", template="longalpaca") == (
        "[INST] <<SYS>>\n" + sys_prompt + "\n<</SYS>> \n\n Q? \nDOC [/INST]")
    assert format_sft_prompt("Q?", template="alpaca") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nQ?\n\n### Response:")
    assert format_sft_prompt("Q?", "DOC", template="alpaca") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nQ?\n\n### Input:\n"
        "DOC\n\n### Response:")
    assert format_sft_prompt("Q?", "DOC", template="raw") == "Q?\nDOC"
    assert format_sft_prompt("Q?", None, template="raw") == "Q?"


def test_sft_with_input_masks_whole_templated_prompt():
    tok = _word_tokenizer(" ".join(format_sft_prompt("x", "y", template=t) for t in ("longalpaca", "alpaca")))
    record = {"instruction": "what is a", "input": "d e", "output": "ok"}
    for template in ("longalpaca", "alpaca"):
        prompt = format_sft_prompt("what is a", "d e", template=template)
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        assert 3 not in prompt_ids  # every prompt word is in the vocabulary
        (ids, labels), = _sft(tok, [record], max_length=512, template=template)
        assert ids == [BOS] + prompt_ids + [OK, EOS]
        assert labels == [-100] * (1 + len(prompt_ids)) + [OK, EOS]


def test_sft_chat_template_and_missing_input_column(tok):
    chat = _word_tokenizer()
    chat.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    rows = _sft(chat, [{"instruction": "what is a", "output": "ok"}], max_length=64, template="chat")
    prompt = [VOCAB["<|"], VOCAB["user"], VOCAB["|>"], WHAT, IS, A, EOS, VOCAB["<|"], VOCAB["assistant"], VOCAB["|>"]]
    assert rows == [(prompt + [OK, EOS], [-100] * len(prompt) + [OK, EOS])]
    rows = _sft(chat, [{"instruction": "a", "output": "ok"}], max_length=64, template="chat", system_prompt="b")
    system = [VOCAB["<|"], VOCAB["system"], VOCAB["|>"], B_, EOS]
    assert rows[0][0][:5] == system and rows[0][1][-2:] == [OK, EOS] and rows[0][1][:-2] == [-100] * 13
    with pytest.raises(ValueError, match="template='chat' needs a tokenizer with a chat_template"):
        _sft(tok, [{"instruction": "a", "output": "b"}], max_length=8, template="chat")


def test_sft_truncation(tok, caplog):
    long = [{"instruction": "what is a", "output": "b c"}]  # 13 tokens: BOS + 9 prompt + b c EOS
    full = [BOS] + PROMPT_WHAT + [B_, C, EOS]
    assert _sft(tok, long, max_length=12, truncate="right") == [(full[:12], [-100] * 10 + [B_, C])]
    assert _sft(tok, long, max_length=5, truncate="left") == [([BOS, RB, B_, C, EOS], [-100, -100, B_, C, EOS])]
    assert _sft(tok, long, max_length=13, truncate="error") == [(full, [-100] * 10 + [B_, C, EOS])]
    with pytest.raises(ValueError, match=r"record 0 has 13 tokens > max_length=12; raise max_length"):
        _sft(tok, long, max_length=12, truncate="error")
    with caplog.at_level(logging.WARNING, logger="petl.data.sft"):
        kept = _sft(tok, long + [{"instruction": "a", "output": "b"}], max_length=9, truncate="right")
    # record 0 lost its whole response; record 1 (10 tokens) lost its EOS
    assert kept == [([BOS, LB, INST, RB, A, LBS, INST, RB, B_], [-100] * 8 + [B_])]
    assert "dropped 1 of 2 records" in caplog.text


def test_sft_errors(tok):
    with pytest.raises(ValueError, match=r"output_field='answer' is not a column .*\['instruction', 'output'\]"):
        _sft(tok, [{"instruction": "a", "output": "b"}], max_length=8, output_field="answer")
    with pytest.raises(ValueError, match=r"unknown SFT template 'vicuna'; choose one of \['longalpaca'"):
        _sft(tok, [{"instruction": "a", "output": "b"}], max_length=8, template="vicuna")
    with pytest.raises(ValueError, match="truncate must be 'left', 'right' or 'error', got 'middle'"):
        _sft(tok, [{"instruction": "a", "output": "b"}], max_length=8, truncate="middle")
    with pytest.raises(TypeError, match=r"record 1: field 'output' is NoneType, not str"):
        _sft(tok, [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": None}], max_length=8)


# ---------------------------------------------------------------- collator

def test_collator_pads_to_multiple(tok):
    collate = DataCollatorForCausalLM(tok, pad_to_multiple_of=4)
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9, 10, 11, 12]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, PAD, PAD, PAD, PAD, PAD], [8, 9, 10, 11, 12, PAD, PAD, PAD]]
    assert batch["labels"].tolist() == [[-100, 6, 7] + [-100] * 5, [8, 9, 10, 11, 12, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
    assert "position_ids" not in batch and batch["input_ids"].dtype == torch.long
    exact = DataCollatorForCausalLM(pad_token_id=PAD, pad_to_multiple_of=4)([{"input_ids": [1, 2, 3, 4]}])
    assert exact["input_ids"].shape == (1, 4)


def test_collator_position_ids_and_mask_choice(tok):
    feats = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7], "position_ids": [0, 0, 1]},
             {"input_ids": torch.tensor([8]), "labels": torch.tensor([8]), "position_ids": torch.tensor([0])}]
    batch = DataCollatorForCausalLM(tok)(feats)
    assert batch["position_ids"].tolist() == [[0, 0, 1], [0, 1, 2]]  # padding continues the last position
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    assert "attention_mask" not in batch  # keeps transformers' packed-document detection on
    forced = DataCollatorForCausalLM(tok, return_attention_mask=True)(feats)
    assert forced["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_collator_errors(tok):
    no_pad = _word_tokenizer()
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="no pad token id: set tokenizer.pad_token"):
        DataCollatorForCausalLM(no_pad)
    with pytest.raises(ValueError, match="pad_to_multiple_of must be a positive integer or None, got 0"):
        DataCollatorForCausalLM(tok, pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="some examples have position_ids and some do not"):
        DataCollatorForCausalLM(tok)([{"input_ids": [1], "position_ids": [0]}, {"input_ids": [1]}])
    with pytest.raises(ValueError, match="example 0: input_ids, labels and position_ids must have the same length"):
        DataCollatorForCausalLM(tok)([{"input_ids": [1, 2], "labels": [1]}])
