"""AST input features: Kaldi-compatible log-mel filter banks in PyTorch, padded and normalised.

This is the feature of transformers' ``ASTFeatureExtractor`` (Kaldi ``fbank`` with a Hanning window,
25 ms frames every 10 ms, 512-point FFT, pre-emphasis 0.97, DC removal, no dither, 128 mel bins
from 20 Hz to Nyquist on Kaldi's mel scale, natural log floored at float32 eps), then zero-padded
or cut to ``max_frames`` and normalised with AudioSet's mean and std as ``(x - mean) / (2 std)``.

Why a torch version: the extractor uses torchaudio when installed and a per-clip numpy loop
otherwise; this one needs neither, batches clips, and runs on the GPU. Tests compare it with the
extractor's numpy path and with a hand-checked tone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

AUDIOSET_MEAN = -4.2677393
AUDIOSET_STD = 4.5689974
FRAME_LENGTH = 400  # 25 ms at 16 kHz
FRAME_SHIFT = 160  # 10 ms
N_FFT = 512  # Kaldi rounds the frame length up to a power of two
PREEMPHASIS = 0.97
LOW_FREQ = 20.0
EPS = float(np.finfo(np.float32).eps)


def kaldi_mel(freq: torch.Tensor) -> torch.Tensor:
    """Kaldi's mel scale: ``1127 ln(1 + f / 700)``."""
    return 1127.0 * torch.log1p(freq / 700.0)


@lru_cache(maxsize=8)
def mel_banks(num_mel_bins: int, sample_rate: int = 16000, n_fft: int = N_FFT,
              low_freq: float = LOW_FREQ) -> torch.Tensor:
    """``[num_mel_bins, n_fft // 2 + 1]`` triangular filters, triangular on the mel axis (Kaldi).

    Bin k of the FFT sits at ``k * sr / n_fft``; the Nyquist column gets weight 0, as in Kaldi.
    """
    nyquist = sample_rate / 2
    mel_low, mel_high = kaldi_mel(torch.tensor(low_freq, dtype=torch.float64)), \
        kaldi_mel(torch.tensor(nyquist, dtype=torch.float64))
    step = (mel_high - mel_low) / (num_mel_bins + 1)
    left = mel_low + step * torch.arange(num_mel_bins, dtype=torch.float64)[:, None]  # [M, 1]
    center, right = left + step, left + 2 * step
    fft_mel = kaldi_mel(torch.arange(n_fft // 2, dtype=torch.float64) * sample_rate / n_fft)[None]  # [1, K]
    up = (fft_mel - left) / (center - left)
    down = (right - fft_mel) / (right - center)
    weights = torch.clamp(torch.minimum(up, down), min=0.0)
    return torch.cat([weights, torch.zeros(num_mel_bins, 1, dtype=torch.float64)], dim=1).float()


def fbank(wave: torch.Tensor, num_mel_bins: int = 128, sample_rate: int = 16000) -> torch.Tensor:
    """Kaldi log-mel filter banks of ``wave``: ``[N]`` or ``[B, N]`` -> ``[frames, M]`` or ``[B, frames, M]``.

    ``frames = 1 + (N - 400) // 160`` (Kaldi's ``snip_edges``); clips shorter than one frame give 0 frames.
    """
    squeeze = wave.dim() == 1
    wave = (wave[None] if squeeze else wave).float()
    if wave.shape[-1] < FRAME_LENGTH:
        out = wave.new_zeros(wave.shape[0], 0, num_mel_bins)
        return out[0] if squeeze else out
    frames = wave.unfold(-1, FRAME_LENGTH, FRAME_SHIFT)  # [B, T, 400]
    frames = frames - frames.mean(dim=-1, keepdim=True)  # remove DC offset per frame
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)  # Kaldi replicates sample 0
    frames = frames - PREEMPHASIS * previous
    window = torch.hann_window(FRAME_LENGTH, periodic=False, dtype=frames.dtype, device=frames.device)
    spectrum = torch.fft.rfft(frames * window, n=N_FFT).abs().pow(2)  # [B, T, 257]
    banks = mel_banks(num_mel_bins, sample_rate).to(spectrum.device)
    out = torch.clamp(spectrum @ banks.T, min=EPS).log()  # [B, T, M]
    return out[0] if squeeze else out


@dataclass
class AstFeaturizer:
    """Waveform(s) -> AST ``input_values`` ``[max_frames, num_mel_bins]`` (or batched).

    Args:
        num_mel_bins (int): mel bands; must equal the model's ``config.num_mel_bins``. Default: 128.
        max_frames (int): frames per example (pad with zeros / cut), the model's ``max_length``.
            Default: 1024.
        mean, std (float): normalisation statistics. Default: AudioSet's.
        sample_rate (int): rate of the waveforms. Default: 16000.
    """

    num_mel_bins: int = 128
    max_frames: int = 1024
    mean: float = AUDIOSET_MEAN
    std: float = AUDIOSET_STD
    sample_rate: int = 16000

    def __post_init__(self) -> None:
        if self.max_frames < 1 or self.num_mel_bins < 1:
            raise ValueError(f"max_frames and num_mel_bins must be >= 1, got {self.max_frames}, {self.num_mel_bins}")
        if not math.isfinite(self.std) or self.std <= 0:
            raise ValueError(f"normalisation std must be > 0, got {self.std}")

    def __call__(self, wave: np.ndarray | torch.Tensor) -> torch.Tensor:
        wave = torch.as_tensor(np.asarray(wave, dtype=np.float32) if not torch.is_tensor(wave) else wave)
        feats = fbank(wave, self.num_mel_bins, self.sample_rate)  # [..., T, M]
        frames = feats.shape[-2]
        if frames < self.max_frames:  # zero-pad *before* normalising, as ASTFeatureExtractor does
            pad = feats.new_zeros(*feats.shape[:-2], self.max_frames - frames, self.num_mel_bins)
            feats = torch.cat([feats, pad], dim=-2)
        feats = feats[..., :self.max_frames, :]
        return (feats - self.mean) / (2 * self.std)
