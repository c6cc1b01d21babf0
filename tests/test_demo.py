"""The README's main-job command runs and reports parity when the fixture is present."""

from __future__ import annotations

from typer.testing import CliRunner

from fbclip_edge.cli import app
from fbclip_edge.demo import run_demo


def test_demo_without_fixture_uses_builtin_tiny():
    result = run_demo(use_fixture=False, image_size=224)
    assert "built-in tiny" in result.source
    assert len(result.image_scores) == 2 and not result.parity
    assert all(0 < s < 1 for s in result.image_scores)


def test_demo_command_reports_reference_parity(fixture_dir):
    result = CliRunner().invoke(app, ["demo"])
    assert result.exit_code == 0, result.output
    assert "reference fixture" in result.output
    assert "match" in result.output and "MISMATCH" not in result.output


def test_flops_command_prints_split():
    result = CliRunner().invoke(app, ["flops", "--backbone", "ViT-L-14-336", "--image-size", "518"])
    assert result.exit_code == 0
    assert "backbone 1013.6 GFLOPs" in result.output and "heads 380.0 GFLOPs" in result.output
