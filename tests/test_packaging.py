"""The wheel installs petl's CLI and recipes under the petl namespace only."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_holds_cli_recipes_and_assets_under_petl_only(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("petl_toolkit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"petl"}, f"generic top-level names installed: {top_level - {'petl'}}"
    assert "petl/cli/main.py" in names and "petl/recipes/quickstart.yaml" in names
    assert "petl/recipes/context/longlora-llama2-7b-8k.yaml" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "petl = petl.cli.main:main" in entry_points


def test_readme_first_section_has_exactly_two_commands_and_ci_runs_the_second():
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```")[1]
    commands = [line for line in first_block.splitlines()[1:] if line.strip() and not line.startswith("#")]
    assert len(commands) == 2
    assert "petl finetune quickstart" in commands[0] and "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "torch==2.13.0" in ci and "grep -m1 -E '^pip install .*pytest' README.md" in ci
