"""petl.eval: perplexity (sliding / LongLoRA), passkey retrieval, token loading and `petl eval`.

References are independent of the code under test: the transformers perplexity-guide loop and
LongLoRA eval.py's loop (model loss with labels), explicit per-token log-softmax sums, and a bigram
"model" whose per-token NLL is known in closed form.
"""
from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
import types

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from petl.eval import (
    load_eval_tokens,
    longlora_windows,
    num_longlora_windows,
    num_sliding_windows,
    passkey,
    passkey_prompt,
    perplexity,
    sliding_windows,
)
from petl.eval.passkey import FILLER, KEY_LINE, QUESTION, TASK
from petl.testing import tiny_causal_lm


# ---------------------------------------------------------------------------- fixtures / fakes
@pytest.fixture(scope="module")
def tokenizer():
    """Byte-level BPE trained in-process on the passkey sentences (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TASK, FILLER, KEY_LINE, QUESTION, "A held out text."] * 5, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


@pytest.fixture(scope="module")
def llama():
    return tiny_causal_lm("llama", vocab_size=640, max_position_embeddings=512)


class Out(types.SimpleNamespace):
    pass


class BigramLM(torch.nn.Module):
    """logits[b, t] = table[ids[b, t]]: NLL of token t+1 depends only on token t (context-free)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, use_cache=False):
        return Out(logits=self.table[input_ids])  # [B, T, V]


class ScriptedGenerator(torch.nn.Module):
    """A fake LM whose ``generate`` appends ``answer(prompt_text)`` (tokenized, no specials)."""

    def __init__(self, tokenizer, answer):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.answer = tokenizer, answer

    def generate(self, input_ids, attention_mask=None, max_new_tokens=1, **kwargs):
        assert kwargs.get("do_sample") is False and input_ids.shape[0] == 1
        text = self.tok.decode(input_ids[0], skip_special_tokens=True)
        new = self.tok(self.answer(text), add_special_tokens=False)["input_ids"][:max_new_tokens]
        return torch.cat([input_ids, torch.tensor([new], dtype=torch.long)], dim=1)


def _key_in(text: str) -> str:
    return re.search(r"The pass key is (\d+)\. Remember", text).group(1)


# ---------------------------------------------------------------------------- windows
@pytest.mark.parametrize("n,length,stride", [(1000, 256, 128), (1000, 256, 256), (257, 256, 128),
                                             (256, 256, 128), (100, 256, 128), (77, 10, 3),
                                             (2, 2, 1), (1, 8, 4)])
def test_sliding_window_count_and_coverage(n, length, stride):
    ws = sliding_windows(n, length, stride)
    assert len(ws) == num_sliding_windows(n, length, stride)
    scored = [t for b, e, s in ws for t in range(s, e)]
    assert all(e - b <= length and s >= b + 1 for b, e, s in ws)
    if stride < length:  # every token but the first is scored exactly once
        assert sorted(scored) == list(range(1, n))
    else:  # non-overlapping windows: their first tokens have no context and are skipped
        assert sorted(scored) == [t for t in range(1, n) if t % length != 0]


def test_window_counts_hand_checked():
    assert num_sliding_windows(1000, 256, 128) == 7  # 1 + ceil(744 / 128)
    assert num_longlora_windows(1000, 256) == 2  # range(0, 744, 256) = [0, 256, 512], pop
    assert longlora_windows(1000, 256) == [(0, 256, 1), (256, 512, 257)]
    assert num_longlora_windows(1025, 256) == 3  # [0, 256, 512, 768] minus the last
    assert num_longlora_windows(512, 256) == 0  # range(0, 256, 256) = [0], pop
    assert num_longlora_windows(513, 256) == 1  # [0, 256] minus the last
    assert num_longlora_windows(769, 256) == 2
    for n in range(250, 1400, 37):
        assert len(longlora_windows(n, 128)) == max(0, len(range(0, n - 128, 256)) - 1)
        assert len(longlora_windows(n, 128)) == num_longlora_windows(n, 128)


