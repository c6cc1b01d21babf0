"""`fbclip-edge eval` on FiLo: each image's category comes from the dataset, maps and scores are
the FrameBackend's own, and a category missing from the descriptions stops the run up front.

The fixture's two 518 x 518 images (bottle normal, pcb1 anomalous) plus flipped copies make a
tiny MVTec-layout dataset in which every category has normal and anomalous images, so every
metric is defined. A FakeFrames backend (no fixture needed) pins how (S, S) maps meet masks
of another size.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from fbclip_edge.cli import app
from fbclip_edge.data import load_dataset, read_image, read_mask
from fbclip_edge.errors import FBClipError
from fbclip_edge.eval import FRAME_MAP_NOTE, evaluate_backend, report_markdown
from fbclip_edge.metrics import METRIC_KEYS
from fbclip_edge.metrics import evaluate as metrics_evaluate
from fbclip_edge.runtime.base import BackendInfo, FrameBackend, FrameResult

runner = CliRunner()
BATCH = 3  # every category holds 3 images: one backend call per category


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Single-threaded: a loaded 2-core runner makes OpenMP spin (see test_train.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _category(root: Path, name: str, good: list[np.ndarray], bad: list[tuple]) -> None:
    """One MVTec category: good images, and (image, 0/1 mask) pairs under defect 'flaw'."""
    for i, image in enumerate(good):
        _write(root / name / "test" / "good" / f"{i:03d}.png", image)
    for i, (image, mask) in enumerate(bad):
        _write(root / name / "test" / "flaw" / f"{i:03d}.png", image)
        _write(root / name / "ground_truth" / "flaw" / f"{i:03d}_mask.png", mask * 255)


# --------------------------------------------------------------------------- no fixture


class FakeFrames(FrameBackend):
    """Maps at S from each frame's brightness (resampled to S): known values to track."""

    def __init__(self, size: int = 32, categories: tuple[str, ...] = ("a", "b")) -> None:
        self.info = BackendInfo("fake", "cpu", "fp32", size, {"method": "filo"})
        self.categories = categories
        self.calls: list[list[str]] = []

    def _run_frames(self, frames: list[np.ndarray], categories: list[str]) -> list[FrameResult]:
        self.calls.append(categories)
        results = []
        for frame, name in zip(frames, categories, strict=True):
            grey = torch.tensor(frame).float().mean(dim=-1)[None, None] / 255
            amap = F.interpolate(grey, size=(self.image_size,) * 2, mode="area")[0, 0]
            results.append(FrameResult(float(amap.max()), amap, [], None, name))
        return results


