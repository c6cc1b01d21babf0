"""`fbclip-edge eval --backend onnxruntime` gives the metrics of `--backend torch` (1e-4)."""

from __future__ import annotations

import json
import math

from typer.testing import CliRunner

from fbclip_edge import import_official
from fbclip_edge.cli import app
from fbclip_edge.data.synthetic import make_synthetic


def test_eval_command_same_metrics_torch_and_onnxruntime(
    tmp_path, clip_weights, official_checkpoint
):
    runner = CliRunner()
    # The authors' fixture weights give structured (non-flat) maps, as a trained model does.
    import_official(clip_weights, official_checkpoint, tmp_path / "model", image_size=112)
    make_synthetic(tmp_path / "data", categories=2, images=6, size=64, seed=5)
    done = runner.invoke(
        app,
        [
            "export",
            "--model",
            str(tmp_path / "model"),
            "--out",
            str(tmp_path / "artifacts"),
            "--precision",
            "fp32",
            "--batch",
            "1:4:8",
        ],
    )
    assert done.exit_code == 0, done.output
    reports = {}
    for backend, source in (
        ("torch", ["--model", str(tmp_path / "model")]),
        ("onnxruntime", ["--artifacts", str(tmp_path / "artifacts")]),
    ):
        out = tmp_path / f"{backend}.json"
        done = runner.invoke(
            app,
            [
                "eval",
                "--data",
                str(tmp_path / "data"),
                "--backend",
                backend,
                "--out",
                str(out),
                "--no-progress",
                *source,
            ],
        )
        assert done.exit_code == 0, done.output
        reports[backend] = json.loads(out.read_text())
    torch_report, ort_report = reports["torch"], reports["onnxruntime"]
    assert ort_report["backend"]["name"] == "onnxruntime"
    # pixel_aupro_200 (the public code bases' variant) rescales the FPRs of the few of its
    # 200 thresholds under 0.3 by their own min and max: on maps this flat (the tiny fixture at
    # 112 px spans 0.500..0.516) a float32 difference of 2e-7 between the backends moves a
    # threshold point in or out of that window, and the metric by 2e-3 to 2.5e-2 from run to
    # run. It is not a backend property, so it is left out here; the exact AU-PRO
    # (pixel_aupro) and every other metric must agree within 1e-4. test_metrics checks the
    # 200-threshold definition itself.
    ill_conditioned = {"pixel_aupro_200"}
    compared = 0
    for key, value in torch_report["mean"].items():
        other = ort_report["mean"][key]
        if isinstance(value, float) and not math.isnan(value) and key not in ill_conditioned:
            assert abs(value - other) <= 1e-4, (key, value, other)
            compared += 1
    assert compared >= 7  # image AUROC, AP, max-F1; pixel AUROC, AP, max-F1, AU-PRO