# ---------------------------------------------------------------------------- perplexity
def hf_guide_ppl(model, ids, length, stride):
    """The transformers 'Perplexity of fixed-length models' loop (labels masked with -100)."""
    nll_sum, n_tokens, prev_end, n = 0.0, 0, 0, ids.numel()
    for begin in range(0, n, stride):
        end = min(begin + length, n)
        trg_len = end - prev_end
        x = ids[None, begin:end]
        y = x.clone()
        y[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids=x, labels=y).loss
        valid = int((y[:, 1:] != -100).sum())
        nll_sum, n_tokens = nll_sum + loss.item() * valid, n_tokens + valid
        prev_end = end
        if end == n:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


def longlora_eval_py_ppl(model, ids, length, sliding_window=256):
    """LongLoRA eval.py at batch size 1: one forward per window with labels = inputs."""
    starts = list(range(0, ids.numel() - length, sliding_window))
    starts.pop()
    losses = []
    with torch.no_grad():
        for i in starts:
            x = ids[None, i:i + length]
            losses.append(model(input_ids=x, labels=x).loss.item())
    return math.exp(sum(losses) / len(losses)), len(starts)


@pytest.mark.parametrize("stride,batch_size", [(None, 1), (24, 3), (64, 2)])
def test_sliding_matches_hf_guide_loop(llama, stride, batch_size):
    torch.manual_seed(1)
    ids = torch.randint(0, 640, (300,))
    res = perplexity(llama, ids, lengths=[64, 100], stride=stride, batch_size=batch_size,
                     progress=False)
    for length in (64, 100):
        s = stride or length // 2
        ref, ref_tokens = hf_guide_ppl(llama, ids, length, s)
        assert res[length]["ppl"] == pytest.approx(ref, rel=1e-5)
        assert res[length]["tokens"] == ref_tokens == (299 if s < length else 299 - 4)
        assert res[length]["windows"] == num_sliding_windows(300, length, s)
        assert res[length]["nll"] == pytest.approx(math.log(res[length]["ppl"]))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_longlora_matches_eval_py_loop(llama, batch_size):
    torch.manual_seed(2)
    ids = torch.randint(0, 640, (1300,))
    res = perplexity(llama, ids, lengths=[64, 128], mode="longlora", batch_size=batch_size,
                     progress=False)
    for length in (64, 128):
        ref, windows = longlora_eval_py_ppl(llama, ids, length)
        assert res[length]["windows"] == windows == 4
        assert res[length]["tokens"] == 4 * (length - 1)
        assert res[length]["ppl"] == pytest.approx(ref, rel=1e-5)
        assert res[length]["stride"] == 256


@pytest.mark.parametrize("arch", ["gpt_neox", "qwen3", "gemma"])
def test_other_architectures_match_reference_loops(arch):
    model = tiny_causal_lm(arch, vocab_size=640)
    ids = torch.randint(0, 640, (400,), generator=torch.Generator().manual_seed(5))
    res = perplexity(model, ids, lengths=[48], stride=20, batch_size=2, progress=False)[48]
    assert res["ppl"] == pytest.approx(hf_guide_ppl(model, ids, 48, 20)[0], rel=1e-5)
    res = perplexity(model, ids, lengths=[48], mode="longlora", stride=64, progress=False)[48]
    assert res["ppl"] == pytest.approx(longlora_eval_py_ppl(model, ids, 48, 64)[0], rel=1e-5)