@pytest.fixture(scope="module")
def squares(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Categories a (frames at S = 32) and b (48 x 64 frames): bright squares are defects."""
    root = tmp_path_factory.mktemp("fake") / "data"
    for name, (h, w) in (("a", (32, 32)), ("b", (48, 64))):
        plain = np.full((h, w, 3), 20, np.uint8)
        bad = []
        for top in (2, h // 2):
            image, mask = plain.copy(), np.zeros((h, w), np.uint8)
            image[top : top + 8, 4:12], mask[top : top + 8, 4:12] = 235, 1
            bad.append((image, mask))
        _category(root, name, [plain], bad)
    return root


def test_frame_maps_meet_masks_at_ground_truth_size(squares, monkeypatch):
    """S x S frames keep the backend's map exactly; others get it bilinearly upsampled
    (align_corners False, FB-CLIP's patch-map upsampling) and no extra blur."""
    seen: list[tuple[np.ndarray, np.ndarray]] = []
    real = metrics_evaluate

    def spy(labels: Any, scores: Any, masks: Any, maps: Any) -> dict[str, float]:
        seen.append((masks, maps))
        return real(labels, scores, masks, maps)

    monkeypatch.setattr("fbclip_edge.eval.evaluate", spy)
    backend = FakeFrames()
    samples = load_dataset(squares)
    report = evaluate_backend(backend, samples, batch_size=BATCH, sigma=4.0)
    assert backend.calls == [["a"] * 3, ["b"] * 3]
    expected = backend.run_frames(
        [read_image(s.image_path) for s in samples], [s.category for s in samples]
    )
    a_maps, b_maps = seen[0][1], seen[1][1]
    for i in range(3):
        assert np.array_equal(a_maps[i], expected[i].anomaly_map.numpy())
        upsampled = F.interpolate(
            expected[3 + i].anomaly_map[None, None], (48, 64), mode="bilinear", align_corners=False
        )[0, 0]
        assert np.array_equal(b_maps[i], upsampled.numpy())
        mask = read_mask(samples[3 + i].mask_path, (48, 64)) > 0.5
        assert np.array_equal(seen[1][0][i], mask)
    assert report.categories["b"].resolution == [48, 64]
    assert report.method == "filo" and FRAME_MAP_NOTE in report.notes
    assert report.to_dict()["anomaly_map"]["sigma"] is None
    assert report_markdown(report).startswith("# FiLo (ACM MM 2024) zero-shot evaluation")


def test_unknown_categories_are_named_before_any_frame_runs(squares):
    backend = FakeFrames(categories=("a",))
    with pytest.raises(FBClipError, match=r"categories b are not in the descriptions \(known: a\)"):
        evaluate_backend(backend, load_dataset(squares), batch_size=BATCH)
    assert backend.calls == []


def test_reports_name_the_method_they_ran(squares):
    from fbclip_edge import create_model
    from fbclip_edge.runtime.base import TorchBackend

    backend = TorchBackend(create_model("tiny", image_size=56), "cpu")
    report = evaluate_backend(backend, load_dataset(squares, categories=["a"]))
    assert report.method == "fbclip" and report.to_dict()["method"] == "fbclip"
    assert report_markdown(report).startswith("# FB-CLIP (CVPR 2026) zero-shot evaluation")
    assert report.to_dict()["anomaly_map"] == {"sigma": 4.0, "resolution": "ground truth"}


# --------------------------------------------------------------------------- the fixture


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    pytest.importorskip("transformers")
    from filo_fixture import fixture_dir, load_golden

    return load_golden(fixture_dir())


@pytest.fixture(scope="module")
def filo_model(tmp_path_factory: pytest.TempPathFactory, golden: dict[str, Any]) -> Path:
    """The fixture saved as a FiLo model folder, Grounding DINO included."""
    from filo_fixture import fixture_dir, grounding_detector, load_model, write_descriptions

    from fbclip_edge.methods.filo import save_filo

    folder = fixture_dir()
    root = tmp_path_factory.mktemp("filo")
    descriptions = write_descriptions(golden, root / "descriptions.json")
    return save_filo(
        root / "model",
        load_model(folder, golden),
        descriptions,
        grounding=grounding_detector(folder, golden),
        bert_dir=folder / "bert",
    )


def _fixture_frames(golden: dict[str, Any]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    images = [golden["images_uint8"][i].numpy() for i in range(2)]
    masks = [golden["masks"][i].numpy().astype(np.uint8) for i in range(2)]
    return images, masks


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, golden: dict[str, Any]) -> Path:
    """bottle: image 0 and its mirror image (normal), image 1 (anomalous); pcb1: image 0
    (normal), image 1 and its mirror image (anomalous)."""
    (normal, anomalous), (_, mask) = _fixture_frames(golden)
    root = tmp_path_factory.mktemp("filo-data") / "data"
    mirrored = (np.ascontiguousarray(anomalous[:, ::-1]), np.ascontiguousarray(mask[:, ::-1]))
    _category(root, "bottle", [normal, np.ascontiguousarray(normal[:, ::-1])], [(anomalous, mask)])
    _category(root, "pcb1", [normal], [(anomalous, mask), mirrored])
    return root


def _eval(data: Path, out: Path, *source: str) -> dict[str, Any]:
    args = ["eval", "--data", str(data), "--batch-size", str(BATCH), "--no-progress"]
    result = runner.invoke(app, [*args, "--out", str(out), *source])
    assert result.exit_code == 0, result.output
    assert "FiLo (ACM MM 2024) zero-shot evaluation" in result.output
    report: dict[str, Any] = json.loads(out.read_text())
    return report


@dataclass
class FolderEval:
    """One eval of the FiLo model folder: its JSON report, where it was written, and the
    (labels, scores, masks, maps) each category's metrics were computed from."""

    report: dict[str, Any]
    out: Path
    seen: list[tuple[np.ndarray, ...]]


@pytest.fixture(scope="module")
def folder_eval(
    tmp_path_factory: pytest.TempPathFactory, dataset: Path, filo_model: Path
) -> FolderEval:
    seen: list[tuple[np.ndarray, ...]] = []

    def spy(labels: Any, scores: Any, masks: Any, maps: Any) -> dict[str, float]:
        seen.append((labels, scores, masks, maps))
        return metrics_evaluate(labels, scores, masks, maps)

    out = tmp_path_factory.mktemp("reports") / "filo.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("fbclip_edge.eval.evaluate", spy)
        report = _eval(dataset, out, "--model", str(filo_model))
    return FolderEval(report, out, seen)


def test_eval_filo_folder_equals_the_frame_backend(dataset, filo_model, folder_eval):
    """Scores and maps are exactly what FiLoBackend gives on the same frames (same batches),
    and the metrics are fbclip_edge.metrics on them."""
    from fbclip_edge.methods.filo import load_filo
    from fbclip_edge.methods.filo.stages import torch_pipeline
    from fbclip_edge.runtime.filo import FiLoBackend

    loaded = load_filo(filo_model)
    backend = FiLoBackend(
        torch_pipeline(loaded.model, loaded.table, loaded.detector),
        BackendInfo("torch", "cpu", "fp32", 518),
    )
    report = folder_eval.report
    samples = load_dataset(dataset)
    assert list(report["categories"]) == ["bottle", "pcb1"]
    for index, name in enumerate(("bottle", "pcb1")):
        members = [s for s in samples if s.category == name]
        frames = [read_image(s.image_path) for s in members]
        expected = backend.run_frames(frames, [name] * len(frames))
        labels, scores, masks, maps = folder_eval.seen[index]
        assert scores.tolist() == [r.image_score for r in expected]
        assert np.array_equal(maps, np.stack([r.anomaly_map.numpy() for r in expected]))
        truth = np.stack([read_mask(s.mask_path, (518, 518)) > 0.5 for s in members])
        assert np.array_equal(masks, truth)
        assert labels.tolist() == [s.label for s in members]
        direct = metrics_evaluate(
            np.array([s.label for s in members]),
            np.array([r.image_score for r in expected]),
            truth,
            np.stack([r.anomaly_map.numpy() for r in expected]),
        )
        for key in METRIC_KEYS:
            assert report["categories"][name]["metrics"][key] == direct[key], key
    assert all(not math.isnan(report["mean"][key]) for key in METRIC_KEYS)
    assert report["method"] == "filo" and report["backend"]["boxes"] == "Grounding DINO"
    assert report["anomaly_map"]["sigma"] is None
    markdown = folder_eval.out.with_suffix(".md").read_text()
    assert markdown.startswith("# FiLo (ACM MM 2024) zero-shot evaluation")


def test_eval_scores_the_fixture_images_as_the_reference(dataset, folder_eval, golden):
    """An anchor: with the dataset's category, image 0 under bottle and image 1 under pcb1
    get the reference's scores (batching moves float32 rounding only, hence 1e-5)."""
    samples = load_dataset(dataset)
    for index, (name, path) in enumerate((("bottle", "good/000.png"), ("pcb1", "flaw/000.png"))):
        members = [s for s in samples if s.category == name]
        row = [str(s.image_path).endswith(path) for s in members].index(True)
        score = folder_eval.seen[index][1][row]
        assert score == pytest.approx(float(golden["image_score"][index]), abs=1e-5)


def test_unknown_categories_stop_eval_in_one_line(dataset, filo_model, tmp_path, monkeypatch):
    import shutil

    from fbclip_edge.runtime.filo import FiLoBackend

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    for name in ("screw", "zipper"):
        shutil.copytree(data / "pcb1", data / name)

    def no_scoring(*args: Any) -> Any:
        raise AssertionError("scored before checking every category")

    monkeypatch.setattr(FiLoBackend, "_run_frames", no_scoring)
    args = ["eval", "--data", str(data), "--model", str(filo_model), "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert "categories screw, zipper are not in the descriptions" in lines[0]
    assert str(filo_model / "descriptions.json") in lines[0]
    assert "--descriptions FILE" in lines[0]


def test_filo_folder_refuses_runtime_options(dataset, filo_model):
    args = ["eval", "--data", str(dataset), "--model", str(filo_model), "--no-progress"]
    result = runner.invoke(app, [*args, "--backend", "onnxruntime"])
    assert result.exit_code == 1
    assert "--backend onnxruntime: a FiLo model folder runs on torch" in result.output


def test_eval_filo_artifacts_match_the_folder(dataset, filo_model, folder_eval, tmp_path):
    """--artifacts: torch (which reloads the model folder) gives the folder's metrics exactly,
    onnxruntime within 1e-4 on all but pixel_aupro_200 (ill-conditioned on flat maps, see
    tests/test_eval_backends.py)."""
    pytest.importorskip("onnxruntime")
    artifacts = tmp_path / "artifacts"
    args = ["export", "--model", str(filo_model), "--out", str(artifacts), "--precision", "fp32"]
    result = runner.invoke(app, [*args, "--batch", f"1:{BATCH}:{BATCH}"])
    assert result.exit_code == 0, result.output
    folder = folder_eval.report
    source = ("--artifacts", str(artifacts), "--backend")
    via_torch = _eval(dataset, tmp_path / "torch.json", *source, "torch")
    assert via_torch["categories"].keys() == folder["categories"].keys()
    for name, expected in folder["categories"].items():
        assert via_torch["categories"][name]["metrics"] == expected["metrics"], name
    via_ort = _eval(dataset, tmp_path / "ort.json", *source, "onnxruntime")
    assert via_ort["backend"]["name"] == "onnxruntime" and via_ort["method"] == "filo"
    compared = 0
    for name, expected in folder["categories"].items():
        for key, value in expected["metrics"].items():
            if key != "pixel_aupro_200":
                assert abs(via_ort["categories"][name]["metrics"][key] - value) <= 1e-4, key
                compared += 1
    assert compared == 2 * (len(METRIC_KEYS) - 1)
