"""tools/make_keyword_audio.py: deterministic clips, the requested noise level, unseen test voices."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "make_keyword_audio.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("make_keyword_audio", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_augment_is_deterministic_and_places_the_word_in_one_second(tool):
    speech = (0.5 * np.sin(np.arange(6000) / 5.0)).astype(np.float32)
    a = tool.augment(speech, np.random.default_rng(7))
    b = tool.augment(speech, np.random.default_rng(7))
    assert a.shape == (16000,) and a.dtype == np.float32 and np.abs(a).max() <= 1.0
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, tool.augment(speech, np.random.default_rng(8)))


def test_noise_colours(tool):
    rng = np.random.default_rng(0)
    spectra = {k: np.abs(np.fft.rfft(tool._noise(k, 16000, rng))) ** 2 for k in ("white", "pink", "brown")}
    low, high = slice(10, 100), slice(4000, 8000)
    ratios = {k: s[low].mean() / s[high].mean() for k, s in spectra.items()}
    assert ratios["white"] < 2 < ratios["pink"] < ratios["brown"]


def test_test_split_speakers_are_unseen(tool):
    assert not set(tool.UNSEEN_VARIANTS) & set(tool.SEEN_VARIANTS)
    assert not set(tool.PRETRAIN_WORDS) & set(tool.ADAPT_WORDS)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_espeak_utterance_is_reproducible(tool):
    first = tool.utterance("marvin", "en-us", "f2", 150, 50)
    assert 0.2 * 16000 < len(first) < 1.2 * 16000 and np.abs(first).max() > 0.05
    np.testing.assert_array_equal(first, tool.utterance("marvin", "en-us", "f2", 150, 50))
