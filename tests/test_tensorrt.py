"""TensorRT engines of the tiny model: FP16 and FP32 parity, CUDA graphs, profile and machine
checks. Needs the tensorrt package and a CUDA GPU; skipped otherwise."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from fbclip_edge import FBClipError, create_model, save_model
from fbclip_edge.artifacts.manifest import MANIFEST, ArtifactError
from fbclip_edge.export import export_artifacts

pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu]
trt = pytest.importorskip("tensorrt")
if getattr(trt, "__file__", None) is None:  # an empty namespace package: tensorrt-stubs alone
    pytest.skip("only tensorrt-stubs is installed, not TensorRT", allow_module_level=True)
if not torch.cuda.is_available():
    pytest.skip("TensorRT tests need a CUDA GPU", allow_module_level=True)

from fbclip_edge.runtime import open as open_backend  # noqa: E402

SIZE = 112


@pytest.fixture(scope="module")
def model():
    return create_model("tiny", image_size=SIZE, seed=0).eval()


def _export(root, model, precision, scoring="kernel"):
    save_model(model, root / "model")
    return export_artifacts(
        root / "model",
        root / f"artifacts-{precision}-{scoring}",
        precision=precision,
        targets="onnx,trt",
        scoring=scoring,
        batch="1:4:8",
        workspace_gb=2,
        optimization_level=2,
    )


@pytest.fixture(scope="module")
def fp16(tmp_path_factory, model):
    return _export(tmp_path_factory.mktemp("trt16"), model, "fp16")


@pytest.fixture(scope="module")
def fp32(tmp_path_factory, model):
    return _export(tmp_path_factory.mktemp("trt32"), model, "fp32")


def _pixels(batch, seed=0):
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _expected(model, pixels):
    model = model.cuda()
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        output = model.score(model.encode_maps(pixels.cuda()), impl="torch")
    return output.image_score.float(), output.patch_map.float()


def test_engine_is_recorded_with_machine_and_profile(fp16):
    manifest = fp16.manifest
    engine = manifest.engine()
    assert engine.file == "vision.fp16.engine" and engine.strongly_typed
    assert engine.tensorrt_version == trt.__version__
    major, minor = torch.cuda.get_device_capability()
    assert engine.compute_capability == f"{major}.{minor}"
    assert (engine.batch.min, engine.batch.opt, engine.batch.max) == (1, 4, 8)
    assert manifest.timing_cache == "timing.cache" and "timing.cache" in manifest.files
    assert manifest.versions["tensorrt"] == trt.__version__
    assert [row.target for row in fp16.parity.rows][-1] == "vision.fp16.engine"
    assert fp16.parity.passed


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_fp16_engine_within_fp16_tolerance(fp16, model, batch):
    backend = open_backend(fp16.artifacts, backend="tensorrt")
    assert backend.info.name == "tensorrt" and backend.info.precision == "fp16"
    pixels = _pixels(batch, seed=batch)
    score, patch = backend.run(pixels)
    want_score, want_patch = _expected(model, pixels)
    assert (score - want_score).abs().max() <= 5e-3
    assert (patch - want_patch).abs().max() <= 1e-2


def test_fp32_engine_within_1e4(fp32, model):
    backend = open_backend(fp32.artifacts, backend="tensorrt")
    pixels = _pixels(3, seed=11)
    score, patch = backend.run(pixels)
    want_score, want_patch = _expected(model, pixels)
    torch.testing.assert_close(score, want_score, atol=1e-4, rtol=0)
    torch.testing.assert_close(patch, want_patch, atol=1e-4, rtol=0)


def test_full_graph_engine(tmp_path, model):
    result = _export(tmp_path, model, "fp16", scoring="graph")
    assert result.manifest.engine().file == "full.fp16.engine"
    backend = open_backend(result.artifacts, backend="tensorrt")
    assert backend.scorer is None
    pixels = _pixels(2, seed=4)
    score, patch = backend.run(pixels)
    want_score, want_patch = _expected(model, pixels)
    assert (score - want_score).abs().max() <= 5e-3
    assert (patch - want_patch).abs().max() <= 1e-2


def test_cuda_graph_replay_matches_plain_execution(fp16):
    plain = open_backend(fp16.artifacts, backend="tensorrt")
    graphed = open_backend(fp16.artifacts, backend="tensorrt", cuda_graph=4)
    assert graphed.info.details["cuda_graph"] == "batch 4"
    for seed, batch in ((0, 4), (1, 2), (2, 4)):  # another batch in between re-records
        pixels = _pixels(batch, seed=seed)
        for got, want in zip(graphed.run(pixels), plain.run(pixels), strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_outputs_survive_the_next_call(fp16):
    backend = open_backend(fp16.artifacts, backend="tensorrt")
    first = backend.run(_pixels(2, seed=0))[0].clone()
    kept = backend.run(_pixels(2, seed=0))[0]
    backend.run(_pixels(2, seed=1))
    torch.testing.assert_close(kept, first)


def test_batch_outside_the_engine_profile(fp16):
    backend = open_backend(fp16.artifacts, backend="tensorrt")
    with pytest.raises(FBClipError, match=r"batch 9 is outside .*1\.\.8"):
        backend.run(_pixels(9))


def test_auto_picks_tensorrt(fp16):
    backend = open_backend(fp16.artifacts)
    assert backend.info.name == "tensorrt"
    assert "TensorRT engine built for this GPU" in backend.info.details["selected"]


def _copy_with(tmp_path, result, change):
    folder = tmp_path / "artifacts"
    shutil.copytree(result.artifacts, folder)
    data = json.loads((folder / MANIFEST).read_text())
    change(data["engines"][0])
    (folder / MANIFEST).write_text(json.dumps(data))
    return folder


def test_engine_for_another_gpu_is_refused_with_the_rebuild_command(tmp_path, fp16):
    folder = _copy_with(tmp_path, fp16, lambda e: e.update(compute_capability="5.0"))
    with pytest.raises(
        ArtifactError,
        match="compute capability 5.0.*rebuild on this machine with `fbclip-edge export",
    ):
        open_backend(folder, backend="tensorrt")
    auto = open_backend(folder)  # auto skips it and says why
    assert auto.info.name == "onnxruntime" or auto.info.name == "torch"
    assert "the engine does not fit" in auto.info.details["selected"]


def test_engine_for_another_tensorrt_is_refused(tmp_path, fp16):
    folder = _copy_with(tmp_path, fp16, lambda e: e.update(tensorrt_version="9.0.0"))
    with pytest.raises(ArtifactError, match="built with TensorRT 9.0.0"):
        open_backend(folder, backend="tensorrt")


def test_corrupted_engine_is_refused(tmp_path, fp16):
    folder = _copy_with(tmp_path, fp16, lambda e: None)
    path = folder / "vision.fp16.engine"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        open_backend(folder, backend="tensorrt")


def test_timing_cache_is_reused(tmp_path, fp16, model):
    cache = fp16.artifacts / "timing.cache"
    save_model(model, tmp_path / "model")
    result = export_artifacts(
        tmp_path / "model",
        tmp_path / "again",
        precision="fp16",
        targets="trt",
        batch="1:4:8",
        timing_cache=cache,
        parity_frames=[np.zeros((32, 32, 3), np.uint8)] * 2,
    )
    assert (result.artifacts / "timing.cache").stat().st_size >= cache.stat().st_size * 0.5
    assert result.manifest.engine().build_seconds <= fp16.manifest.engine().build_seconds * 2
