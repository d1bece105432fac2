"""Generate a small spoken-keyword data set offline with espeak-ng (deterministic for a seed).

    apt-get install espeak-ng            # Debian / Ubuntu; the only requirement besides numpy/scipy/soundfile
    python tools/make_keyword_audio.py --out data/keywords

Two disjoint word sets, each in the ``folder`` layout petl's audio runner reads
(``<split>/<word>/<clip>.wav``, 16 kHz mono, 1 s):

* ``pretrain/``: 20 command words (Speech Commands' core words) to pretrain a small AST on;
* ``adapt/``: 10 held-out words the pretrained AST has never heard, to adapt to with each method.

Each clip is an espeak-ng utterance (random English accent, voice variant, speaking rate and
pitch; 2-4 clips are cut from each) with a speed change (resampling, 0.85-1.15x), a random
position in the 1 s window, a random gain, and white / pink / brown noise at 5-25 dB SNR. The
adapt test split uses voice variants that no training or validation clip uses (unseen speakers).
The same seed and espeak-ng version give byte-identical files; ``manifest.json`` records the
settings and a digest of every clip.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

PRETRAIN_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go",
                  "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ADAPT_WORDS = ("bed", "bird", "cat", "dog", "happy", "house", "marvin", "sheila", "tree", "wow")
ACCENTS = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029")
SEEN_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "f1", "f2", "f3", "klatt", "klatt3")
UNSEEN_VARIANTS = ("m6", "m7", "f4", "f5", "klatt2")
#: clips per word in each split
SIZES = {"pretrain": {"train": 96, "validation": 8, "test": 8}, "adapt": {"train": 16, "validation": 8, "test": 16}}
#: augmented clips cut from each espeak-ng utterance (more for pretraining: cheap extra variety)
COPIES = {"pretrain": {"train": 4, "validation": 2, "test": 2}, "adapt": {"train": 2, "validation": 2, "test": 2}}
RATE = 16000
SECONDS = 1.0


def _espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        sys.exit("espeak-ng is not installed; run `apt-get install espeak-ng` (or your system's package)")
    return exe


def utterance(word: str, accent: str, variant: str, wpm: int, pitch: int) -> np.ndarray:
    """espeak-ng's waveform of ``word`` resampled to 16 kHz (float32 in [-1, 1])."""
    import soundfile as sf

    from petl.audio.io import resample

    wav = subprocess.run([_espeak(), "-v", f"{accent}+{variant}", "-s", str(wpm), "-p", str(pitch), "--stdout",
                          word], check=True, capture_output=True).stdout
    data, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return resample(data, rate, RATE)


def _noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    white = rng.standard_normal(n)
    if kind == "white":
        return white
    spectrum = np.fft.rfft(white)
    freqs = np.maximum(np.fft.rfftfreq(n), 1.0 / n)
    shaped = np.fft.irfft(spectrum / (np.sqrt(freqs) if kind == "pink" else freqs), n)
    return shaped / (shaped.std() + 1e-12)


def augment(speech: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Speed change, random placement in a 1 s window, gain and coloured noise at a random SNR."""
    from petl.audio.io import resample

    speed = rng.uniform(0.85, 1.15)
    speech = resample(speech, int(round(RATE * speed)), RATE)  # played faster: fewer samples
    length = int(RATE * SECONDS)
    if len(speech) > length:
        start = (len(speech) - length) // 2
        speech = speech[start:start + length]
    clip = np.zeros(length, dtype=np.float64)
    offset = int(rng.integers(0, length - len(speech) + 1))
    clip[offset:offset + len(speech)] = speech
    clip *= rng.uniform(0.3, 0.9) / (np.abs(clip).max() + 1e-9)
    snr_db = rng.uniform(5.0, 25.0)
    noise = _noise(str(rng.choice(["white", "pink", "brown"])), length, rng)
    speech_power = np.mean(clip[offset:offset + len(speech)] ** 2)  # SNR over the spoken part
    clip += noise * np.sqrt(speech_power / 10 ** (snr_db / 10))
    return np.clip(clip, -1.0, 1.0).astype(np.float32)


def generate(out: Path, seed: int = 0) -> dict:
    """Write the data set under ``out`` and return its manifest (also written as manifest.json)."""
    from petl.audio.io import write_audio

    digests: dict[str, str] = {}
    for part, words in (("pretrain", PRETRAIN_WORDS), ("adapt", ADAPT_WORDS)):
        for split, count in SIZES[part].items():
            variants = UNSEEN_VARIANTS if (part, split) == ("adapt", "test") else SEEN_VARIANTS
            for w, word in enumerate(words):
                key = [seed, ("pretrain", "adapt").index(part), ("train", "validation", "test").index(split), w]
                rng = np.random.default_rng(np.random.SeedSequence(key))
                copies = COPIES[part][split]
                for i in range(0, count, copies):
                    speech = utterance(word, str(rng.choice(ACCENTS)), str(rng.choice(variants)),
                                       int(rng.integers(110, 200)), int(rng.integers(25, 80)))
                    for j in range(min(copies, count - i)):
                        path = write_audio(out / part / split / word / f"{word}_{i + j:03d}.wav",
                                           augment(speech, rng), RATE)
                        digests[str(path.relative_to(out))] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    version = subprocess.run([_espeak(), "--version"], capture_output=True, text=True).stdout.strip()
    manifest = {"seed": seed, "espeak_ng": version, "sample_rate": RATE, "seconds": SECONDS,
                "pretrain_words": PRETRAIN_WORDS, "adapt_words": ADAPT_WORDS, "sizes": SIZES, "copies": COPIES,
                "accents": ACCENTS, "seen_variants": SEEN_VARIANTS, "unseen_variants_adapt_test": UNSEEN_VARIANTS,
                "clips": len(digests),
                "digest": hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/keywords"), help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="regenerate even if the folder exists")
    args = parser.parse_args(argv)
    if (args.out / "manifest.json").is_file() and not args.force:
        print(f"{args.out} already holds the data set (pass --force to regenerate)")
        return
    shutil.rmtree(args.out, ignore_errors=True)
    manifest = generate(args.out, args.seed)
    print(f"wrote {manifest['clips']} clips to {args.out} (digest {manifest['digest'][:16]})")


if __name__ == "__main__":
    main()
