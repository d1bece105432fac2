"""Audio pipeline pieces: decoding, resampling, Kaldi filter banks, SpecAugment, positional embeddings."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from petl.audio.augment import SpecAugment
from petl.audio.features import AstFeaturizer, fbank, kaldi_mel, mel_banks
from petl.audio.io import read_audio, resample, write_audio
from petl.audio.synthetic import tone


def _sine(freq: float, rate: int, seconds: float = 1.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resample_matches_the_analytic_sine(rate):
    got = resample(_sine(1000.0, rate), rate, 16000)
    want = _sine(1000.0, 16000)
    assert got.shape == want.shape and got.dtype == np.float32
    inner = slice(200, -200)  # the FIR's edge transient aside
    assert np.abs(got[inner] - want[inner]).max() < 2e-3


@pytest.mark.parametrize("suffix", [".wav", ".flac", ".ogg", ".mp3"])
def test_read_audio_formats_mono_and_bytes(tmp_path, suffix):
    import soundfile as sf

    stereo = np.stack([_sine(500.0, 22050), _sine(500.0, 22050)], axis=1)
    path = tmp_path / f"clip{suffix}"
    sf.write(str(path), stereo, 22050)
    from_path = read_audio(path, 16000)
    from_bytes = read_audio({"bytes": path.read_bytes(), "path": None}, 16000)
    assert from_path.ndim == 1 and abs(len(from_path) - 16000) <= 1152  # mp3 adds encoder padding
    np.testing.assert_array_equal(from_path, from_bytes)
    if suffix in (".wav", ".flac"):  # lossless: the sine survives 16-bit PCM and resampling
        assert np.abs(from_path[200:-200] - _sine(500.0, 16000)[200:-200]).max() < 2e-3
    with pytest.raises(ValueError, match="cannot decode audio"):
        read_audio(b"not audio at all", 16000)


def test_write_audio_round_trip(tmp_path):
    wave = tone(1, 0.5)
    back = read_audio(write_audio(tmp_path / "a" / "t.wav", wave), 16000)
    assert np.abs(back - wave).max() < 1 / 2**15 + 1e-6


def test_fbank_equals_transformers_ast_feature_extractor():
    """Same features as ASTFeatureExtractor (its torchaudio-free numpy path), padding and cutting included."""
    from transformers import ASTFeatureExtractor

    rng = np.random.default_rng(0)
    for seconds, frames in ((2.0, 150), (0.7, 100), (1.3, 128)):
        wave = (tone(2, seconds, seed=1) + 0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)
        want = ASTFeatureExtractor(max_length=frames)(wave, sampling_rate=16000, return_tensors="np")["input_values"][0]
        got = AstFeaturizer(max_frames=frames)(wave).numpy()
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)  # float32 here vs float64 there


def test_fbank_peaks_in_the_mel_band_of_a_tone():
    """Hand check: a 1 kHz tone peaks in the filter whose centre is nearest to 1 kHz on Kaldi's mel scale."""
    feats = fbank(torch.from_numpy(_sine(1000.0, 16000)))
    assert feats.shape == (1 + (16000 - 400) // 160, 128)
    mel_lo, mel_hi = kaldi_mel(torch.tensor(20.0)), kaldi_mel(torch.tensor(8000.0))
    centres = mel_lo + (mel_hi - mel_lo) / 129 * torch.arange(1, 129)
    expected = int((centres - kaldi_mel(torch.tensor(1000.0))).abs().argmin())
    assert int(feats.mean(0).argmax()) == expected
    banks = mel_banks(128)
    assert banks.shape == (128, 257) and torch.all(banks[:, -1] == 0) and float(banks.max()) <= 1.0


def test_fbank_batches_and_short_clips():
    waves = torch.from_numpy(np.stack([tone(0, 0.5, seed=1), tone(3, 0.5, seed=2)]))
    batched = fbank(waves)
    torch.testing.assert_close(batched[1], fbank(waves[1]))
    assert fbank(torch.zeros(100)).shape == (0, 128)
    silent = AstFeaturizer(max_frames=20)(np.zeros(100, dtype=np.float32))
    torch.testing.assert_close(silent, torch.full((20, 128), 4.2677393 / (2 * 4.5689974)))


def test_specaugment_masks_one_band_of_each_kind():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(100, 128) + 5.0  # no natural zeros
    out = SpecAugment(freq_mask=24, time_mask=80)(feats, generator=gen)
    zero_cols = (out == 0).all(dim=0).nonzero().flatten()
    zero_rows = (out == 0).all(dim=1).nonzero().flatten()
    assert len(zero_cols) < 24 and len(zero_rows) < 80
    for idx in (zero_cols, zero_rows):  # each mask is one contiguous band
        assert len(idx) == 0 or int(idx[-1] - idx[0]) == len(idx) - 1
    untouched = torch.ones_like(out, dtype=torch.bool)
    untouched[:, zero_cols] = False
    untouched[zero_rows] = False
    assert torch.equal(out[untouched], feats[untouched])
    assert not SpecAugment().active and torch.equal(SpecAugment()(feats), feats)
    widths = [int((SpecAugment(freq_mask=24)(feats) == 0).all(0).sum()) for _ in range(200)]
    assert max(widths) <= 23 and min(widths) == 0 and np.mean(widths) == pytest.approx(11.5, abs=2.5)


def test_position_embeddings_interpolate_or_zero(tmp_path):
    from petl.audio.backbone import load_ast_classifier, resize_position_embeddings
    from petl.audio.synthetic import save_tiny_ast

    save_tiny_ast(tmp_path / "ast", max_length=1024)
    model = load_ast_classifier(str(tmp_path / "ast"), ["a", "b", "c"])
    table = model.audio_spectrogram_transformer.embeddings.position_embeddings.detach().clone()  # [1, 2+12*101, D]
    resize_position_embeddings(model, 1024 // 2 + 6, "interpolate")  # 518 frames -> 51 time patches
    new = model.audio_spectrogram_transformer.embeddings.position_embeddings
    assert new.shape == (1, 2 + 12 * 51, 32) and model.config.max_length == 518
    torch.testing.assert_close(new[:, :2], table[:, :2])
    grid_old, grid_new = table[0, 2:].reshape(12, 101, -1), new[0, 2:].reshape(12, 51, -1)
    # bilinear with align_corners=False: new column j samples old position (j + 0.5) * 101 / 51 - 0.5
    pos = (torch.arange(51) + 0.5) * 101 / 51 - 0.5
    lo = pos.floor().long().clamp(0, 100)
    hi = (lo + 1).clamp(max=100)
    w = (pos - lo).clamp(0, 1)[None, :, None]
    torch.testing.assert_close(grid_new, grid_old[:, lo] * (1 - w) + grid_old[:, hi] * w, rtol=1e-5, atol=1e-6)
    out = model(input_values=torch.randn(1, 518, 128)).logits
    assert out.shape == (1, 3)
    faithful = load_ast_classifier(str(tmp_path / "ast"), ["a", "b"], max_frames=100, pos_embed="zero")
    zeros = faithful.audio_spectrogram_transformer.embeddings.position_embeddings
    assert zeros.shape == (1, 2 + 12 * 9, 32) and not zeros.any()
    with pytest.raises(ValueError, match="shorter than one patch"):
        resize_position_embeddings(faithful, 8)
