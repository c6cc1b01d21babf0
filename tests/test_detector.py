"""The line-inspection API: every frame kind, original-resolution outputs, streaming."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fbclip_edge import FBClipError, create_model
from fbclip_edge.line.detector import Detector, Thresholds, split_frames
from fbclip_edge.runtime import TorchBackend


@pytest.fixture(scope="module")
def detector():
    return Detector(TorchBackend(create_model("tiny", image_size=56, seed=0), device="cpu"))


def _rgb(height=30, width=44, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "kind", ["rgb", "grey", "rgba", "uint16", "pil", "pil_grey", "tensor_hwc", "tensor_grey"]
)
def test_every_input_kind_gives_full_resolution_outputs(detector, kind):
    rgb = _rgb()
    frame = {
        "rgb": rgb,
        "grey": rgb[..., 0],
        "rgba": np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]),
        "uint16": rgb.astype(np.uint16) * 257,
        "pil": Image.fromarray(rgb),
        "pil_grey": Image.fromarray(rgb[..., 0]),
        "tensor_hwc": torch.from_numpy(rgb),
        "tensor_grey": torch.from_numpy(rgb[..., 0].copy()),
    }[kind]
    (detection,) = detector.predict(frame)
    assert detection.anomaly_map.shape == (30, 44) and detection.anomaly_map.dtype == np.float32
    assert detection.defect_mask.shape == (30, 44) and detection.defect_mask.dtype == bool
    assert 0.0 < detection.image_score < 1.0
    assert detection.is_anomalous == (detection.image_score >= detector.thresholds.image)


def test_same_pixels_same_answer_across_kinds(detector):
    rgb = _rgb(seed=3)
    a = detector.predict(rgb)[0]
    b = detector.predict(Image.fromarray(rgb))[0]
    c = detector.predict(np.dstack([rgb, np.zeros(rgb.shape[:2], np.uint8)]))[0]
    assert a.image_score == b.image_score == c.image_score
    assert np.array_equal(a.anomaly_map, b.anomaly_map)


def test_batch_of_mixed_sizes_keeps_each_frames_resolution(detector):
    frames = [_rgb(30, 44), _rgb(64, 20, seed=1), _rgb(56, 56, seed=2)]
    detections = detector.predict(frames)
    assert [d.anomaly_map.shape for d in detections] == [(30, 44), (64, 20), (56, 56)]
    batch = np.stack([_rgb(30, 44, seed=s) for s in range(3)])
    assert len(detector.predict(batch)) == 3
    single = [detector.predict(f)[0].image_score for f in frames]
    assert np.allclose([d.image_score for d in detections], single, atol=1e-6)


def test_one_map_call_per_distinct_frame_size(detector, monkeypatch):
    import fbclip_edge.line.detector as detector_module

    frames = [_rgb(30, 44), _rgb(64, 20, seed=1), _rgb(30, 44, seed=2), _rgb(64, 20, seed=3)]
    alone = [detector.predict(f)[0] for f in frames]
    calls = []
    real = detector_module.anomaly_map

    def counting(patch_prob, size, sigma):
        calls.append((patch_prob.shape[0], tuple(size)))
        return real(patch_prob, size, sigma)

    monkeypatch.setattr(detector_module, "anomaly_map", counting)
    together = detector.predict(frames)
    assert calls == [(2, (30, 44)), (2, (64, 20))]
    for one, batched in zip(alone, together, strict=True):
        assert batched.anomaly_map.shape == one.anomaly_map.shape
        assert np.allclose(batched.anomaly_map, one.anomaly_map, atol=1e-6)
        assert np.array_equal(batched.defect_mask, batched.anomaly_map >= detector.thresholds.pixel)
        assert batched.image_score == pytest.approx(one.image_score, abs=1e-6)
    calls.clear()
    detector.predict(np.stack([_rgb(30, 44, seed=s) for s in range(3)]))
    assert calls == [(3, (30, 44))]


def test_thresholds_drive_decision_and_mask(detector):
    rgb = _rgb(seed=4)
    loose = Detector(detector.backend, Thresholds(image=0.0, pixel=0.0))
    strict = Detector(detector.backend, Thresholds(image=1.01, pixel=1.01))
    assert loose.predict(rgb)[0].is_anomalous and loose.predict(rgb)[0].defect_area == 30 * 44
    assert not strict.predict(rgb)[0].is_anomalous and strict.predict(rgb)[0].defect_area == 0


def test_bad_frames_are_refused_clearly(detector):
    with pytest.raises(FBClipError, match="dtype float64"):
        detector.predict(np.zeros((8, 8, 3)))
    with pytest.raises(FBClipError, match="empty batch"):
        detector.predict([])
    with pytest.raises(FBClipError, match="tensor frames must be uint8"):
        detector.predict(torch.zeros(8, 8, 3))
    with pytest.raises(FBClipError, match="arrays, PIL images or tensors"):
        split_frames("frame.png")


def test_stream_matches_predict_in_order(detector):
    frames = [_rgb(seed=s) for s in range(7)]
    streamed = list(detector.stream(iter(frames), batch_size=3))
    direct = detector.predict(frames)
    assert [round(d.image_score, 6) for d in streamed] == [round(d.image_score, 6) for d in direct]


def test_stream_raises_producer_errors(detector):
    frames = [_rgb(), np.zeros((4, 4, 3), np.float64), _rgb()]
    with pytest.raises(FBClipError, match="dtype float64"):
        list(detector.stream(iter(frames)))


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS")).split()[1])


@pytest.mark.slow
def test_stream_soak_2000_frames_stable_memory(detector, capsys):
    """2,000 frames through stream: none dropped, RSS at the end close to the start."""
    rng = np.random.default_rng(0)
    pool = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(16)]
    warm = list(detector.stream((pool[i % 16] for i in range(64)), batch_size=4))
    assert len(warm) == 64
    start = _rss_kib()
    count = 0
    for count, detection in enumerate(  # noqa: B007 - count is read after the loop
        detector.stream((pool[i % 16] for i in range(2000)), batch_size=4), 1
    ):
        assert detection.anomaly_map.shape == (48, 64)
    end = _rss_kib()
    with capsys.disabled():
        print(f"\nstream soak: {count} frames, RSS {start / 1024:.1f} MiB -> {end / 1024:.1f} MiB")
    assert count == 2000
    assert end - start < 64 * 1024  # KiB: growth under 64 MiB over 2,000 frames


def test_open_captures_a_batch_1_cuda_graph_where_the_backend_allows(tmp_path, monkeypatch):
    """Detector.open asks a graph-capable backend (TensorRT) for a batch-1 CUDA graph, uses
    the stored calibration, and leaves other backends alone."""
    import json

    import fbclip_edge.runtime as runtime
    from fbclip_edge.line.calibrate import calibrate_scores, write_calibration

    captured = []

    class GraphBackend(TorchBackend):
        batch_range = (1, 8)

        def enable_cuda_graph(self, batch):
            captured.append(batch)

    model = create_model("tiny", image_size=56, seed=0)
    monkeypatch.setattr(runtime, "open", lambda *a, **k: GraphBackend(model, device="cpu"))
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 1}))
    write_calibration(tmp_path, calibrate_scores(np.linspace(0, 1, 20), [np.zeros((2, 2))], 0.1))
    detector = Detector.open(tmp_path, backend="tensorrt")
    assert captured == [1]
    # n = 20, target 0.1: k = ceil(21 * 0.9) = 19 -> the 19th of linspace(0, 1, 20) = 18 / 19
    assert detector.thresholds.calibrated and detector.thresholds.image == pytest.approx(18 / 19)
    Detector.open(tmp_path, backend="tensorrt", cuda_graph=False)
    assert captured == [1]  # an explicit choice wins
    monkeypatch.setattr(runtime, "open", lambda *a, **k: TorchBackend(model, device="cpu"))
    assert Detector.open(tmp_path).thresholds.calibrated
    assert captured == [1]  # no capture hook on this backend: nothing asked


def test_device_side_preprocessing_matches_the_host_path():
    """The GPU path (resize on the backend's device), run on CPU tensors, agrees with the
    PIL reference to a few grey levels and keeps every frame's size."""
    from fbclip_edge.line.detector import preprocess_on_device, preprocess_on_host

    frames = [_rgb(30, 44), torch.from_numpy(_rgb(64, 20, seed=1)), _rgb(56, 56, seed=2)[..., 0]]
    device_side, sizes = preprocess_on_device(frames, 56, torch.device("cpu"))
    host_side, host_sizes = preprocess_on_host(frames, 56)
    assert sizes == host_sizes == [(30, 44), (64, 20), (56, 56)]
    assert device_side.shape == host_side.shape == (3, 3, 56, 56)
    assert (device_side - host_side).abs().mean() < 3 / 255 / 0.27
