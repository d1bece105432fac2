"""`petl viz attention` through the real CLI."""
from __future__ import annotations

import torch
from click.testing import CliRunner

from petl.attention.patterns import PatternConfig
from petl.attention.viz import pattern_panels
from petl.cli.main import main


def test_viz_writes_png(tmp_path) -> None:
    out = tmp_path / "sf.png"
    result = CliRunner().invoke(main, ["viz", "attention", "--pattern", "sf", "--length", "48", "--n-sink", "2",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_viz_rejects_bad_options(tmp_path) -> None:
    result = CliRunner().invoke(main, ["viz", "attention", "--pattern", "sf", "--length", "48", "--cyclic",
                                       "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "SF-Attn is non-cyclic" in result.output
    assert not (tmp_path / "x.png").exists()


def test_panels_are_the_two_head_halves() -> None:
    panels = pattern_panels(PatternConfig.from_params("s2", group_size=4), 8)
    assert [t for t, _ in panels] == ["unshifted heads", "shifted heads"]
    shifted = panels[1][1]
    assert shifted[3].tolist() == [False, False, True, True] + [False] * 4  # segment [2, 6)
    assert torch.equal(panels[0][1][7], torch.tensor([False] * 4 + [True] * 4))  # segment [4, 8)
