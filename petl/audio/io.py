"""Reading audio (wav / flac / mp3 / ogg through soundfile) and resampling it to the model's rate.

soundfile (libsndfile) decodes every format AST data sets use, without torchaudio or ffmpeg;
libsndfile >= 1.1 reads mp3. Resampling uses scipy's polyphase filter (``resample_poly``: a
Kaiser-windowed FIR at the exact rational ratio), which is what petl's tests check.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Union

import numpy as np

AudioSource = Union[str, Path, bytes, dict]


def _soundfile():
    try:
        import soundfile
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("reading audio needs soundfile; install it with `pip install petl-toolkit[audio]` "
                          "(or `pip install soundfile`)") from None
    return soundfile


def read_audio(source: AudioSource, sample_rate: int = 16000) -> np.ndarray:
    """Decode ``source`` to a mono float32 waveform at ``sample_rate``.

    Args:
        source: a file path, the file's bytes, or a hub record ``{"bytes": ..., "path": ...}``
            (what ``datasets.Audio(decode=False)`` yields).
        sample_rate (int): output rate in Hz. Default: 16000 (AST).

    Returns:
        ``[N]`` float32 in [-1, 1] (channels averaged).
    """
    sf = _soundfile()
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
        if source is None:
            raise ValueError("audio record has neither 'bytes' nor 'path'; load the column with "
                             "datasets.Audio(decode=False)")
    handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        data, rate = sf.read(handle, dtype="float32", always_2d=True)  # [N, channels]
    except (RuntimeError, sf.LibsndfileError) as exc:
        where = "<bytes>" if isinstance(handle, io.BytesIO) else handle
        raise ValueError(f"cannot decode audio {where}: {exc}; convert it to wav or flac") from None
    return resample(data.mean(axis=1), rate, sample_rate)


def resample(wave: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Polyphase resampling of ``wave`` (``[N]``) from ``orig_rate`` to ``new_rate`` Hz (float32 out)."""
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} -> {new_rate}")
    wave = np.asarray(wave, dtype=np.float32)
    if orig_rate == new_rate:
        return wave
    from scipy.signal import resample_poly

    g = math.gcd(int(orig_rate), int(new_rate))
    return resample_poly(wave, new_rate // g, orig_rate // g).astype(np.float32)


def write_audio(path: Union[str, Path], wave: np.ndarray, sample_rate: int = 16000) -> Path:
    """Write a mono float waveform as 16-bit PCM (format from the suffix: .wav, .flac, ...)."""
    sf = _soundfile()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(np.asarray(wave, dtype=np.float32), -1.0, 1.0), sample_rate, subtype="PCM_16")
    return path
