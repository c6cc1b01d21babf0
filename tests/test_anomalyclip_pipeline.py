"""AnomalyCLIP through the whole pipeline: export (fp32 and mixed-precision ONNX, parity
gated) on the authors' fixture, runtime.open, Detector, calibrate, predict, train with its
recipe and resume, eval."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import fbclip_edge
from fbclip_edge import create_model, save_model
from fbclip_edge.artifacts.manifest import read_manifest
from fbclip_edge.data import make_synthetic
from fbclip_edge.demo import find_fixture, fixture_files
from fbclip_edge.eval import EvalConfig, run_eval
from fbclip_edge.export import export_artifacts
from fbclip_edge.line.calibrate import calibrate_folder
from fbclip_edge.line.detector import Detector
from fbclip_edge.line.predict import predict_files
from fbclip_edge.runtime import open as open_backend
from fbclip_edge.train import TrainConfig, train

SMALL = 56


@pytest.fixture(scope="module")
def fixture():
    found = find_fixture("anomalyclip")
    if found is None:
        pytest.skip("anomalyclip-reference-tiny fixture not found next to the checkout")
    return found


@pytest.fixture(scope="module")
def golden(fixture):
    return torch.load(fixture / "golden.pt", map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, fixture, golden):
    """The fixture's model (layers 6, 12, 18, 24) exported fp32 and fp16, parity gated."""
    root = tmp_path_factory.mktemp("anomalyclip-export")
    clip, checkpoint, _ = fixture_files("anomalyclip")
    fbclip_edge.import_official(
        fixture / clip, fixture / checkpoint, root / "model", method="anomalyclip"
    )
    frames = list(golden["images_uint8"].numpy())
    out = {}
    for precision in ("fp32", "fp16"):
        export_artifacts(
            root / "model", root / precision, precision=precision, targets="onnx",
            batch="1:2:3", parity_frames=frames, parity_labels=[0, 1],
        )  # fmt: skip
        out[precision] = root / precision
    return root / "model", out


def test_manifest_records_the_method_and_rule(exported):
    _, folders = exported
    manifest = read_manifest(folders["fp32"])
    assert manifest.method == "anomalyclip" and manifest.score_rule == "prob_sum"
    assert manifest.num_maps == 4 and manifest.temperature == pytest.approx(0.07)
    parity = json.loads((folders["fp16"] / "parity.json").read_text())
    assert parity  # the export's own gate passed (it raises when over tolerance)


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_fp32_graph_in_onnxruntime_matches_the_reference(exported, golden, batch):
    _, folders = exported
    backend = open_backend(folders["fp32"], backend="onnxruntime", provider="cpu")
    pixels = golden["pixel_values"][[i % 2 for i in range(batch)]]
    score, patch = backend.run(pixels)
    want_score = golden["image_score"][[i % 2 for i in range(batch)]]
    want_patch = golden["patch_map"][[i % 2 for i in range(batch)]]
    torch.testing.assert_close(score, want_score, atol=1e-4, rtol=0)
    torch.testing.assert_close(patch, want_patch, atol=1e-4, rtol=0)


def test_mixed_precision_graph_within_fp16_tolerances(exported, golden):
    _, folders = exported
    manifest = read_manifest(folders["fp16"])
    assert manifest.precision.value == "fp16"
    backend = open_backend(folders["fp16"], backend="onnxruntime", provider="cpu")
    score, patch = backend.run(golden["pixel_values"])
    assert (score - golden["image_score"]).abs().max() <= 5e-3
    # the map sums four layers' probabilities: the fp16 map tolerance applies per layer
    assert (patch - golden["patch_map"]).abs().max() <= 4 * 1e-2


def test_detector_on_exported_anomalyclip_gives_the_fixture_maps(exported, golden):
    _, folders = exported
    detector = Detector.open(folders["fp32"], backend="onnxruntime")
    detections = detector.predict(list(golden["images_uint8"].numpy()))
    for index, detection in enumerate(detections):
        assert detection.image_score == pytest.approx(float(golden["image_score"][index]), abs=1e-4)
        full = golden["anomaly_map"][index].numpy()
        assert np.abs(detection.anomaly_map - full).max() < 1e-4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("anomalyclip-data") / "data"
    names = make_synthetic(root, categories=2, images=4, size=64, seed=2)
    return root, names


def test_calibrate_and_predict_with_anomalyclip(tmp_path, data):
    root, names = data
    model = create_model("tiny", image_size=SMALL, method="anomalyclip", seed=0)
    save_model(model, tmp_path / "model")
    export_artifacts(tmp_path / "model", tmp_path / "art", precision="fp32", targets="onnx",
                     batch="1:2:4")  # fmt: skip
    detector = Detector.open(tmp_path / "art", backend="onnxruntime")
    run = calibrate_folder(detector, root / names[0] / "test" / "good", target_fpr=0.2)
    assert run.calibration.n_images >= 1 and not run.failed
    result = predict_files(detector, [root / names[1] / "test"], tmp_path / "pred", False)
    assert result.rows and not result.failed
    assert all(0.0 <= row.score <= 1.0 for row in result.rows)


def test_train_anomalyclip_with_its_recipe_then_resume(tmp_path, data):
    root, names = data
    config = TrainConfig.for_method(
        "anomalyclip", data=root, out=tmp_path / "run", backbone="tiny", image_size=SMALL,
        epochs=1, batch_size=2, max_steps=1, progress=False, categories=(names[0],),
    )  # fmt: skip
    assert config.lr == 1e-3 and config.betas == (0.5, 0.999) and config.seed == 111
    result = train(config)
    first = fbclip_edge.load(tmp_path / "run" / "last")
    assert first.method == "anomalyclip" and result.history[0].steps == 1
    assert {"total", "image_ce"} <= set(result.history[0].losses)
    fresh = create_model("tiny", image_size=SMALL, method="anomalyclip", seed=111)
    moved = [
        name for name, value in first.state_dict().items()
        if name.startswith("prompt_learner.") and not torch.equal(value, fresh.state_dict()[name])
    ]  # fmt: skip
    assert any("ctx_pos" in name for name in moved)
    resumed = train(TrainConfig.for_method(
        "anomalyclip", data=root, out=tmp_path / "run", backbone="tiny", image_size=SMALL,
        epochs=2, batch_size=2, max_steps=1, progress=False, categories=(names[0],),
        resume=tmp_path / "run" / "last",
    ))  # fmt: skip
    assert [log.epoch for log in resumed.history] == [1, 2]


def test_eval_runs_an_anomalyclip_model_folder(tmp_path, data):
    root, names = data
    model = create_model("tiny", image_size=SMALL, method="anomalyclip", seed=0)
    save_model(model, tmp_path / "model")
    report = run_eval(
        EvalConfig(data=root, model=tmp_path / "model", categories=(names[1],), progress=False)
    )
    assert names[1] in report.categories
