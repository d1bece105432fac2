"""Run every shared adapter check (tests/adapter_matrix.py) on every registered row."""
from __future__ import annotations

import pytest

from .adapter_matrix import ADAPTER_ROWS, CHECKS

CASES = [pytest.param(row, check, id=f"{row.name}-{check}") for row in ADAPTER_ROWS for check in CHECKS]


@pytest.mark.parametrize(("row", "check"), CASES)
def test_adapter_matrix(row, check, tmp_path):
    if check in row.skip:
        pytest.skip(f"{row.name} does not support {check}: {row.skip[check]}")
    CHECKS[check](row, tmp_path)


def test_rows_have_unique_names():
    names = [row.name for row in ADAPTER_ROWS]
    assert len(names) == len(set(names))
