"""The line API on FiLo: categories, boxes, position words, overlays, per-category thresholds.

The Detector here wraps the torch pipeline directly (FiLoBackend), so these tests need no
export; tests/test_filo_export.py opens exported artifacts through Detector.open.
"""

from __future__ import annotations

import csv
import json
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")

from filo_fixture import fixture_dir, grounding_detector, load_golden, load_model, table  # noqa: E402

from fbclip_edge.errors import FBClipError  # noqa: E402
from fbclip_edge.line.detector import Detector, Thresholds  # noqa: E402
from fbclip_edge.line.overlay import ANOMALY_BOX, OTHER_BOX, overlay_panel  # noqa: E402
from fbclip_edge.line.predict import predict_files  # noqa: E402
from fbclip_edge.line.thresholds import (  # noqa: E402
    calibrate_scores,
    read_calibration,
    read_category_calibrations,
    write_calibration,
)
from fbclip_edge.methods.filo.stages import torch_pipeline  # noqa: E402
from fbclip_edge.runtime.base import BackendInfo, Box  # noqa: E402
from fbclip_edge.runtime.filo import FiLoBackend, frame_boxes  # noqa: E402


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    return load_golden(fixture_dir())


@pytest.fixture(scope="module")
def backend(golden: dict[str, Any]) -> FiLoBackend:
    folder = fixture_dir()
    pipeline = torch_pipeline(
        load_model(folder, golden), table(golden), grounding_detector(folder, golden)
    )
    return FiLoBackend(pipeline, BackendInfo("torch", "cpu", "fp32", 518))


def _frames(golden: dict[str, Any]) -> list[np.ndarray]:
    return [golden["images_uint8"][i].numpy() for i in range(2)]


@pytest.mark.parametrize("i", [0, 1])
def test_predict_gives_the_reference_per_category(backend, golden, i):
    detector = Detector(backend, category=golden["categories"][i])
    found = detector.predict(_frames(golden)[i])[0]
    assert found.image_score == float(golden["image_score"][i])
    assert np.array_equal(found.anomaly_map, golden["anomaly_map"][i].numpy())
    assert found.category == golden["categories"][i]
    assert [found.position] == golden["positions"][i]
    assert [box.label for box in found.boxes] == golden["gd_phrases"][i]
    assert [box.is_anomaly for box in found.boxes] == golden["gd_box_is_anomaly"][i].tolist()


def test_category_per_call_overrides_the_default(backend, golden):
    detector = Detector(backend, category="bottle")
    found = detector.predict(_frames(golden)[1], category="pcb1")[0]
    assert found.category == "pcb1" and found.image_score == float(golden["image_score"][1])
    streamed = list(detector.stream(_frames(golden), batch_size=2, category="pcb1"))
    assert [d.category for d in streamed] == ["pcb1", "pcb1"]


def test_boxes_are_in_frame_pixels(backend, golden):
    found = backend.pipeline.run_frames(_frames(golden)[1:], ["pcb1"])[0].boxes
    assert found is not None
    wide = frame_boxes(found, 100, 400)
    cx, cy, w, h = found.boxes[0].tolist()
    assert wide[0].x0 == pytest.approx((cx - w / 2) * 400)
    assert wide[0].y1 == pytest.approx((cy + h / 2) * 100)
    anomaly = [
        b for b, flag in zip(frame_boxes(found, 518, 518), found.is_anomaly, strict=True) if flag
    ]
    pixel = found.boxes_final[found.is_anomaly]
    assert torch.allclose(
        torch.tensor([[b.x0, b.y0, b.x1, b.y1] for b in anomaly]), pixel, atol=1e-3
    )


def test_category_errors_name_the_fix(backend, golden):
    with pytest.raises(FBClipError, match="pass category= .*known: bottle, pcb1"):
        Detector(backend).predict(_frames(golden)[0])
    with pytest.raises(FBClipError, match="'screw' is not in these artifacts' descriptions"):
        Detector(backend, category="screw")
    with pytest.raises(FBClipError, match="RGB uint8"):
        backend.run_frames([np.zeros((8, 8), np.float32)], ["bottle"])


def test_overlay_draws_anomaly_and_other_boxes():
    image = np.zeros((60, 80, 3), np.uint8)
    boxes = [Box(10, 10, 40, 30, "scratch(0.31)", 0.31, True), Box(50, 5, 75, 50, "x", 0.3, False)]
    panel = np.asarray(
        overlay_panel(image, np.zeros((60, 80), np.float32), np.zeros((60, 80), bool), "c", boxes)
    )
    right = panel[18:, 160:]
    assert tuple(right[20, 10]) == ANOMALY_BOX  # left edge of the anomaly box
    assert tuple(right[25, 50]) == OTHER_BOX
    assert not panel[18:, :80].any()  # the frame panel carries no boxes


def test_predict_files_records_category_and_position(backend, golden, tmp_path):
    for i, frame in enumerate(_frames(golden)):
        Image.fromarray(frame).save(tmp_path / f"f{i}.png")
    result = predict_files(
        Detector(backend), [tmp_path / "f1.png"], tmp_path / "out", False, category="pcb1"
    )
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert rows[0]["category"] == "pcb1" and rows[0]["position"] == "bottom right"
    assert int(rows[0]["anomaly_boxes"]) == int(golden["gd_box_is_anomaly"][1].sum())
    assert result.rows[0].score == pytest.approx(float(golden["image_score"][1]), abs=1e-6)


def test_thresholds_per_category(backend, golden, tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"method": "filo"}))
    strict = calibrate_scores(np.array([0.1, 0.2]), [np.zeros((4, 4))], 0.5)
    write_calibration(tmp_path, strict, category="pcb1")
    assert read_calibration(tmp_path) is None
    assert read_calibration(tmp_path, "pcb1") == strict
    assert set(read_category_calibrations(tmp_path)) == {"pcb1"}
    detector = Detector(backend, Thresholds(image=2.0, pixel=2.0), category="pcb1")
    detector.category_thresholds = {"pcb1": Thresholds(image=0.0, pixel=0.0, calibrated=True)}
    pcb, bottle = (
        detector.predict(_frames(golden)[1])[0],
        detector.predict(_frames(golden)[0], category="bottle")[0],
    )
    assert pcb.is_anomalous and pcb.defect_mask.all()
    assert not bottle.is_anomalous and not bottle.defect_mask.any()
