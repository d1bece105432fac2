"""De-identification, section splitting, chunk packing, chunk-logit pooling, QA spans and generation helpers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from petl.tasks.aggregate import ChunkedDocumentCollator, aggregate_chunk_logits
from petl.tasks.chunking import encode_document, pack_chunks, section_token_ranges
from petl.tasks.deid import Deidentifier, load_names
from petl.tasks.generative import cut_text, match_choice
from petl.tasks.qa import best_span
from petl.tasks.splitting import section_spans, split_sections

NOTE = ("Mary Ann Smith (MRN: 00123456), a 92 year old woman, was seen on March 4, 2012 and 03/05/2012.\n"
        "Call (617) 555-0123 or +1 617 555 0199, e-mail mary.smith@mail.example.org. SSN 123-45-6789.\n"
        "Her son John (age 45) visited on 2012-03-06; account 88812345. BP 120/80, K 4.1, dose 5.0 mg in 2012.")


@pytest.fixture
def deid():
    return Deidentifier(names=["Smith", "Mary Ann Smith", "John"])


def test_deidentify_removes_each_identifier_category(deid):
    out = deid(NOTE)
    assert out.startswith("[NAME] (MRN: [RECORD]), a [AGE>89] year old woman, was seen on [DATE] and [DATE].")
    assert "Call [PHONE] or [PHONE], e-mail [EMAIL]. SSN [RECORD]." in out
    assert "Her son [NAME] (age 45) visited on [DATE]; account [RECORD]." in out
    # clinical values, ages up to 89 and bare years stay
    assert "BP 120/80, K 4.1, dose 5.0 mg in 2012." in out
    for secret in ("Smith", "John", "00123456", "555", "mary.smith", "6789", "88812345", "March", "92"):
        assert secret not in out


@pytest.mark.parametrize("text, expected", [
    ("aged 101, age: 90, Age 89, 95-year-old, 93 yo, 91 y/o", "aged [AGE>89], age: [AGE>89], Age 89, [AGE>89]-year-old, "
                                                              "[AGE>89] yo, [AGE>89] y/o"),
    ("4th of Mar 2012, Sept 3, 12/31/99, 1.2.2003, June 2010; May is fine", "[DATE], [DATE], [DATE], [DATE], [DATE]; May is fine"),
    ("Smithson met smith", "Smithson met [NAME]"),
])
def test_deidentify_rules(deid, text, expected):
    assert deid(text) == expected


def test_deidentify_keeps_answer_spans_aligned(deid):
    context = "Seen by Dr. Smith on 03/04/2012 for chest pain."
    spans = [(12, 17), (36, 46)]
    new_text, new_spans = deid.deidentify_span_text(context, spans)
    assert new_text == "Seen by Dr. [NAME] on [DATE] for chest pain."
    assert [new_text[a:b] for a, b in new_spans] == ["[NAME]", "chest pain"]


def test_names_file_and_bad_category(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("# staff\nGreg House\n\nWilson\n")
    assert load_names(names) == ["Greg House", "Wilson"]
    with pytest.raises(ValueError, match="unknown de-identification category 'zip'"):
        Deidentifier(categories=["zip"])


def test_legal_sections_follow_headings_numbered_paragraphs_and_clauses():
    text = ("This Agreement is made today.\n1. DEFINITIONS\n1.1 \"Affiliate\" means any entity.\n2. TERM\n"
            "The term is five years.\nGOVERNING LAW\nDelaware law applies.\n\nA new clause.\n"
            "Section 5. Notices.\nArticle IV\nMisc.")
    assert split_sections(text, "legal") == [
        "This Agreement is made today.\n", "1. DEFINITIONS\n", "1.1 \"Affiliate\" means any entity.\n",
        "2. TERM\nThe term is five years.\n", "GOVERNING LAW\nDelaware law applies.\n\n", "A new clause.\n",
        "Section 5. Notices.\n", "Article IV\nMisc."]


def test_clinical_sections_follow_headers_and_spans_cover_the_text():
    note = ("Admission Date: [**2101-1-1**]\nHistory of Present Illness:\n72M with pain. BP 120/80: stable.\n"
            "brief hospital course: improved.\nDischarge Medications:\n1. aspirin\npt was seen: fine")
    sections = split_sections(note, "clinical")
    assert [s.split(":")[0] for s in sections] == ["Admission Date", "History of Present Illness",
                                                   "brief hospital course", "Discharge Medications"]
    assert "".join(sections) == note
    assert section_spans("a\n\nb", "none") == [(0, 4)]
    with pytest.raises(ValueError, match="unknown section style"):
        section_spans("x", "chapters")


def test_pack_chunks_keeps_sections_whole_and_windows_long_ones():
    # sections of 3, 2, 25 and 1 tokens; chunks of 10 with overlap 2
    assert pack_chunks([(0, 3), (3, 5), (5, 30), (30, 31)], body=10, overlap=2) == [
        (0, 5), (5, 15), (13, 23), (21, 30), (30, 31)]
    assert pack_chunks([(0, 4), (4, 8), (8, 12)], body=10, max_chunks=1) == [(0, 8)]
    with pytest.raises(ValueError, match="overlap 10 must be in"):
        pack_chunks([(0, 4)], body=10, overlap=10)


def test_section_token_ranges_assign_tokens_by_first_character():
    offsets = [(0, 3), (4, 8), (9, 12), (13, 20)]
    assert section_token_ranges(offsets, [(0, 9), (9, 21)]) == [(0, 2), (2, 4)]


def test_encode_document_bounds_and_covers_every_token(tmp_path):
    from petl.tasks.testing import tiny_tokenizer_for

    words = [f"w{i}" for i in range(60)]
    doc = "Section 1. " + " ".join(words[:20]) + "\n\nSection 2. " + " ".join(words[20:]) + "."
    tok = tiny_tokenizer_for([doc, "what is it ?"])
    enc = encode_document(doc, tok, max_length=16, strategy="chunk", section_split="legal", text_pair="what is it ?")
    rows = enc["input_ids"]
    assert all(len(r) <= 16 for r in rows) and len(rows) >= 5
    seen = {tok.convert_ids_to_tokens(i) for r in rows for i in r}
    assert {w for w in words} <= seen  # nothing lost between chunks
    assert all(tok.decode(r).endswith("what is it? [SEP]") for r in rows)  # the pair follows every chunk
    truncated = encode_document(doc, tok, max_length=16, strategy="truncate")["input_ids"]
    assert len(truncated) == 1 and len(truncated[0]) == 16
    left = encode_document(doc, tok, max_length=8, strategy="truncate", truncation_side="left")["input_ids"][0]
    assert tok.decode(left, skip_special_tokens=True).endswith("w58 w59.")


@pytest.mark.parametrize("how", ["max", "mean", "logsumexp"])
def test_aggregate_matches_a_per_document_loop(how):
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    chunk_logits = torch.randn(int(mask.sum()), 4, dtype=torch.float64)
    got = aggregate_chunk_logits(chunk_logits, mask, how)
    rows, start = [], 0
    for n in mask.sum(1).tolist():
        block = chunk_logits[start:start + n]
        start += n
        rows.append({"max": block.max(0).values, "mean": block.mean(0),
                     "logsumexp": torch.log(torch.exp(block).mean(0))}[how])
    torch.testing.assert_close(got, torch.stack(rows))


def test_aggregate_gradient_reaches_only_the_max_chunk_and_rejects_empty_documents():
    logits = torch.tensor([[1.0], [3.0]], requires_grad=True)
    aggregate_chunk_logits(logits, torch.tensor([[True, True]]), "max").sum().backward()
    assert logits.grad.flatten().tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="at least one chunk"):
        aggregate_chunk_logits(torch.zeros(1, 2), torch.tensor([[True], [False]]), "max")


def test_chunked_collator_pads_chunks_and_tokens():
    features = [{"input_ids": [[5, 6, 7], [8]], "labels": [1.0, 0.0]}, {"input_ids": [[9, 9]], "labels": [0.0, 1.0]}]
    batch = ChunkedDocumentCollator(pad_token_id=0, multi_label=True)(features)
    assert batch["input_ids"].tolist() == [[[5, 6, 7], [8, 0, 0]], [[9, 9, 0], [0, 0, 0]]]
    assert batch["chunk_mask"].tolist() == [[True, True], [True, False]]
    assert batch["attention_mask"][0, 1].tolist() == [1, 0, 0] and batch["labels"].dtype == torch.float32


def test_best_span_respects_context_and_length():
    start = np.array([9.0, 1.0, 5.0, 0.0, 4.0])
    end = np.array([9.0, 0.0, 1.0, 3.0, 6.0])
    offsets = [[-1, -1], [0, 3], [4, 7], [8, 11], [12, 15]]  # token 0 is CLS (outside the context)
    span = best_span(start, end, offsets, max_answer_tokens=3)
    assert (span.start_char, span.end_char) == (4, 15) and span.score == 11.0
    short = best_span(start, end, offsets, max_answer_tokens=1)
    assert (short.start_char, short.end_char) == (12, 15)


def test_cut_text_and_choice_matching(tmp_path):
    from petl.tasks.testing import tiny_tokenizer_for

    tok = tiny_tokenizer_for(["one two three four five"])
    assert cut_text("one two three four five", tok, 2) == "one two"
    assert cut_text("one two three four five", tok, 2, side="left") == "four five"
    assert match_choice("B. Aspirin", ["A", "B", "C", "D"]) == 1
    assert match_choice(" Maybe, the data", ["yes", "no", "maybe"]) == 2
    assert match_choice("unclear", ["yes", "no"]) == -1


def test_chunking_finds_evidence_that_truncation_cuts_away():
    """A model that scores one keyword: only chunk-and-aggregate sees it at the end of a long document."""
    import types

    import datasets

    from petl.tasks.features import encode_classification
    from petl.tasks.predict import predict_documents
    from petl.tasks.testing import tiny_tokenizer_for

    docs = [" ".join(["filler"] * 40) + " verdict", " ".join(["filler"] * 40), "verdict " + " ".join(["filler"] * 40)]
    tok = tiny_tokenizer_for(docs)
    keyword = tok.convert_tokens_to_ids("verdict")

    class KeywordModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(()))

        def forward(self, input_ids, attention_mask, token_type_ids=None):  # [N, T] -> logits [N, 2]
            hits = ((input_ids == keyword) & attention_mask.bool()).sum(1).float()
            return types.SimpleNamespace(logits=torch.stack([torch.zeros_like(hits), 10 * hits - 5], 1))

    records = datasets.Dataset.from_list([{"text": d, "text_pair": "", "labels": 0} for d in docs])
    preds = {}
    for strategy in ("truncate", "chunk"):
        encoded = encode_classification(records, tok, max_length=16, strategy=strategy, num_labels=2, multi_label=False,
                                        max_chunks=8)
        logits = predict_documents(KeywordModel(), encoded, pad_token_id=0, aggregate="max", batch_size=2)
        preds[strategy] = logits.argmax(-1).tolist()
    assert preds == {"truncate": [0, 0, 1], "chunk": [1, 0, 1]}
