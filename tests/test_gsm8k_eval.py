"""GSM8K evaluation: final-number extraction, accuracy with a scripted model, and `petl eval gsm8k`."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from petl.data import format_sft_prompt
from petl.eval import extract_final_number, gsm8k_accuracy
from petl.testing import save_tiny_model, tiny_tokenizer


@pytest.mark.parametrize("text, expected", [
    ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips.\n#### 72", "72"),
    ("Weng earns 12/60 = $0.2 per minute.\n#### 10", "10"),
    ("#### 1,000", "1000"),
    ("#### $1,234.50", "1234.5"),
    ("The answer is: 18", "18"),
    ("He loses 7 and then 3, so he has -4 dollars", "-4"),
    ("It costs $5.00.", "5"),
    ("The total is 12.", "12"),
    ("x = -0.0", "0"),
    ("half is .5", "0.5"),
    ("#### 72\nThe answer is 8", "72"),      # the marker wins over a later number
    ("lists 1,2,3", "3"),                    # not a thousands separator
    ("no digits here", None),
    ("", None),
])
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


def test_extract_rejects_non_string():
    with pytest.raises(TypeError, match="expects a string"):
        extract_final_number(42)


class ScriptedLM(torch.nn.Module):
    """Stand-in causal LM whose greedy ``generate`` appends a fixed completion to every prompt."""

    def __init__(self, tokenizer, completion: str) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer = tokenizer
        self.reply = tokenizer(completion, add_special_tokens=False)["input_ids"]
        self.calls: list[dict] = []

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id):
        assert not self.training and not torch.is_grad_enabled() and do_sample is False
        self.calls.append({"input_ids": input_ids.clone(), "mask": attention_mask.clone(),
                           "max_new_tokens": max_new_tokens})
        reply = torch.tensor(self.reply[:max_new_tokens], dtype=torch.long)
        return torch.cat([input_ids, reply.expand(len(input_ids), -1)], dim=1)


RECORDS = [{"question": "Tom has 3 apples and buys 39 more. How many?", "answer": "3+39=42\n#### 42"},
           {"question": "What is 6 times 7?", "answer": "#### 42"},
           {"question": "A short one?", "answer": "#### 42"}]


def test_accuracy_one_when_answer_right():
    tok = tiny_tokenizer()
    model = ScriptedLM(tok, " The answer is: 42")
    model.train()
    out = gsm8k_accuracy(model, tok, RECORDS, batch_size=2, progress=False)
    assert (out["accuracy"], out["correct"], out["total"], out["no_answer"]) == (1.0, 3, 3, 0)
    assert model.training and tok.padding_side == "right"           # state restored
    assert [len(c["input_ids"]) for c in model.calls] == [2, 1]
    first = model.calls[0]
    assert bool(first["mask"][:, -1].all())                          # left padding
    for row, mask, rec in zip(first["input_ids"], first["mask"], RECORDS):
        prompt = tok.decode(row[mask.bool()], skip_special_tokens=True)
        assert prompt == format_sft_prompt(rec["question"], template="alpaca")


def test_accuracy_zero_when_answer_wrong():
    tok = tiny_tokenizer()
    out = gsm8k_accuracy(ScriptedLM(tok, " so 41 apples"), tok, RECORDS, progress=False)
    assert out["accuracy"] == 0.0 and out["correct"] == 0
    assert [p["predicted"] for p in out["predictions"]] == ["41"] * 3
    assert [p["reference"] for p in out["predictions"]] == ["42"] * 3
    none = gsm8k_accuracy(ScriptedLM(tok, " I do not know"), tok, RECORDS[:1], progress=False)
    assert none["accuracy"] == 0.0 and none["no_answer"] == 1


def test_accuracy_bad_records():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="'question' and 'answer'"):
        gsm8k_accuracy(ScriptedLM(tok, "1"), tok, [{"text": "x"}], progress=False)
    with pytest.raises(ValueError, match="no GSM8K records"):
        gsm8k_accuracy(ScriptedLM(tok, "1"), tok, [], progress=False)


def test_cli_on_tiny_saved_model(tmp_path):
    from petl.cli.main import main

    model_dir = save_tiny_model(tmp_path / "m")
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    out = tmp_path / "res.json"
    r = CliRunner().invoke(main, ["eval", "gsm8k", "--model", str(model_dir), "--data", str(data),
                                  "--limit", "2", "--max-new-tokens", "4", "--device", "cpu",
                                  "--no-progress", "--json-out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["command"] == "gsm8k" and res["results"]["total"] == 2
    preds = res["results"]["predictions"]
    assert [p["reference"] for p in preds] == ["42", "42"]
    # the random tiny model's answers are scored consistently with the extractor
    for p in preds:
        assert p["predicted"] == extract_final_number(p["completion"])
        assert p["correct"] == (p["predicted"] == "42")
    assert "accuracy" in r.output

    bad = tmp_path / "g.csv"
    bad.write_text("question,answer\n", encoding="utf-8")
    r = CliRunner().invoke(main, ["eval", "gsm8k", "--model", str(model_dir), "--data", str(bad)])
    assert r.exit_code != 0 and "expected a .jsonl or .json file" in r.output
