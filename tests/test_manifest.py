"""manifest.json round trip and the refusals on load: missing, corrupted or swapped files, a
changed model, an engine for another TensorRT or GPU, a batch outside the profile."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from fbclip_edge import FBClipError, create_model, save_model
from fbclip_edge.artifacts.manifest import (
    MANIFEST,
    ArtifactError,
    EngineSpec,
    read_manifest,
    sha256_file,
    verify_files,
    write_manifest,
)
from fbclip_edge.artifacts.options import BatchProfile, GraphRole, Precision, Scoring
from fbclip_edge.export import export_artifacts
from fbclip_edge.runtime import open as open_backend
from fbclip_edge.runtime.tensorrt import engine_mismatch

SIZE = 56


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest")
    save_model(create_model("tiny", image_size=SIZE, seed=1), root / "model")
    frames = [np.full((32, 32, 3), value, np.uint8) for value in (90, 160)]
    result = export_artifacts(
        root / "model",
        root / "artifacts",
        precision="fp32",
        targets="onnx",
        batch="1:2:4",
        parity_frames=frames,
    )
    return root, result


@pytest.fixture
def artifacts(tmp_path, exported):
    """A private copy to break."""
    root, result = exported
    folder = tmp_path / "artifacts"
    shutil.copytree(result.artifacts, folder)
    return folder


def _edit(folder, change):
    data = json.loads((folder / MANIFEST).read_text())
    change(data)
    (folder / MANIFEST).write_text(json.dumps(data))


def test_round_trip(exported, tmp_path):
    _, result = exported
    manifest = read_manifest(result.artifacts)
    assert manifest == result.manifest
    assert manifest.to_dict() == json.loads((result.artifacts / MANIFEST).read_text())
    write_manifest(manifest, tmp_path)
    assert read_manifest(tmp_path) == manifest
    assert manifest.batch == BatchProfile(1, 2, 4) and manifest.scoring == Scoring.KERNEL
    assert manifest.graph(GraphRole.VISION, Precision.FP32).file == "vision.onnx"
    assert manifest.graph(GraphRole.VISION, Precision.FP16) is None


def test_every_listed_file_is_hashed(exported):
    root, result = exported
    manifest = result.manifest
    listed = set(manifest.files)
    on_disk = {p.name for p in result.artifacts.iterdir()} - {MANIFEST}
    assert listed == on_disk
    for name, digest in manifest.files.items():
        assert sha256_file(result.artifacts / name) == digest
    assert manifest.model.weights_sha256 == sha256_file(root / "model" / "model.safetensors")
    assert manifest.model.path == str((root / "model").resolve())
    assert manifest.parity == "parity.json"


def test_keys_added_by_other_tools_survive_a_rewrite(artifacts):
    _edit(artifacts, lambda d: d.update(calibration={"image_threshold": 0.5}))
    manifest = read_manifest(artifacts)
    assert manifest.extra == {"calibration": {"image_threshold": 0.5}}
    write_manifest(manifest, artifacts)
    assert json.loads((artifacts / MANIFEST).read_text())["calibration"]["image_threshold"] == 0.5
    open_backend(artifacts, backend="onnxruntime", provider="cpu")


def test_missing_file_is_named(artifacts):
    (artifacts / "vision.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"vision\.onnx is missing.*re-export"):
        open_backend(artifacts, backend="onnxruntime", provider="cpu")


def test_corrupted_file_is_refused(artifacts):
    data = bytearray((artifacts / "text_features.npy").read_bytes())
    data[-1] ^= 0xFF
    (artifacts / "text_features.npy").write_bytes(bytes(data))
    with pytest.raises(
        ArtifactError,
        match=r"text_features\.npy does not match its sha256.*"
        "re-export",
    ):
        open_backend(artifacts, backend="onnxruntime", provider="cpu")


def test_truncated_graph_is_refused(artifacts):
    path = artifacts / "vision.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="vision.onnx does not match its sha256"):
        open_backend(artifacts, backend="onnxruntime", provider="cpu")


def test_manifest_sha_that_does_not_match_is_refused(artifacts):
    _edit(artifacts, lambda d: d["files"].update({"vision.onnx": "0" * 64}))
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        open_backend(artifacts, backend="onnxruntime", provider="cpu")


def test_unlisted_file_is_refused(artifacts):
    _edit(artifacts, lambda d: d["files"].pop("map_weights.npy"))
    with pytest.raises(ArtifactError, match="map_weights.npy is not listed"):
        verify_files(read_manifest(artifacts), artifacts, ["map_weights.npy"])


def test_broken_manifests_are_refused(artifacts, tmp_path):
    with pytest.raises(ArtifactError, match="not an artifacts folder.*fbclip-edge export"):
        read_manifest(tmp_path / "nowhere")
    text = (artifacts / MANIFEST).read_text()
    (artifacts / MANIFEST).write_text(text[: len(text) // 2])
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(artifacts)
    (artifacts / MANIFEST).write_text(text)
    _edit(artifacts, lambda d: d.update(schema_version=99))
    with pytest.raises(ArtifactError, match="schema version 99"):
        read_manifest(artifacts)
    _edit(artifacts, lambda d: d.update(schema_version=1, precision="int4"))
    with pytest.raises(ArtifactError, match="malformed"):
        read_manifest(artifacts)
    _edit(artifacts, lambda d: d.update(schema="something-else"))
    with pytest.raises(ArtifactError, match="not an fbclip-edge artifacts manifest"):
        read_manifest(artifacts)


def test_changed_model_is_refused_by_the_torch_backend(artifacts, exported, tmp_path):
    root, _ = exported
    model_copy = tmp_path / "model"
    shutil.copytree(root / "model", model_copy)
    _edit(artifacts, lambda d: d["model"].update(path=str(model_copy)))
    assert open_backend(artifacts, backend="torch", device="cpu").info.name == "torch"
    save_model(create_model("tiny", image_size=SIZE, seed=2), model_copy)
    with pytest.raises(ArtifactError, match="changed since.*re-export with `fbclip-edge export"):
        open_backend(artifacts, backend="torch", device="cpu")
    shutil.rmtree(model_copy)
    with pytest.raises(ArtifactError, match="is gone"):
        open_backend(artifacts, backend="torch", device="cpu")


def test_graph_from_another_export_is_refused(artifacts):
    """A graph that passes its sha256 (manifest regenerated) but does not fit the manifest."""
    shutil.copy(artifacts / "full.onnx", artifacts / "vision.onnx")
    digest = sha256_file(artifacts / "vision.onnx")
    _edit(artifacts, lambda d: d["files"].update({"vision.onnx": digest}))
    with pytest.raises(ArtifactError, match="belongs to another export"):
        open_backend(artifacts, backend="onnxruntime", provider="cpu")


def _engine(**changes):
    spec = EngineSpec(
        "vision.fp16.engine",
        GraphRole.VISION,
        Precision.FP16,
        "10.3.0",
        "8.9",
        "NVIDIA L4",
        BatchProfile(1, 8, 32),
        3,
        8 << 30,
        True,
        60.0,
    )
    return replace(spec, **changes)


def test_engine_for_another_tensorrt_or_gpu_is_refused():
    assert engine_mismatch(_engine(), "10.3.0", "8.9") is None
    assert "built with TensorRT 10.3.0, this is 10.7.0" in engine_mismatch(
        _engine(), "10.7.0", "8.9"
    )
    assert "compute capability 8.9 (NVIDIA L4), this GPU is 9.0" in engine_mismatch(
        _engine(), "10.3.0", "9.0"
    )


def test_engine_specs_round_trip_through_the_manifest(artifacts):
    manifest = read_manifest(artifacts)
    manifest.engines.append(_engine())
    write_manifest(manifest, artifacts)
    again = read_manifest(artifacts)
    assert again.engines == [_engine()] and again.engine() == _engine()
    assert json.loads((artifacts / MANIFEST).read_text())["engines"][0]["batch"] == {
        "min": 1,
        "opt": 8,
        "max": 32,
    }


def test_batch_outside_the_profile(artifacts):
    with pytest.raises(
        FBClipError,
        match=r"batch 40 is outside the profile 1\.\.32.*"
        "--batch 1:8:40",
    ):
        BatchProfile(1, 8, 32).check(40)
    BatchProfile(1, 8, 32).check(32)
    backend = open_backend(artifacts, backend="onnxruntime", provider="cpu")
    assert backend.batch_range == (1, 4)
    with pytest.raises(FBClipError, match=r"batch 5 is outside the batch profile 1\.\.4"):
        backend.run(torch.zeros(5, 3, SIZE, SIZE))