def test_bigram_closed_form_both_modes():
    """Context-free model: sliding ppl = exp(mean bigram NLL over tokens 1..n-1), exactly."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(7, 7, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 7, (700,), generator=g)
    logp = torch.log_softmax(table, dim=-1)
    per_token = [-logp[ids[t - 1], ids[t]].item() for t in range(1, 700)]  # NLL of token t
    model = BigramLM(table)
    res = perplexity(model, ids, lengths=[50], stride=20, progress=False)[50]
    assert res["ppl"] == pytest.approx(math.exp(sum(per_token) / 699), rel=1e-12)
    as_uint16 = perplexity(model, ids.numpy().astype(np.uint16), lengths=[50], stride=20,
                           progress=False)[50]  # LongLoRA's storage type, via numpy
    assert as_uint16["ppl"] == res["ppl"]
    ll = perplexity(model, ids, lengths=[50], mode="longlora", stride=100, progress=False)[50]
    starts = list(range(0, 650, 100))[:-1]
    means = [sum(per_token[s:s + 49]) / 49 for s in starts]  # tokens s+1..s+49
    assert ll["windows"] == len(starts) == 6
    assert ll["ppl"] == pytest.approx(math.exp(sum(means) / len(means)), rel=1e-12)
    uniform = BigramLM(torch.zeros(7, 7, dtype=torch.float64))
    for mode in ("sliding", "longlora"):
        assert perplexity(uniform, ids, lengths=[32], mode=mode, progress=False)[32]["ppl"] \
            == pytest.approx(7.0, rel=1e-12)


def test_documents_max_windows_and_peft(llama):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    a, b, short = torch.randint(0, 640, (200,)), torch.randint(0, 640, (150,)), torch.arange(20)
    res = perplexity(llama, [a, b, short], lengths=[64], progress=False)[64]
    ra = perplexity(llama, a, lengths=[64], progress=False)[64]
    rb = perplexity(llama, b.tolist(), lengths=[64], progress=False)[64]
    expect = (ra["nll"] * ra["tokens"] + rb["nll"] * rb["tokens"]) / (ra["tokens"] + rb["tokens"])
    assert res["nll"] == pytest.approx(expect, rel=1e-6)
    assert (res["documents"], res["skipped_documents"]) == (2, 1)
    assert res["windows"] == ra["windows"] + rb["windows"]
    capped = perplexity(llama, a, lengths=[64], max_windows=2, progress=False)[64]
    assert capped["windows"] == 2 and capped["tokens"] == 63 + 32
    # peft model: matches the reference loop on the adapted model, and differs from the base
    peft_model = get_peft_model(tiny_causal_lm("llama", vocab_size=640),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    peft_model.train()
    got = perplexity(peft_model, a, lengths=[64], progress=False)[64]["ppl"]
    assert peft_model.training  # training flag restored
    peft_model.eval()
    assert got == pytest.approx(hf_guide_ppl(peft_model, a, 64, 32)[0], rel=1e-5)
    assert abs(got - ra["ppl"]) > 1e-3


def test_training_attention_pattern_is_switched_to_full_and_restored():
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def broken(module, q, k, v, mask, **kw):  # stands in for a sparse training pattern
        out, _ = sdpa_attention_forward(module, q, k, v, mask, **kw)
        return torch.zeros_like(out), None

    AttentionInterface.register("petl_test_broken", broken)
    AttentionMaskInterface.register("petl_test_broken", sdpa_mask)
    model = tiny_causal_lm("llama", vocab_size=640)
    ids = torch.randint(0, 640, (160,), generator=torch.Generator().manual_seed(4))
    full = perplexity(model, ids, lengths=[64], progress=False)[64]["ppl"]
    model.set_attn_implementation("petl_test_broken")
    switched = perplexity(model, ids, lengths=[64], progress=False)[64]["ppl"]
    assert model.config._attn_implementation == "petl_test_broken"
    kept = perplexity(model, ids, lengths=[64], full_attention=False, progress=False)[64]["ppl"]
    assert switched == pytest.approx(full, rel=1e-5)
    assert abs(kept - full) > 1e-2


def test_perplexity_errors(llama):
    ids = torch.randint(0, 640, (100,))
    with pytest.raises(ValueError, match="mode must be"):
        perplexity(llama, ids, lengths=[32], mode="strided", progress=False)
    with pytest.raises(ValueError, match="stride must be in"):
        perplexity(llama, ids, lengths=[32], stride=40, progress=False)
    with pytest.raises(ValueError, match="needs >= 289"):
        perplexity(llama, ids, lengths=[32], mode="longlora", progress=False)
    with pytest.raises(ValueError, match="longest document: 100"):
        perplexity(llama, ids, lengths=[128], progress=False)
    with pytest.raises(ValueError, match="1-D"):
        perplexity(llama, torch.zeros(2, 2, 2, dtype=torch.long), lengths=[2], progress=False)


# ---------------------------------------------------------------------------- tokens
def test_load_eval_tokens(tmp_path, tokenizer):
    text = "A held out text. The sky is blue."
    plain = tokenizer(text)["input_ids"]
    assert load_eval_tokens(text, tokenizer).tolist() == plain and plain[0] == 0
    assert load_eval_tokens(text, tokenizer, add_bos=False).tolist() == plain[1:]
    assert load_eval_tokens(text, tokenizer, add_bos=True).tolist() == plain
    (tmp_path / "t.txt").write_text(text)
    assert load_eval_tokens(str(tmp_path / "t.txt"), tokenizer).tolist() == plain
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": text}) + "\n\n"
                                      + json.dumps({"text": "The sun."}) + "\n")
    docs = load_eval_tokens(tmp_path / "d.jsonl", tokenizer)
    assert [d.tolist() for d in docs] == [plain, tokenizer("The sun.")["input_ids"]]
    arr = np.array([1, 65535, 7, 300], dtype=np.uint16)
    arr.tofile(tmp_path / "x.bin")
    got = load_eval_tokens(tmp_path / "x.bin")
    assert got.dtype == torch.long and got.tolist() == [1, 65535, 7, 300]
    np.save(tmp_path / "y.npy", np.arange(5))
    assert load_eval_tokens(str(tmp_path / "y.npy")).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_eval_tokens(str(tmp_path / "missing.txt"), tokenizer)
    with pytest.raises(ValueError, match="tokenizer"):
        load_eval_tokens(text)


# ---------------------------------------------------------------------------- passkey
@pytest.mark.parametrize("length", [72, 101, 157, 400, 1500])
def test_passkey_prompt_length_and_layout(tokenizer, length):
    for key, depth in [(1, 0.0), (4821, 0.5), (50000, 1.0), (123, 0.3)]:
        p = passkey_prompt(tokenizer, length, key, depth)
        assert length - 3 <= len(p.input_ids) <= length
        assert p.input_ids == tokenizer(p.text)["input_ids"]
        lines = p.text.split("\n")
        assert lines[0] == TASK and lines[2] == KEY_LINE.format(key=key) and lines[4] == QUESTION
        assert len(lines[1]) == round(depth * p.filler_chars)
        assert len(lines[1]) + len(lines[3]) == p.filler_chars
        assert FILLER.startswith(lines[1][:len(FILLER)]) and FILLER.startswith(lines[3][:20])
        assert tokenizer.decode(p.answer_ids) == f" {key}"
        full = tokenizer(p.text + f" {key}")["input_ids"]
        assert full == p.input_ids + p.answer_ids
    with pytest.raises(ValueError, match="shorter than the prompt without filler"):
        passkey_prompt(tokenizer, 20, 5, 0.5)


def test_passkey_oracle_constant_and_depth_aware(tokenizer):
    oracle = ScriptedGenerator(tokenizer, lambda text: " " + _key_in(text))
    res = passkey(oracle, tokenizer, lengths=[80, 300], num_tests=4, seed=3, progress=False)
    assert res["accuracy"] == {80: 1.0, 300: 1.0} and res["depths"] == "random"
    assert all(80 - 3 <= r["prompt_tokens"] <= 80 for r in res["records"] if r["length"] == 80)
    constant = ScriptedGenerator(tokenizer, lambda text: " 0")
    assert passkey(constant, tokenizer, lengths=[80], num_tests=5, progress=False)["accuracy"] \
        == {80: 0.0}

    def early_half(text):  # finds the key only when it sits in the first half of the prompt
        return " " + _key_in(text) if text.index("The pass key is") < len(text) / 2 else " 1"

    res = passkey(ScriptedGenerator(tokenizer, early_half), tokenizer, lengths=[400],
                  depths=[0.0, 0.25, 0.75, 1.0], num_tests=3, progress=False)
    assert res["accuracy_by_depth"][400] == {0.0: 1.0, 0.25: 1.0, 0.75: 0.0, 1.0: 0.0}
    assert res["accuracy"][400] == 0.5 and len(res["records"]) == 12


def test_passkey_seeds_are_reproducible(tokenizer):
    oracle = ScriptedGenerator(tokenizer, lambda text: " " + _key_in(text))

    def keys(seed, lengths=(80,)):
        res = passkey(oracle, tokenizer, lengths=list(lengths), num_tests=6, seed=seed,
                      progress=False)
        return [(r["key"], r["key_depth"]) for r in res["records"]]

    a = keys(0)
    assert a == keys(0) and a != keys(1)
    assert all(1 <= k <= 50000 and 0 <= d < 1 for k, d in a)
    assert keys(0, (80, 120)) == a + a  # test i has the same key at every length


def test_passkey_real_model_is_greedy(tokenizer, llama):
    llama.train()
    res = passkey(llama, tokenizer, lengths=[90], num_tests=2, seed=0, progress=False)
    assert llama.training
    llama.eval()
    for rec in res["records"]:
        p = passkey_prompt(tokenizer, 90, rec["key"], rec["key_depth"])
        ids = torch.tensor([p.input_ids])
        with torch.no_grad():
            for _ in range(len(p.answer_ids)):  # greedy decoding without a cache
                ids = torch.cat([ids, llama(ids).logits[:, -1:].argmax(-1)], dim=1)
        assert rec["output_ids"] == ids[0, len(p.input_ids):].tolist()
        assert rec["correct"] == (rec["output_ids"] == p.answer_ids)


# ---------------------------------------------------------------------------- CLI
@pytest.fixture
def fake_loader(monkeypatch, tokenizer, llama):
    """Stand-in for petl.models.load_model (the CLI's only dependency besides petl.eval)."""
    calls = []

    def load_model(name_or_path, *, adapter=None, dtype="auto", trust_remote_code=False,
                   device=None, rope_scaling=None):
        calls.append(dict(name=name_or_path, adapter=adapter, dtype=dtype,
                          rope_scaling=rope_scaling))
        model = llama if name_or_path == "tiny" else ScriptedGenerator(
            tokenizer, lambda text: " " + _key_in(text))
        return model, tokenizer

    monkeypatch.setitem(sys.modules, "petl.models", types.SimpleNamespace(load_model=load_model))
    return calls


def test_cli_perplexity_and_passkey(tmp_path, tokenizer, llama, fake_loader):
    from petl.cli.main import main

    data = tmp_path / "heldout.txt"
    data.write_text(" ".join([FILLER, TASK, QUESTION] * 6))
    out = tmp_path / "ppl.json"
    r = CliRunner().invoke(main, ["eval", "perplexity", "--model", "tiny", "--data", str(data),
                                  "--lengths", "32,64", "--mode", "longlora", "--stride", "16",
                                  "--context-length", "128", "--rope-method", "yarn",
                                  "--json-out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert fake_loader[-1]["rope_scaling"] == {"target_length": 128, "method": "yarn"}
    expect = perplexity(llama, load_eval_tokens(data, tokenizer), lengths=[32, 64],
                        mode="longlora", stride=16, progress=False)
    saved = json.loads(out.read_text())["results"]
    assert saved["64"]["ppl"] == pytest.approx(expect[64]["ppl"], rel=1e-9)
    assert f"{expect[32]['ppl']:.3f}" in r.output and "longlora" in r.output

    r = CliRunner().invoke(main, ["eval", "passkey", "--model", "oracle", "--lengths", "80,120",
                                  "--depths", "0,0.5,1", "--num-tests", "2", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "d=0.5" in r.output and r.output.count("1.00") == 8

    r = CliRunner().invoke(main, ["eval", "perplexity", "--model", "tiny", "--data", str(data),
                                  "--lengths", "32,abc"])
    assert r.exit_code == 2 and "comma-separated integers" in r.output
    r = CliRunner().invoke(main, ["eval", "perplexity", "--model", "tiny", "--data", str(data),
                                  "--lengths", "4096", "--no-progress"])
    assert r.exit_code == 2 and "Error: no sliding window of length 4096" in r.output


@pytest.mark.skipif(importlib.util.find_spec("petl.models") is None,
                    reason="petl.models.load_model not written yet (coordinator)")
def test_cli_with_real_loader_on_saved_tiny_model(tmp_path, tokenizer):
    from petl.cli.main import main

    model = tiny_causal_lm("llama", vocab_size=640)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    data = tmp_path / "heldout.txt"
    data.write_text(" ".join([FILLER, TASK] * 8))
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["eval", "perplexity", "--model", str(tmp_path / "m"), "--data",
                                  str(data), "--lengths", "48", "--dtype", "float32",
                                  "--device", "cpu", "--json-out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    expect = perplexity(model, load_eval_tokens(data, tokenizer), lengths=[48], progress=False)
    assert json.loads(out.read_text())["results"]["48"]["ppl"] == pytest.approx(
        expect[48]["ppl"], rel=1e-5)
