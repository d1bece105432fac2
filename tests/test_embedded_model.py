"""The embedded base model loads offline, tokenizes losslessly and is genuinely trained.

Reference numbers come from ``petl/assets/shakespeare_llama/eval_results.json`` (written by
``tools/train_embedded_model.py --stage eval`` on CPU, fp32) and the model card. Perplexity is
recomputed here in float64 from raw logits, independently of the model's own loss.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from petl.embedded import (EMBEDDED_MODEL_NAME, EMBEDDED_NATIVE_CONTEXT, embedded_model_path,
                           heldout_text_path, is_embedded, resolve_model_name, train_text_path)

SLICE_WINDOWS = 16  # same slice as eval_results.json's "slice_ppl_256"
MAX_SAFETENSORS_BYTES = 16_000_000


@pytest.fixture(scope="module", autouse=True)
def offline():
    """Every load in this file must work with the hub unreachable."""
    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    yield
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def tokenizer(offline):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_path())


@pytest.fixture(scope="module")
def model(offline):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(embedded_model_path(), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference():
    """CPU fp32 numbers recorded when the model was built."""
    return json.loads((embedded_model_path() / "eval_results.json").read_text())["cpu_fp32"]


@pytest.fixture(scope="module")
def heldout_ids(tokenizer):
    text = heldout_text_path().read_text(encoding="utf-8")
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])  # [N]


def window_batch(ids: torch.Tensor, length: int, windows: int) -> torch.Tensor:
    """The first ``windows`` non-overlapping windows of ``length`` tokens: [W, L]."""
    return ids[: windows * length].view(windows, length)


def float64_perplexity(logits: torch.Tensor, x: torch.Tensor) -> float:
    """Loss on tokens 2..L of each window, token-weighted, float64 log-softmax.

    Args:
        logits (Tensor [W, L, V]): model outputs for the windows ``x`` (LongTensor [W, L]).
    """
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)  # [W, L-1, V]
    nll = -logp.gather(-1, x[:, 1:, None]).squeeze(-1)  # [W, L-1]
    return math.exp(nll.mean().item())


@pytest.fixture(scope="module")
def native_slice(model, heldout_ids):
    """Float64 perplexity and the model's own loss on SLICE_WINDOWS windows of 256."""
    x = window_batch(heldout_ids, 256, SLICE_WINDOWS)
    with torch.no_grad():
        out = model(input_ids=x, labels=x)
    return float64_perplexity(out.logits, x), out.loss.item(), x


def test_files_config_and_size():
    from transformers import AutoConfig

    path = embedded_model_path()
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "llama"
    assert config.max_position_embeddings == EMBEDDED_NATIVE_CONTEXT == 256
    assert config.num_key_value_heads < config.num_attention_heads  # GQA
    assert config.rope_parameters["rope_type"] == "default"
    assert (path / "model.safetensors").stat().st_size <= MAX_SAFETENSORS_BYTES
    assert heldout_text_path().stat().st_size < 1_500_000
    assert train_text_path().stat().st_size > 300_000


def test_alias_resolution():
    path = embedded_model_path()
    assert is_embedded(EMBEDDED_MODEL_NAME) and is_embedded(path) and is_embedded(str(path))
    assert not is_embedded("meta-llama/Llama-2-7b-hf") and not is_embedded(None)
    assert not is_embedded(path.parent)
    assert resolve_model_name(EMBEDDED_MODEL_NAME) == str(path)
    assert resolve_model_name("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"


def test_tokenizer_round_trip_and_specials(tokenizer):
    assert len(tokenizer) == 4096
    specials = {tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
                tokenizer.pad_token_id}
    assert None not in specials and len(specials) == 4
    texts = ["Ham.\nTo be, or not to be: that is the question:\n",
             "  leading spaces, trailing tabs\t\n\n\nand blank lines",
             "Non-ASCII survives: café, naïve, “quotes”, 1623 — 東京"]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id  # Llama-style BOS
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    # BPE actually merges: common English words are single tokens.
    assert len(tokenizer(" the king", add_special_tokens=False)["input_ids"]) == 2


def test_text_splits_are_long_and_disjoint(heldout_ids, tokenizer):
    assert heldout_ids.numel() >= 60_000  # >= 58 windows of 1024 for the 4x evaluation
    heldout = heldout_text_path().read_text(encoding="utf-8")
    train = train_text_path().read_text(encoding="utf-8")
    for title in ("HAMLET, PRINCE OF DENMARK\n", "TWELFTH NIGHT; OR, WHAT YOU WILL\n",
                  "THE TEMPEST\n"):
        assert title in heldout and title not in train
    # The quickstart fine-tunes at 1024 tokens: each play of the sample must be longer.
    titles = ["MACBETH\n", "ROMEO AND JULIET\n", "A MIDSUMMER NIGHT'S DREAM\n",
              "OTHELLO, THE MOOR OF VENICE\n"]
    starts = [0] + [train.index("\n\n\n" + t) for t in titles[1:]] + [len(train)]
    assert train.startswith(titles[0])
    for begin, end in zip(starts[:-1], starts[1:]):
        assert len(tokenizer(train[begin:end], add_special_tokens=False)["input_ids"]) > 1024


def test_heldout_perplexity_is_trained_and_matches_card(model, tokenizer, native_slice,
                                                        reference):
    ppl, hf_loss, x = native_slice
    # transformers' shifted loss is an independent implementation of the same protocol.
    assert math.isclose(ppl, math.exp(hf_loss), rel_tol=1e-4)
    # Reproduces the recorded number (fp32 on CPU; small slack for BLAS differences).
    assert ppl == pytest.approx(reference["slice_ppl_256"], rel=0.01)
    assert ppl < 70  # model card: 60.66 on this slice, 62.66 on the whole held-out set
    # Far below the add-one unigram baseline estimated here from the shipped training sample.
    train_ids = tokenizer(train_text_path().read_text(encoding="utf-8"),
                          add_special_tokens=False)["input_ids"]
    counts = torch.bincount(torch.tensor(train_ids), minlength=model.config.vocab_size).double()
    logp = torch.log((counts + 1) / (counts.sum() + counts.numel()))
    unigram_ppl = math.exp(-logp[x[:, 1:]].mean().item())
    assert ppl < unigram_ppl / 4, (ppl, unigram_ppl)


def test_quality_degrades_past_native_context(model, heldout_ids, native_slice):
    """Without context extension the model is worse at 4x its native length (model card: 62.7 ->
    132.8 on the whole held-out set); this is the gap the long-context quickstart closes."""
    x = window_batch(heldout_ids, 1024, SLICE_WINDOWS // 4)  # the same 4096 tokens
    with torch.no_grad():
        ppl_4x = float64_perplexity(model(input_ids=x).logits, x)
    assert ppl_4x > 1.3 * native_slice[0], (native_slice[0], ppl_4x)


def test_missing_asset_error_names_the_fix(monkeypatch, tmp_path):
    import petl.embedded as embedded

    monkeypatch.setattr(embedded, "_asset_dir", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match="reinstall petl-toolkit"):
        embedded.embedded_model_path()
