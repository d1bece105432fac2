"""Small helpers shared by the data modules: progress-bar switch and column checks."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import datasets

IGNORE_INDEX = -100
"""Label value that `torch.nn.CrossEntropyLoss` (and transformers' causal-LM loss) skips."""


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Turn datasets' progress bars on or off for the duration of a block, then restore them.

    `Dataset.map` has no per-call switch, so this flips the library-wide flag and puts it back.
    """
    was_enabled = datasets.is_progress_bar_enabled()
    if enabled and not was_enabled:
        datasets.enable_progress_bars()
    elif not enabled and was_enabled:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
        else:
            datasets.disable_progress_bars()


def column_names(dataset: datasets.Dataset | datasets.IterableDataset) -> list[str] | None:
    """Columns of a dataset, or None when a streaming dataset does not know them yet."""
    names = dataset.column_names
    return list(names) if names is not None else None


def require_column(dataset: datasets.Dataset | datasets.IterableDataset, field: str, *,
                   arg: str, what: str = "the dataset") -> None:
    """Raise a one-line error when `field` is not a column, naming the columns that exist.

    Streaming datasets with unknown columns are let through: their first record will tell.
    """
    names = column_names(dataset)
    if names is not None and field not in names:
        raise ValueError(f"{arg}={field!r} is not a column of {what}; its columns are {names}. "
                         f"Pass {arg}= one of them.")


def check_positive_int(value: object, name: str) -> int:
    """Validate an integer option such as `block_size` (bool is rejected although it is an int)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return value
