"""The quickstart (issue 3): the embedded model, extended 4x, gets better at 4x its native length."""
from __future__ import annotations

import json

from click.testing import CliRunner

from petl.cli.main import main


def test_shortened_quickstart_improves_perplexity_at_4x_length(tmp_path):
    out = tmp_path / "quickstart"
    result = CliRunner().invoke(main, ["finetune", "quickstart", "train.max_steps=12", "train.batch_size=1",
                                       "train.save_steps=0", "train.logging_steps=4", "eval.max_windows=6",
                                       f"output.dir={out}"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["before"]["perplexity"], metrics["after"]["perplexity"]
    # the un-extended model degrades past its native 256 tokens ...
    assert before["1024"]["ppl"] > before["256"]["ppl"]
    # ... and the extended, fine-tuned one is clearly better at 1024 tokens than the base model
    assert after["1024"]["ppl"] < 0.85 * before["1024"]["ppl"], (before, after)
    assert metrics["model"]["rope_parameters"]["factor"] == 4.0
    assert "ppl before" in result.output and "ppl after" in result.output
