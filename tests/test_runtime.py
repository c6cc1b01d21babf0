"""runtime.open over an artifacts folder: onnxruntime CPU and torch match the model; auto picks
and explains; the authors' fixture at 518 px matches at batch 1, 2, 3 and 8."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fbclip_edge import FBClipError, create_model, save_model
from fbclip_edge.artifacts.options import tensorrt_usable
from fbclip_edge.export import export_artifacts
from fbclip_edge.runtime import Backend, TorchBackend
from fbclip_edge.runtime import open as open_backend
from fbclip_edge.runtime.onnxruntime import available_providers

SIZE = 112


@pytest.fixture(scope="module")
def model():
    return create_model("tiny", image_size=SIZE, seed=3).eval()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("runtime")
    save_model(model, root / "model")
    frames = [np.random.default_rng(s).integers(0, 255, (64, 64, 3), np.uint8) for s in range(2)]
    export_artifacts(
        root / "model",
        root / "artifacts",
        precision="fp32",
        targets="onnx",
        batch="1:4:8",
        parity_frames=frames,
    )
    return root / "artifacts"


def _pixels(batch, seed=0):
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch", [1, 2, 3, 8])
def test_onnxruntime_cpu_matches_pytorch(artifacts, model, batch):
    backend = open_backend(artifacts, backend="onnxruntime", provider="cpu")
    pixels = _pixels(batch, seed=batch)
    score, patch = backend.run(pixels)
    with torch.no_grad():
        expected = model(pixels)
    assert score.shape == (batch,) and patch.shape == (batch, 1, SIZE // 14, SIZE // 14)
    assert score.dtype == patch.dtype == torch.float32
    torch.testing.assert_close(score, expected.image_score, atol=1e-4, rtol=0)
    torch.testing.assert_close(patch, expected.patch_map, atol=1e-4, rtol=0)


def test_onnxruntime_reports_the_provider_in_use(artifacts):
    backend = open_backend(artifacts, backend="onnxruntime", provider="cpu")
    assert isinstance(backend, Backend)
    assert backend.info.name == "onnxruntime" and backend.info.device == "cpu"
    assert backend.info.details["providers"] == "CPUExecutionProvider"
    assert backend.info.details["graph"] == "vision.onnx"
    assert backend.info.precision == "fp32" and backend.image_size == SIZE
    assert backend.input_device == torch.device("cpu")


def test_numpy_input_is_accepted(artifacts):
    backend = open_backend(artifacts, backend="onnxruntime", provider="cpu")
    pixels = _pixels(2, seed=5)
    from_array = backend.run(pixels.numpy())
    from_tensor = backend.run(pixels)
    torch.testing.assert_close(from_array, from_tensor)


def test_torch_backend_reloads_the_recorded_model(artifacts, model):
    backend = open_backend(artifacts, backend="torch", device="cpu")
    assert isinstance(backend, TorchBackend) and backend.info.details["scoring"] == "model"
    pixels = _pixels(2, seed=7)
    with torch.no_grad():
        expected = model(pixels)
    score, patch = backend.run(pixels)
    torch.testing.assert_close(score, expected.image_score, atol=1e-6, rtol=0)
    torch.testing.assert_close(patch, expected.patch_map, atol=1e-6, rtol=0)


def test_auto_picks_the_fastest_available_and_says_why(artifacts):
    backend = open_backend(artifacts)
    if torch.cuda.is_available() and "cuda" in available_providers():
        assert backend.info.details["provider"] == "cuda"
    else:
        assert backend.info.name == "onnxruntime" and backend.info.details["provider"] == "cpu"
        assert (
            "not tensorrt: the artifacts have no TensorRT engine"
            in (backend.info.details["selected"])
        )
    assert backend.info.details["artifacts"] == str(artifacts)


def test_auto_falls_back_to_torch_without_onnxruntime(artifacts, monkeypatch):
    import fbclip_edge.runtime.onnxruntime as ort_backend
    import fbclip_edge.runtime.openvino as ov_backend

    monkeypatch.setattr(ort_backend, "available_providers", lambda: [])
    monkeypatch.setattr(ov_backend, "openvino_available", lambda: False)
    backend = open_backend(artifacts, device="cpu")
    assert backend.info.name == "torch"
    assert "not onnxruntime or openvino: not installed" in backend.info.details["selected"]


def test_missing_provider_is_a_clear_error(artifacts):
    if "cuda" in available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(FBClipError, match="provider 'cuda' is not available.*provider='cpu'"):
        open_backend(artifacts, backend="onnxruntime", provider="cuda")


def test_bad_options_are_clear_errors(artifacts):
    cases = [
        (dict(backend="tflite"), "backend must be one of"),
        (dict(backend="onnxruntime", provider="rocm"), "provider must be one of"),
        (dict(backend="torch", provider="cpu"), "provider applies to backend='onnxruntime'"),
        (dict(backend="onnxruntime", cuda_graph=True), "cuda_graph applies to"),
        (dict(backend="onnxruntime", precision="int4"), "precision must be fp32 or fp16 or"),
        (dict(backend="onnxruntime", provider="cpu", precision="int8"), "no int8 vision graph"),
        (dict(backend="openvino", device="cuda"), "openvino' runs on the CPU"),
        (dict(backend="torch", precision="int8"), "backend='torch' runs fp32 or fp16"),
        (dict(backend="torch", threads=2), "threads takes a count"),
        (dict(backend="onnxruntime", provider="cpu", precision="fp16"), "no fp16 vision graph"),
    ]
    for options, match in cases:
        with pytest.raises(FBClipError, match=match):
            open_backend(artifacts, **options)


def test_tensorrt_backend_without_tensorrt_is_a_clear_error(artifacts):
    if tensorrt_usable():
        pytest.skip("TensorRT is usable here")
    with pytest.raises(FBClipError, match=r"fbclip-edge\[trt\]"):
        open_backend(artifacts, backend="tensorrt")


def test_batch_outside_the_profile_is_refused_by_every_backend(artifacts):
    for name in ("onnxruntime", "torch"):
        backend = open_backend(artifacts, backend=name, device="cpu" if name == "torch" else None)
        with pytest.raises(
            FBClipError,
            match=r"batch 9 is outside the batch profile 1\.\.8.*"
            r"--batch 1:8:9",
        ):
            backend.run(torch.zeros(9, 3, SIZE, SIZE))


def test_bad_input_is_refused(artifacts):
    backend = open_backend(artifacts, backend="onnxruntime", provider="cpu")
    with pytest.raises(FBClipError, match="preprocess"):
        backend.run(torch.zeros(1, 3, 64, 64))
    with pytest.raises(FBClipError, match="float32"):
        backend.run(torch.zeros(1, 3, SIZE, SIZE, dtype=torch.float64))


def test_eval_metrics_match_between_torch_and_onnxruntime(tmp_path, artifacts, model):
    """`fbclip-edge eval --backend onnxruntime` equals `--backend torch` to 1e-4."""
    evaluation = pytest.importorskip("fbclip_edge.eval")
    from fbclip_edge.data.layouts import load_dataset
    from fbclip_edge.data.synthetic import make_synthetic

    make_synthetic(tmp_path / "data", categories=1, images=4, size=64, seed=0)
    samples = load_dataset(tmp_path / "data", split="test", require_masks=True)
    reference = evaluation.evaluate_backend(TorchBackend(model, "cpu"), samples, batch_size=4)
    exported = evaluation.evaluate_backend(
        open_backend(artifacts, backend="onnxruntime", provider="cpu"), samples, batch_size=4
    )
    for key, value in reference.mean.items():
        other = exported.mean[key]
        assert (np.isnan(value) and np.isnan(other)) or abs(value - other) <= 1e-4, key


@pytest.mark.slow
def test_fixture_onnxruntime_cpu_matches_pytorch_at_batch_1_2_3_8(
    tmp_path_factory, reference_model, reference_intermediates, golden
):
    """The authors' tiny model at 518 px: one export, then batches made from the two golden
    images in varying orders (a mixed-up batch index would show)."""
    root = tmp_path_factory.mktemp("fixture")
    save_model(reference_model, root / "model")
    first = golden["pixel_values"][:1].permute(0, 2, 3, 1).mul(255).clamp(0, 255)
    export_artifacts(
        root / "model",
        root / "artifacts",
        precision="fp32",
        targets="onnx",
        batch="1:8:8",
        parity_frames=[first[0].byte().numpy()],
    )
    backend = open_backend(root / "artifacts", backend="onnxruntime", provider="cpu")
    expected = reference_intermediates.output
    for order in ([1], [0, 1], [1, 0, 1], [0, 1, 1, 0, 0, 0, 1, 1]):
        index = torch.tensor(order)
        score, patch = backend.run(golden["pixel_values"][index])
        torch.testing.assert_close(score, expected.image_score[index], atol=1e-4, rtol=0)
        torch.testing.assert_close(patch, expected.patch_map[index], atol=1e-4, rtol=0)
