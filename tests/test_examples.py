"""The user-facing example scripts run as documented (shortened)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_own_trainer_example(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "own_trainer.py"), "--max-steps", "2",
                             "--context", "512", "--max-windows", "2", "--output-dir", str(tmp_path / "run")],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out perplexity at 512 tokens" in result.stdout
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_run_recipe_example(tmp_path):
    overrides = ["train.max_steps=2", "train.batch_size=1", "model.context_length=512", "data.block_size=512",
                 "eval.perplexity_lengths=[256,512]", "eval.max_windows=2", f"output.dir={tmp_path / 'run'}"]
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "run_recipe.py"), "quickstart", *overrides],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "context 512: perplexity" in result.stdout
