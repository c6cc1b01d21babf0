"""Evaluation loop: any Backend, maps at ground-truth size, NaN-aware means, reports."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Console

from fbclip_edge import anomaly_map, create_model, preprocess, save_model
from fbclip_edge.data import load_dataset, read_image, read_mask
from fbclip_edge.errors import FBClipError
from fbclip_edge.eval import (
    EvalConfig,
    evaluate_backend,
    open_backend,
    report_markdown,
    report_table,
    run_eval,
    write_report,
)
from fbclip_edge.metrics import METRIC_KEYS, evaluate
from fbclip_edge.runtime.base import Backend, BackendInfo, TorchBackend

SIZE = 112


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Single-threaded: the tiny model is latency-bound and a loaded 2-core runner makes
    OpenMP spin (see test_train.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class BrightnessBackend(Backend):
    """An oracle: the patch map is each patch's mean brightness, the score its maximum.

    On images whose defects are the only bright pixels a correct loop must score near 1,
    so flipped, transposed or misaligned maps show up as low pixel metrics.
    """

    def __init__(self, image_size: int = SIZE, patch: int = 14) -> None:
        self.patch = patch
        self.info = BackendInfo("oracle", "cpu", "fp32", image_size, {"note": "test"})

    def _run(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        brightness = pixel_values.mean(dim=1, keepdim=True)
        pooled = F.avg_pool2d(brightness, self.patch)
        low, high = pooled.amin(), pooled.amax()
        patch_map = (pooled - low) / (high - low + 1e-6)
        return patch_map.flatten(1).amax(dim=1), patch_map


def _write(path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _square_image(height: int, width: int, box: tuple[int, int, int, int] | None):
    image = np.full((height, width, 3), 20, np.uint8)
    mask = np.zeros((height, width), np.uint8)
    if box is not None:
        top, left, bottom, right = box
        image[top:bottom, left:right] = 235
        mask[top:bottom, left:right] = 255
    return image, mask


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    """MVTec layout: 'squares' (bright defects, one image of another size) and 'plain'
    (normal images only, so its image and pixel metrics are undefined)."""
    root = tmp_path_factory.mktemp("eval") / "data"
    boxes = [(10, 60, 50, 100), (56, 14, 98, 56), (70, 70, 110, 112)]
    for index in range(2):
        image, _ = _square_image(SIZE, SIZE, None)
        _write(root / "squares" / "test" / "good" / f"{index:03d}.png", image)
        _write(root / "plain" / "test" / "good" / f"{index:03d}.png", image)
    for index, box in enumerate(boxes):
        height, width = (96, 128) if index == 2 else (SIZE, SIZE)
        image, mask = _square_image(height, width, box if index < 2 else (40, 70, 80, 120))
        _write(root / "squares" / "test" / "hole" / f"{index:03d}.png", image)
        _write(root / "squares" / "ground_truth" / "hole" / f"{index:03d}_mask.png", mask)
    return root


def test_oracle_scores_near_perfect_and_maps_are_at_ground_truth_size(squares):
    samples = load_dataset(squares, categories=["squares"])
    report = evaluate_backend(BrightnessBackend(), samples, batch_size=2)
    metrics = report.categories["squares"].metrics
    assert set(metrics) == set(METRIC_KEYS)
    assert metrics["image_auroc"] == 1.0
    assert metrics["pixel_auroc"] > 0.97
    assert metrics["pixel_aupro"] > 0.85
    result = report.categories["squares"]
    assert (result.images, result.anomalous) == (5, 3)
    assert result.resolution == [SIZE, SIZE]
    assert result.resized_from == [[96, 128]]
    assert any("resized" in note for note in report.notes)
    assert report.backend["name"] == "oracle" and report.backend["note"] == "test"
    assert report.timing["images"] == 5


def test_torch_backend_matches_a_direct_computation(squares, tmp_path):
    """The loop equals model -> anomaly_map(sigma 4) at each image's size -> metrics."""
    model = create_model("tiny", image_size=SIZE)
    samples = [s for s in load_dataset(squares, categories=["squares"])]
    report = evaluate_backend(TorchBackend(model, "cpu"), samples, batch_size=3)
    scores, maps, masks = [], [], []
    with torch.no_grad():
        for sample in samples:
            image = read_image(sample.image_path)
            output = model(preprocess(image, SIZE))
            amap = anomaly_map(output.patch_map, (SIZE, SIZE), 4.0)[0]
            if image.shape[:2] != (SIZE, SIZE):
                full = anomaly_map(output.patch_map, image.shape[:2], 4.0)
                amap = F.interpolate(full[None], (SIZE, SIZE), mode="bilinear")[0, 0]
            scores.append(float(output.image_score[0]))
            maps.append(amap.numpy())
            masks.append(read_mask(sample.mask_path, (SIZE, SIZE)))
    labels = np.array([s.label for s in samples])
    expected = evaluate(labels, np.array(scores), np.stack(masks), np.stack(maps))
    for key in METRIC_KEYS:
        assert report.categories["squares"].metrics[key] == pytest.approx(expected[key], abs=1e-6)


