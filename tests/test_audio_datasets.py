"""Data set layouts (local and hub-style) and the evaluation protocols."""
from __future__ import annotations

import pytest

from petl.audio.datasets import (AudioCorpus, AudioExample, DatasetError, load_corpus, load_hub_corpus, per_class,
                                 plan_splits, subsample)
from petl.audio.io import read_audio
from petl.audio.synthetic import tone, write_dataset


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio_layouts")
    return {name: write_dataset(root / name, name, num_classes=2, per_group=1, seconds=0.3)
            for name in ("esc50", "urbansound8k", "speech_commands", "fluent_speech_commands", "folder")}


@pytest.mark.parametrize(("kind", "count", "groups", "names"), [
    ("esc50", 10, {1, 2, 3, 4, 5}, ["class_0", "class_1"]),
    ("urbansound8k", 20, set(range(1, 11)), ["sound_0", "sound_1"]),
    ("speech_commands", 6, {"train", "validation", "test"}, ["word0", "word1"]),
    ("fluent_speech_commands", 6, {"train", "validation", "test"}, ["activate|lights|kitchen", "increase|volume|none"]),
    ("folder", 6, {"train", "validation", "test"}, ["label0", "label1"]),
])
def test_local_layouts(layouts, kind, count, groups, names):
    corpus = load_corpus(kind, str(layouts[kind]))
    assert len(corpus.examples) == count and corpus.label_names == names
    assert {e.group for e in corpus.examples} == groups
    clip = read_audio(corpus.examples[0].audio, 16000)
    assert abs(len(clip) - 0.3 * 16000) <= 1  # ESC-50 clips are 44.1 kHz on disk


def test_speech_commands_lists_decide_the_split(layouts):
    corpus = load_corpus("speech_commands", str(layouts["speech_commands"]))
    listed = (layouts["speech_commands"] / "testing_list.txt").read_text().split()
    tests = sorted(str(e.audio).split("speech_commands/")[-1] for e in corpus.examples if e.group == "test")
    assert tests == sorted(listed)
    assert not any("_background_noise_" in str(e.audio) for e in corpus.examples)


def _fold_corpus(n_folds: int) -> AudioCorpus:
    return AudioCorpus("toy", [AudioExample(f"{f}.wav", f % 2, f) for f in range(1, n_folds + 1)], ["a", "b"])


def test_rotation_reproduces_the_paper_esc50_folds():
    """PETL-AST's ESC-50 lists: train [1,2,3] val [4] test [5]; [2,3,4] [5] [1]; ... ; [5,1,2] [3] [4]."""
    runs = plan_splits(_fold_corpus(5), "rotation", val_folds=1)
    groups = [tuple(sorted(e.group for e in part) for part in (r.train, r.validation, r.test)) for r in runs]
    assert groups == [([1, 2, 3], [4], [5]), ([2, 3, 4], [5], [1]), ([3, 4, 5], [1], [2]),
                      ([1, 4, 5], [2], [3]), ([1, 2, 5], [3], [4])]
    assert [r.name for r in runs] == [f"fold-{i}" for i in range(1, 6)]
    for run in plan_splits(_fold_corpus(10), "rotation", val_folds=0):  # the paper's US8K: 9 / 0 / 1
        assert len(run.train) == 9 and not run.validation and len(run.test) == 1
    us8k = plan_splits(_fold_corpus(10), "rotation", val_folds=1, runs=[1, 10])
    assert [e.group for e in us8k[0].test] == [10] and [e.group for e in us8k[0].validation] == [9]
    assert [e.group for e in us8k[1].test] == [9] and len(us8k[1].train) == 8


def test_protocol_errors_are_one_line(layouts):
    esc = load_corpus("esc50", str(layouts["esc50"]))
    with pytest.raises(DatasetError, match="no official train/test split"):
        plan_splits(esc, "official")
    with pytest.raises(DatasetError, match="out of range"):
        plan_splits(esc, "rotation", runs=[6])
    with pytest.raises(DatasetError, match="at least"):
        plan_splits(_fold_corpus(2), "rotation")
    with pytest.raises(DatasetError, match="meta/esc50.csv"):
        load_corpus("esc50", str(layouts["folder"]))
    with pytest.raises(DatasetError, match="unknown audio data set"):
        load_corpus("audioset", str(layouts["folder"]))


def test_few_shot_and_subsample():
    examples = [AudioExample(str(i), i % 3, "train") for i in range(30)]
    few = per_class(examples, 2)
    assert [e.audio for e in few] == ["0", "1", "2", "3", "4", "5"]
    sub = subsample(examples, 7, seed=1)
    assert len(sub) == 7 and sub == subsample(examples, 7, seed=1) and sub == sorted(sub, key=lambda e: int(e.audio))
    assert subsample(examples, None, 0) is examples


def test_hub_style_dataset_with_undecoded_audio(tmp_path):
    """A hub data set (here a local parquet repo in ashraq/esc50's columns) read without decoding."""
    import io

    import datasets
    import soundfile as sf

    def wav_bytes(k: int) -> bytes:
        buffer = io.BytesIO()
        sf.write(buffer, tone(k, 0.2), 16000, format="WAV")
        return buffer.getvalue()

    rows = {"audio": [{"bytes": wav_bytes(k), "path": f"{k}.wav"} for k in (0, 1, 1)],
            "fold": [1, 2, 3], "target": [4, 7, 7], "category": ["dog", "rain", "rain"]}
    table = datasets.Dataset.from_dict(rows).cast_column("audio", datasets.Audio(decode=False))
    (tmp_path / "data").mkdir()
    table.to_parquet(str(tmp_path / "data" / "train-00000.parquet"))
    corpus = load_hub_corpus("esc50", str(tmp_path))
    assert corpus.label_names == ["dog", "rain"] and [e.label for e in corpus.examples] == [0, 1, 1]
    assert [e.group for e in corpus.examples] == [1, 2, 3]
    assert len(read_audio(corpus.examples[0].audio, 16000)) == 3200
    with pytest.raises(DatasetError, match="cannot load audio data set"):
        load_hub_corpus("esc50", str(tmp_path / "missing-repo"))
