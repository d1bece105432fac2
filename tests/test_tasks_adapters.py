"""Dataset adapters (hub loading mocked, local files, credentialed formats) and the task section schema."""
from __future__ import annotations

import csv

import datasets
import pytest

from petl.tasks.loading import load_task_split
from petl.train.recipe_io import recipe_from_dict
from petl.train.schema_types import RecipeError


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from petl.tasks.testing import write_benchmark_files

    return write_benchmark_files(tmp_path_factory.mktemp("bench"))


@pytest.fixture
def fake_hub(monkeypatch, files):
    """datasets.load_dataset for hub ids: records the call and serves the fixture records."""
    import json

    calls = []
    by_id = {"coastalcph/lex_glue": None, "FiscalNote/billsum": "billsum", "theatticusproject/cuad-qa": "cuad",
             "qiaojin/PubMedQA": "pubmedqa", "GBaker/MedQA-USMLE-4-options": "medqa"}
    real = datasets.load_dataset

    def load_dataset(path, name=None, split=None, **kwargs):
        if path not in by_id:
            return real(path, name=name, split=split, **kwargs)
        calls.append((path, name, split))
        key = by_id[path] or f"lexglue/{name}"
        rows = [json.loads(line) for line in files[key].read_text().splitlines()]
        if key == "lexglue/ledgar":  # the hub copy carries ClassLabel names
            names = [f"provision-{i}" for i in range(100)]
            feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
            return datasets.Dataset.from_list(rows, features=feats)
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def recipe(**task):
    split = task.pop("split", "train")
    source = task.pop("source", None)
    data = {"split": split, **({"source": str(source)} if source else {})}
    return recipe_from_dict({"task": task, "data": data})


@pytest.mark.parametrize("dataset, config", [("lexglue/ecthr_a", "ecthr_a"), ("lexglue/scotus", "scotus"),
                                             ("lexglue/eurlex", "eurlex"), ("lexglue/unfair_tos", "unfair_tos")])
def test_lexglue_classification_from_the_hub(fake_hub, dataset, config):
    task = recipe(type="sequence_classification", dataset=dataset, eval_split="test")
    records, labels = load_task_split(task, "eval")
    assert fake_hub == [("coastalcph/lex_glue", config, "test")]
    assert labels.num_labels == {"ecthr_a": 10, "scotus": 14, "eurlex": 100, "unfair_tos": 8}[config]
    assert labels.multi_label == (config != "scotus")
    assert labels.none_class == (config in ("ecthr_a", "unfair_tos"))  # LexGLUE adds "no label" only there
    assert set(records.column_names) == {"text", "text_pair", "labels"}
    if config == "ecthr_a":  # the list of fact paragraphs becomes blank-line paragraphs
        assert "\n\nSection 2." in records[0]["text"] and labels.names[0] == "Article 2"


def test_ledgar_label_names_come_from_the_hub_classlabel(fake_hub):
    records, labels = load_task_split(recipe(type="sequence_classification", dataset="lexglue/ledgar"), "train")
    assert labels.names[3] == "provision-3" and records[1]["labels"] == 3 and not labels.multi_label


def test_multiple_choice_qa_and_generative_adapters(fake_hub):
    mc, _ = load_task_split(recipe(type="multiple_choice", dataset="lexglue/case_hold"), "train")
    assert len(mc[0]["choices"]) == 5 and mc[0]["question"] == "" and "<HOLDING>" in mc[0]["context"]
    qa, _ = load_task_split(recipe(type="extractive_qa", dataset="cuad"), "train")
    first = qa[0]
    assert first["context"][first["answers"]["answer_start"][0]:].startswith(first["answers"]["text"][0])
    assert qa[1]["answers"]["text"] == []
    summ, _ = load_task_split(recipe(type="generative", dataset="billsum"), "train")
    assert summ[0]["instruction"] == "Summarize the following bill." and summ[0]["answer"] == -1
    medqa, labels = load_task_split(recipe(type="generative", dataset="medqa"), "train")
    assert "\nA. " in medqa[0]["instruction"] and medqa[1]["output"] == "B" and medqa[1]["answer"] == 1
    assert labels.answer_choices == ["A", "B", "C", "D"]
    pubmed, labels = load_task_split(recipe(type="sequence_classification", dataset="pubmedqa"), "train")
    assert ("qiaojin/PubMedQA", "pqa_labeled", "train") in fake_hub
    assert pubmed[0]["text"].startswith("BACKGROUND: ") and pubmed[0]["text_pair"] == "Does aspirin help?"
    assert labels.names == ["yes", "no", "maybe"] and pubmed["labels"] == [0, 1, 2, 0, 1, 2]


