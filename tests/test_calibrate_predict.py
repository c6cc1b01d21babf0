"""Calibration statistics, predict on a folder with good, bad and corrupt files, overlays."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from fbclip_edge import FBClipError, create_model
from fbclip_edge.data.synthetic import make_synthetic
from fbclip_edge.line.calibrate import (
    calibrate_scores,
    order_statistic_threshold,
    read_calibration,
    write_calibration,
)
from fbclip_edge.line.detector import Detector
from fbclip_edge.line.overlay import contour, overlay_panel
from fbclip_edge.line.predict import collect_inputs, predict_files
from fbclip_edge.runtime import TorchBackend


def test_order_statistic_threshold_by_hand():
    scores = np.arange(1, 100) / 100.0  # 0.01 .. 0.99, n = 99
    threshold, expected, rank = order_statistic_threshold(scores, 0.05)
    # k = ceil(100 * 0.95) = 95 -> 0.95; expected rate (99 - 95 + 1) / 100 = 0.05
    assert (threshold, expected, rank) == (0.95, 0.05, 95)
    # Too few frames for 1%: just above the max, expected 1 / (n + 1).
    threshold, expected, rank = order_statistic_threshold(scores[:9], 0.01)
    assert threshold > 0.09 and expected == pytest.approx(0.1) and rank == 10
    with pytest.raises(FBClipError, match="between 0 and 1"):
        order_statistic_threshold(scores, 0.0)
    with pytest.raises(FBClipError, match="no good frames"):
        order_statistic_threshold(np.array([]), 0.1)


def test_false_alarm_rate_on_held_out_good_frames_is_within_bound():
    """Scores of good frames are exchangeable; with n = 399 and target 5%, held-out false
    alarms over 2,000 frames stay within the binomial 99.9% bound around the expectation."""
    rng = np.random.default_rng(7)
    calibration = calibrate_scores(rng.beta(2, 5, 399), [rng.random((4, 4))], 0.05)
    held_out = rng.beta(2, 5, 2000)
    rate = float(np.mean(held_out >= calibration.image_threshold))
    bound = calibration.expected_fpr + 3.3 * math.sqrt(0.05 * 0.95 / 2000) + 0.02
    assert calibration.expected_fpr == pytest.approx(20 / 400)
    assert rate <= bound


def test_calibrate_model_on_synthetic_good_images(tmp_path):
    """The tiny model on synthetic good frames: thresholds from 60, checked on 60 more."""
    make_synthetic(tmp_path / "data", categories=1, images=120, size=64, seed=1)
    files = sorted((tmp_path / "data").glob("*/train/good/*.png"))
    frames = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    detector = Detector(TorchBackend(create_model("tiny", image_size=56, seed=0), device="cpu"))
    detections = detector.predict(frames)
    scores = np.array([d.image_score for d in detections])
    calibration = calibrate_scores(scores[:60], [d.anomaly_map for d in detections[:60]], 0.1)
    held_out = float(np.mean(scores[60:] >= calibration.image_threshold))
    # Expected 6 / 61 ~ 0.098; 60 held-out frames: binomial sd ~ 0.039 -> bound at +3 sd.
    assert calibration.expected_fpr == pytest.approx(6 / 61)
    assert held_out <= calibration.expected_fpr + 3 * math.sqrt(0.1 * 0.9 / 60)
    pixels = np.concatenate([d.anomaly_map.ravel() for d in detections[:60]])
    assert np.mean(pixels >= calibration.pixel_threshold) == pytest.approx(0.1, abs=0.02)


def test_calibration_round_trips_through_the_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 1, "files": {}}))
    assert read_calibration(tmp_path) is None
    calibration = calibrate_scores(np.linspace(0, 1, 50), [np.zeros((2, 2))], 0.1)
    write_calibration(tmp_path, calibration)
    stored = json.loads((tmp_path / "manifest.json").read_text())
    assert stored["files"] == {} and stored["calibration"]["n_images"] == 50
    assert read_calibration(tmp_path) == calibration
    with pytest.raises(FBClipError, match="fbclip-edge export"):
        read_calibration(tmp_path / "nowhere")


def test_predict_folder_with_good_bad_and_corrupt_files(tmp_path):
    make_synthetic(tmp_path / "data", categories=1, images=4, size=64, seed=2)
    test_dir = next((tmp_path / "data").glob("*/test"))
    (test_dir / "good" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (test_dir / "good" / "notes.txt").write_text("ignored: not an image")
    detector = Detector(TorchBackend(create_model("tiny", image_size=56, seed=0), device="cpu"))
    result = predict_files(detector, [test_dir], tmp_path / "out", show_progress=False)
    images = [p for p in test_dir.rglob("*.png")]
    assert len(result.rows) == len(images) - 1
    assert list(result.failed) == [str(test_dir / "good" / "corrupt.png")]
    assert "corrupt.png" in result.failed[str(test_dir / "good" / "corrupt.png")]
    with open(tmp_path / "out" / "results.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == len(result.rows) and {r["decision"] for r in rows} <= {"good", "anomalous"}
    payload = json.loads((tmp_path / "out" / "results.json").read_text())
    assert payload["counts"] == {
        "scored": len(rows),
        "failed": 1,
        "anomalous": sum(r["decision"] == "anomalous" for r in rows),
    }
    overlay = Image.open(tmp_path / "out" / rows[0]["overlay"])
    assert overlay.format == "PNG" and overlay.size == (3 * 64, 64 + 18)


def test_predict_batches_backend_calls_and_matches_one_by_one(tmp_path):
    make_synthetic(tmp_path / "data", categories=1, images=5, size=64, seed=4)
    test_dir = next((tmp_path / "data").glob("*/test"))
    (sorted(test_dir.iterdir())[-1] / "zz_broken.png").write_bytes(b"not an image")
    backend = TorchBackend(create_model("tiny", image_size=56, seed=0), device="cpu")
    batches = []
    real_run = backend.run

    def counting_run(pixels):
        batches.append(pixels.shape[0])
        return real_run(pixels)

    backend.run = counting_run
    detector = Detector(backend)
    one = predict_files(detector, [test_dir], tmp_path / "one", show_progress=False, batch_size=1)
    assert batches == [1] * len(one.rows) and len(one.failed) == 1
    batches.clear()
    four = predict_files(detector, [test_dir], tmp_path / "four", show_progress=False, batch_size=4)
    # chunks of 4 files; each call gets its chunk's readable files
    files = [str(p) for p in collect_inputs([test_dir])]
    chunks = [files[first : first + 4] for first in range(0, len(files), 4)]
    assert batches == [sum(f not in one.failed for f in chunk) for chunk in chunks]
    assert len(batches) > 1 and max(batches) == 4
    assert [r.file for r in four.rows] == [r.file for r in one.rows]
    assert [r.overlay for r in four.rows] == [r.overlay for r in one.rows]
    assert np.allclose([r.score for r in four.rows], [r.score for r in one.rows], atol=1e-6)
    assert [r.defect_area for r in four.rows] == [r.defect_area for r in one.rows]
    assert four.failed == one.failed
    with pytest.raises(FBClipError, match="batch size must be >= 1"):
        predict_files(detector, [test_dir], tmp_path / "zero", show_progress=False, batch_size=0)


def test_collect_inputs_globs_and_errors(tmp_path):
    for name in ("a.png", "b.jpg", "c.txt"):
        Image.new("RGB", (4, 4)).save(tmp_path / name) if name != "c.txt" else (
            tmp_path / name
        ).write_text("x")
    assert [p.name for p in collect_inputs([str(tmp_path / "*.png"), tmp_path / "b.jpg"])] == [
        "a.png",
        "b.jpg",
    ]
    with pytest.raises(FBClipError, match="does not exist"):
        collect_inputs([tmp_path / "missing.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FBClipError, match="no image files"):
        collect_inputs([tmp_path / "empty"])


def test_overlay_panel_layout_and_contour():
    image = np.zeros((20, 30, 3), np.uint8)
    mask = np.zeros((20, 30), bool)
    mask[5:15, 10:20] = True
    edge = contour(mask)
    assert edge[5, 10] and not edge[10, 15] and edge.sum() < mask.sum()
    panel = np.asarray(overlay_panel(image, np.full((20, 30), 0.9, np.float32), mask, "x"))
    assert panel.shape == (20 + 18, 90, 3)
    assert tuple(panel[18 + 5, 60 + 10]) == (255, 0, 0)  # contour drawn on the third panel


def test_cli_export_calibrate_predict(tmp_path):
    """The integrator's flow through the CLI: export, calibrate on good frames, predict."""
    from typer.testing import CliRunner

    from fbclip_edge import save_model
    from fbclip_edge.cli import app

    runner = CliRunner()
    save_model(create_model("tiny", image_size=56, seed=0), tmp_path / "model")
    make_synthetic(tmp_path / "data", categories=1, images=12, size=64, seed=3)
    category = next(p for p in (tmp_path / "data").iterdir() if p.is_dir())
    artifacts = tmp_path / "artifacts"
    done = runner.invoke(
        app,
        [
            "export",
            "--model",
            str(tmp_path / "model"),
            "--out",
            str(artifacts),
            "--precision",
            "fp32",
            "--batch",
            "1:2:8",
        ],
    )
    assert done.exit_code == 0, done.output
    done = runner.invoke(
        app,
        [
            "calibrate",
            "--artifacts",
            str(artifacts),
            "--good",
            str(category / "train" / "good"),
            "--target-fpr",
            "0.1",
        ],
    )
    assert done.exit_code == 0, done.output
    assert "expected false-alarm rate" in done.output
    assert read_calibration(artifacts).n_images == 12
    done = runner.invoke(
        app,
        [
            "predict",
            str(category / "test"),
            "--artifacts",
            str(artifacts),
            "--out",
            str(tmp_path / "out"),
            "--backend",
            "onnxruntime",
        ],
    )
    assert done.exit_code == 0, done.output
    assert "calibrated" in done.output and "with onnxruntime" in done.output
    payload = json.loads((tmp_path / "out" / "results.json").read_text())
    assert payload["counts"]["scored"] == len(list((category / "test").rglob("*.png")))
