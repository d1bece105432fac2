"""Load raw training text from a local file, a local directory, or a Hugging Face Hub dataset id.

Everything goes through `datasets.load_dataset` (its packaged `text` / `json` / `csv` / `parquet`
builders for local data), so the result is memory-mapped Arrow, cached, and streamable exactly as
`datasets` users expect; this module only decides which builder to call and turns the usual
mistakes into one-line errors.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import datasets

from petl.data._utils import check_positive_int, require_column

# File suffix -> format; the format is the datasets packaged builder, except tsv (csv with a tab).
_FORMATS: dict[str, str] = {
    ".txt": "text", ".text": "text",
    ".jsonl": "json", ".json": "json", ".ndjson": "json",
    ".csv": "csv", ".tsv": "tsv",
    ".parquet": "parquet",
}
# datasets decompresses these itself; the format comes from the suffix before them.
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
_SUPPORTED = ".txt, .jsonl, .json, .csv, .tsv, .parquet (optionally compressed .gz/.bz2/.xz/.zst)"
_SCRIPT_ERROR = "scripts are no longer supported"


def load_text_dataset(
    source: str,
    *,
    split: str = "train",
    text_field: str | None = "text",
    data_files: str | list[str] | dict[str, str | list[str]] | None = None,
    name: str | None = None,
    max_samples: int | None = None,
    streaming: bool = False,
    trust_remote_code: bool = False,
    txt_sample_by: Literal["document", "paragraph", "line"] = "document",
) -> datasets.Dataset | datasets.IterableDataset:
    """Load a text dataset for fine-tuning.

    Args:
        source (str): a local file, a local directory, or a Hub dataset id such as
            ``"togethercomputer/RedPajama-Data-1T-Sample"`` (a packaged builder name such as
            ``"json"`` together with ``data_files`` works too, as in ``datasets.load_dataset``).
            Local formats by suffix: ``.txt`` (see ``txt_sample_by``), ``.jsonl``/``.json``
            (records or a JSON array of records), ``.csv``/``.tsv``, ``.parquet``. A directory is
            searched recursively (hidden files skipped, other suffixes ignored, files sorted by path)
            and must hold a single format.
        split (str, Optional): split to return; slicing such as ``"train[:1000]"`` works. Local
            files are all put in this split. Default: ``"train"``.
        text_field (str, Optional): column that must exist (checked, with the existing columns
            named in the error). For ``.txt`` files the text column is renamed to it. ``None``
            skips the check, e.g. for SFT records with instruction/output columns. Default: ``"text"``.
        data_files (str | list | dict, Optional): forwarded to ``datasets.load_dataset`` for a Hub
            id or builder name; not allowed with a local path. Default: None.
        name (str, Optional): Hub dataset configuration name. Default: None.
        max_samples (int, Optional): keep only the first ``max_samples`` records (no shuffling:
            results are deterministic). Default: None (all).
        streaming (bool, Optional): return an ``IterableDataset`` read lazily. Default: False.
        trust_remote_code (bool, Optional): forwarded to datasets 3.x for script-based Hub
            datasets; datasets >= 4 no longer runs scripts at all. Default: False.
        txt_sample_by (str, Optional): how ``.txt`` files become records: ``"document"`` (one
            record per file), ``"paragraph"`` (split on blank lines) or ``"line"``; blank records
            are dropped in the last two modes. Default: ``"document"``.

    Returns:
        ``datasets.Dataset`` (or ``IterableDataset`` when ``streaming``) with the source's columns.

    Example:
        >>> ds = load_text_dataset("corpus/", text_field="text", max_samples=1000)
    """
    if max_samples is not None:
        check_positive_int(max_samples, "max_samples")
    if txt_sample_by not in ("document", "paragraph", "line"):
        raise ValueError(f"txt_sample_by must be 'document', 'paragraph' or 'line', got {txt_sample_by!r}.")
    path = Path(os.path.expanduser(source))
    if path.exists():
        if data_files is not None:
            raise ValueError(f"data_files applies to a Hub id or builder name, not to the local path {source!r}; "
                             "pass the file or directory as source and drop data_files.")
        dataset = _load_local(path, split=split, streaming=streaming, txt_sample_by=txt_sample_by)
        if _local_format(path) == "text" and text_field not in (None, "text"):
            dataset = dataset.rename_column("text", text_field)
    elif _looks_like_path(source):
        raise FileNotFoundError(f"no such file or directory: {source!r}; check the path "
                                "(a Hub dataset id looks like 'owner/name').")
    else:
        dataset = _load_hub(source, split=split, data_files=data_files, name=name, streaming=streaming,
                            trust_remote_code=trust_remote_code)
    if text_field is not None:
        require_column(dataset, text_field, arg="text_field", what=repr(source))
    if max_samples is not None:
        if isinstance(dataset, datasets.IterableDataset):
            dataset = dataset.take(max_samples)
        else:
            dataset = dataset.select(range(min(max_samples, len(dataset))))
    return dataset


def _looks_like_path(source: str) -> bool:
    """A missing local path should fail as such, not as an unreachable Hub id."""
    if source.startswith(("/", "./", "../", "~", ".\\")) or os.path.isabs(source):
        return True
    if source.count("/") >= 2 or "\\" in source:
        return True
    return _file_format(Path(source)) is not None or Path(source).suffix.lower() in _COMPRESSIONS


def _file_format(path: Path) -> str | None:
    """Packaged builder for a file name, looking through one compression suffix."""
    name = path.name.lower()
    for suffix in _COMPRESSIONS:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return _FORMATS.get(Path(name).suffix)


def _data_files_in(directory: Path) -> list[Path]:
    """Data files under a directory, recursively, sorted, skipping hidden files and folders."""
    found = []
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts) and _file_format(p):
            found.append(p)
    return found


def _local_format(path: Path) -> str:
    """The one builder a local file or directory needs, or a one-line error saying why not."""
    if path.is_file():
        fmt = _file_format(path)
        if fmt is None:
            raise ValueError(f"unknown file extension {''.join(path.suffixes) or '(none)'!r} for {str(path)!r}; "
                             f"supported: {_SUPPORTED}.")
        return fmt
    files = _data_files_in(path)
    if not files:
        raise ValueError(f"no data files in directory {str(path)!r}; supported: {_SUPPORTED}.")
    formats = sorted({_file_format(p) for p in files})
    if len(formats) > 1:
        counts = ", ".join(f"{f}: {sum(_file_format(p) == f for p in files)} files" for f in formats)
        raise ValueError(f"directory {str(path)!r} mixes formats ({counts}); keep one format per directory "
                         "or pass a single file.")
    return formats[0]


def _load_local(path: Path, *, split: str, streaming: bool, txt_sample_by: str
                ) -> datasets.Dataset | datasets.IterableDataset:
    fmt = _local_format(path)
    files = [str(path)] if path.is_file() else [str(p) for p in _data_files_in(path)]
    kwargs: dict = {}
    if fmt == "text":
        kwargs["sample_by"] = txt_sample_by
    elif fmt == "tsv":
        kwargs["sep"] = "\t"
    builder = "csv" if fmt == "tsv" else fmt
    base_split = split.split("[", 1)[0]  # "train[:100]" -> the files go in "train", slicing is datasets'
    dataset = datasets.load_dataset(builder, data_files={base_split: files}, split=split, streaming=streaming, **kwargs)
    if fmt == "text" and txt_sample_by != "document":
        dataset = dataset.filter(lambda text: bool(text.strip()), input_columns="text")
    return dataset


def _load_hub(source: str, *, split: str, data_files, name: str | None, streaming: bool,
              trust_remote_code: bool) -> datasets.Dataset | datasets.IterableDataset:
    kwargs: dict = {}
    if trust_remote_code:  # datasets >= 4 rejects scripts whatever this says; only 3.x reads it
        kwargs["trust_remote_code"] = True
    try:
        return datasets.load_dataset(source, name=name, split=split, data_files=data_files,
                                     streaming=streaming, **kwargs)
    except RuntimeError as err:
        if _SCRIPT_ERROR not in str(err):
            raise
        raise RuntimeError(
            f"{source!r} is a script-based dataset, which datasets {datasets.__version__} no longer runs; "
            f"load its data files instead, e.g. load_text_dataset('json', "
            f"data_files='hf://datasets/{source}/*.jsonl').") from err
