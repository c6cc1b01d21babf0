"""The README's main-job command runs, checks parity and writes overlays a person can open."""

from __future__ import annotations

from PIL import Image
from typer.testing import CliRunner

from fbclip_edge.cli import app
from fbclip_edge.demo import run_demo


def test_demo_without_fixture_uses_builtin_tiny(tmp_path):
    results = run_demo(
        tmp_path / "demo", use_fixture=False, image_size=224, show_progress=False,
        methods=("fbclip",),
    )
    (result,) = results
    assert "built-in tiny" in result.source and not result.parity
    rows = result.predictions.rows
    assert len(rows) == 6 and not result.predictions.failed
    assert all(0 < row.score < 1 for row in rows)
    overlay = Image.open(tmp_path / "demo" / "fbclip" / "predictions" / rows[0].overlay)
    assert overlay.size == (3 * 224, 224 + 18)


def test_demo_command_reports_parity_and_overlays(fixture_dir, tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    assert "reference fixture" in result.output
    assert "match" in result.output and "MISMATCH" not in result.output
    assert "overlays" in result.output
    for method in ("fbclip", "anomalyclip"):
        overlays = tmp_path / "demo" / method / "predictions" / "overlays"
        assert len(list(overlays.glob("*.png"))) == 6, method
    assert result.output.count("match") >= 3
    filo = tmp_path / "demo" / "filo" / "predictions"
    assert sorted(p.name for p in (filo / "overlays").glob("*.png")) == [
        "00000_bottle.png",
        "00000_pcb1.png",
    ]
    table = (filo / "results.csv").read_text()
    assert "category,position,anomaly_boxes" in table and "pcb1,bottom right,5" in table


def test_flops_command_prints_split():
    result = CliRunner().invoke(app, ["flops", "--backbone", "ViT-L-14-336", "--image-size", "518"])
    assert result.exit_code == 0
    row = next(line for line in result.output.splitlines() if "FB-CLIP" in line)
    assert "1013.6" in row and "341.8" in row and "1355.4" in row


def test_python_dash_m_runs_the_cli():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "fbclip_edge", "flops", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Usage: fbclip-edge flops" in done.stdout