def test_nan_categories_are_skipped_in_the_mean_and_listed(squares, tmp_path):
    report = evaluate_backend(BrightnessBackend(), load_dataset(squares))
    assert list(report.categories) == ["plain", "squares"]
    plain = report.categories["plain"].metrics
    assert all(math.isnan(plain[key]) for key in METRIC_KEYS)
    for key in METRIC_KEYS:
        assert report.mean[key] == report.categories["squares"].metrics[key]
        assert report.nan_categories[key] == ["plain"]

    json_path, md_path = write_report(report, tmp_path / "out" / "eval.json")
    assert md_path == tmp_path / "out" / "eval.md"
    data = json.loads(json_path.read_text())  # strict JSON: NaN is written as null
    assert data["categories"]["plain"]["metrics"]["image_auroc"] is None
    assert set(data["mean"]) == set(METRIC_KEYS)
    assert all(0 <= value <= 1 for value in data["mean"].values())
    assert sorted(p.name for p in json_path.parent.iterdir()) == ["eval.json", "eval.md"]
    markdown = md_path.read_text()
    assert "| **mean** |" in markdown and "AU-PRO (official)" in markdown
    assert "undefined for plain" in markdown

    console = Console(width=160, record=True)
    console.print(report_table(report))
    text = console.export_text()
    assert "squares" in text and "mean" in text and "n/a" in text
    squares_auroc = 100 * report.categories["squares"].metrics["image_auroc"]
    assert f"{squares_auroc:.1f}" in text
    assert report_markdown(report).count("\n| ") == 4


def test_run_eval_on_a_model_folder(squares, tmp_path):
    save_model(create_model("tiny", image_size=SIZE), tmp_path / "model")
    report = run_eval(
        EvalConfig(data=squares, model=tmp_path / "model", categories=("squares",), progress=False)
    )
    assert list(report.categories) == ["squares"]
    assert report.backend["name"] == "torch"
    assert report.model["model"] == str(tmp_path / "model")
    assert report.dataset["categories"] == ["squares"]


def test_backend_selection_errors(squares, tmp_path, monkeypatch):
    with pytest.raises(FBClipError, match="exactly one"):
        EvalConfig(data=squares)
    with pytest.raises(FBClipError, match="--backend"):
        EvalConfig(data=squares, model=tmp_path, backend="tflite")
    with pytest.raises(FBClipError, match="--artifacts"):
        open_backend(EvalConfig(data=squares, model=tmp_path, backend="onnxruntime"))
    with pytest.raises(FBClipError, match="not an artifacts folder.*fbclip-edge export"):
        open_backend(EvalConfig(data=squares, artifacts=tmp_path, backend="onnxruntime"))
    with pytest.raises(FBClipError, match="no samples"):
        evaluate_backend(BrightnessBackend(), [])