def test_local_copy_in_the_hub_format_and_the_train_eval_leak_guard(files):
    local = recipe(type="sequence_classification", dataset="lexglue/scotus", source=files["lexglue/scotus"])
    records, _ = load_task_split(local, "train")
    assert len(records) == 6
    with pytest.raises(RecipeError, match="would score the training records; set task.eval_source"):
        load_task_split(local, "eval")
    sliced = recipe(type="sequence_classification", dataset="lexglue/scotus", source=files["lexglue/scotus"],
                    split="train[:4]", eval_split="train[4:]")
    assert len(load_task_split(sliced, "eval", load_task_split(sliced, "train")[1])[0]) == 2


def test_credentialed_sets_need_a_local_source():
    with pytest.raises(RecipeError, match="'mednli' has no hub copy \\(credentialed"):
        load_task_split(recipe(type="sequence_classification", dataset="mednli"), "train")


def test_mimic_notes_join_diagnoses_top_codes_and_hash_split(files):
    from petl.tasks.clinical import hash_split

    def mimic(split, **options):
        return recipe(type="sequence_classification", dataset="mimic/icd", source=files["mimic/icd"], split=split,
                      options={"diagnoses": str(files["mimic/diagnoses"]), **options})

    train, labels = load_task_split(mimic("train", top_codes=3), "train")
    # code frequency over 24 admissions: 4019 in all, 4280 in 18, 42731 in 12, 5849 in 6
    assert labels.names == ["4019", "4280", "42731"] and labels.multi_label
    assert len(train) == 12 and all(0 in row for row in train["labels"])
    assert all("Radiology" not in t and "CHEST X-RAY" not in t for t in train["text"])  # discharge notes only
    test, labels = load_task_split(mimic("test", codes=["5849"]), "train")
    with open(files["mimic/diagnoses"]) as handle:
        rows = list(csv.DictReader(handle))
    want = {r["HADM_ID"] for r in rows if r["ICD9_CODE"] == "5849" and hash_split(int(r["HADM_ID"])) == "test"}
    assert labels.names == ["5849"] and len(test) == 6 and sum(map(len, test["labels"])) == len(want) > 0
    with pytest.raises(RecipeError, match="task.options.colour' is unknown for dataset 'mimic/icd'"):
        load_task_split(mimic("train", colour="red"), "train")


def test_n2c2_xml_folder_and_mednli_jsonl(files):
    from petl.tasks.clinical import N2C2_2018_CRITERIA

    n2c2, labels = load_task_split(recipe(type="sequence_classification", dataset="n2c2/2018_cohort",
                                          source=files["n2c2/2018_cohort"]), "train")
    assert labels.names == list(N2C2_2018_CRITERIA) and len(n2c2) == 6
    assert n2c2[0]["labels"] == [0, 3, 6, 9, 12]  # criteria j with (0 + j) % 3 == 0 are met
    nli, labels = load_task_split(recipe(type="sequence_classification", dataset="mednli",
                                         source=files["mednli"]), "train")
    assert labels.names == ["entailment", "neutral", "contradiction"] and nli["labels"][:3] == [0, 1, 2]
    assert nli[0]["text_pair"]


def test_shipped_constitution_folds_partition_the_set():
    from petl.tasks.legal import CONSTITUTION_TOPICS

    def read(split):
        return load_task_split(recipe(type="sequence_classification", dataset="petl/us_constitution",
                                      split=split), "train")

    train, labels = read("train")
    test, _ = read("test")
    assert (len(train), len(test)) == (32, 19) and labels.names == list(CONSTITUTION_TOPICS)
    folds = [read(f"fold={k}")[0] for k in range(3)]
    everything = list(train["text"]) + list(test["text"])
    assert sorted(t for f in folds for t in f["text"]) == sorted(everything)
    assert set(folds[0]["text"]) == set(test["text"]) and len(read("fold!=2")[0]) == 51 - len(folds[2])
    assert all(set(f["labels"]) == set(range(6)) for f in folds)  # every topic in every fold
    assert "Congress shall make no law" in " ".join(everything)


@pytest.mark.parametrize("task, message", [
    ({"type": "multiple_choice", "long_document": "chunk"},
     "recipe key 'task.long_document' has value 'chunk'; multiple_choice supports truncate"),
    ({"type": "sequence_classification", "dataset": "lexglue/ecthr_c"}, "recipe key 'task.dataset' has value"),
    ({"type": "generative", "dataset": "lexglue/scotus"}, "does not provide task.type 'generative'"),
    ({"type": "extractive_qa", "metrics": ["rouge1"]}, "extractive_qa reports exact_match, f1"),
    ({"type": "sequence_classification", "chunk_overlap": 40, "max_length": 64}, "below half of task.max_length"),
    ({"type": "sequence_classification", "deid_names_file": "names.txt"}, "set task.deidentify=true"),
    ({"type": "sequence_classification", "num_labels": 3, "label_names": ["a", "b"]}, "must list task.num_labels=3"),
    ({"type": "sequence_classification", "aggregate": "median"}, "choose one of: max, mean, logsumexp"),
])
def test_task_section_errors_are_one_line(task, message):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"task": task})
    assert message in str(err.value) and "\n" not in str(err.value)
