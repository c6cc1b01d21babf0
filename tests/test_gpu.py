"""CUDA end to end: the code paths that only run on a GPU, checked against CPU / golden values.

Golden parity through the compiled Triton kernels, fp16 autocast, the Detector with
device-side preprocessing, the bench harness's torch backends, export parity with a CUDA
reference, onnxruntime's CUDA provider, and training with AMP. Every test skips without CUDA.
Float32 comparisons run under `strict_fp32` (no TF32): cuDNN convolutions, CLIP's patch
embedding among them, use TF32 by default, which alone costs more than 1e-4.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from fbclip_edge import anomaly_map as public_anomaly_map
from fbclip_edge import create_model, load, save_model
from fbclip_edge.artifacts.options import DEFAULT_TOLERANCES, Precision, Tolerance
from fbclip_edge.bench.backends import BASELINE
from fbclip_edge.bench.harness import STAGES, BenchConfig, run_bench
from fbclip_edge.bench.report import write_results
from fbclip_edge.data import make_synthetic
from fbclip_edge.export import export_artifacts
from fbclip_edge.export.parity import strict_fp32
from fbclip_edge.kernels import anomaly_map, backend_info, dispatch
from fbclip_edge.line.detector import Detector, preprocess_on_device, preprocess_on_host
from fbclip_edge.preprocess import OPENAI_STD
from fbclip_edge.runtime import MapScorer, TorchBackend
from fbclip_edge.runtime import open as open_backend
from fbclip_edge.train import (
    TrainConfig,
    _build_run,
    read_train_state,
    resume_config,
    train,
    training_step,
)

DEVICE = "cuda"
ORT_PROVIDER = "cuda"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GOLDEN_TOL = 1e-4  # float32 on the GPU vs the authors' CPU outputs
FP16_TOL = 2e-2  # fp16 autocast vs float32, on probabilities in [0, 1]
ONE_LEVEL = 1 / 255 / min(OPENAI_STD)  # one 8-bit grey level after normalization


def _max_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return (actual.detach().float().cpu() - expected.detach().float().cpu()).abs().max().item()


def _pixels(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _rgb(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _compiled_triton() -> bool:
    return dispatch.kernel_mode() == "compiled"


def _ort_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


@pytest.fixture
def fp32_only():
    """True float32 matmuls and convolutions on the GPU for the duration of a test."""
    with strict_fp32():
        yield


# ---------------------------------------------------------------- 1. golden parity on CUDA


@pytest.fixture(scope="module")
def cuda_reference(reference_model):
    """A CUDA copy of the authors' tiny model; the session fixture stays on the CPU for the
    other test files. Not re-eval()'d: the frozen text features move with the buffers."""
    model = copy.deepcopy(reference_model).to(DEVICE)
    assert not model.training and model.text_frozen
    return model


def test_cuda_intermediates_match_golden(cuda_reference, golden, fp32_only):
    with torch.no_grad():
        stages = cuda_reference.forward_intermediates(golden["pixel_values"].to(DEVICE))
        text = cuda_reference.encode_text()  # the text tower itself, run on the GPU
    for key in ("layer_tokens", "fg_masks", "enhanced_maps", "background", "map_logits"):
        actual = getattr(stages, key)
        assert actual.device.type == DEVICE, key
        assert _max_diff(actual, golden[key]) < GOLDEN_TOL, key
    assert _max_diff(text, golden["text_features"]) < GOLDEN_TOL
    assert _max_diff(stages.output.image_score, golden["image_score"]) < GOLDEN_TOL
    assert _max_diff(stages.output.patch_map, golden["patch_map"]) < GOLDEN_TOL


@pytest.mark.parametrize("impl", ["auto", "torch", "triton"])
def test_cuda_score_and_map_match_golden(cuda_reference, golden, fp32_only, impl):
    """score_maps and anomaly_map on the model's CUDA maps, each kernel implementation."""
    if impl == "triton" and not _compiled_triton():
        pytest.skip(f"Triton kernels are {dispatch.kernel_mode()} in this process")
    with torch.no_grad():  # the scale weights require grad: auto keeps torch under autograd
        maps = cuda_reference.encode_maps(golden["pixel_values"].to(DEVICE))
        output = cuda_reference.score(maps, impl=impl)
        full = anomaly_map(output.patch_map, (518, 518), 4.0, impl=impl)
    assert output.image_score.device.type == full.device.type == DEVICE
    assert output.image_score.dtype == output.patch_map.dtype == full.dtype == torch.float32
    assert _max_diff(output.image_score, golden["image_score"]) < GOLDEN_TOL
    assert _max_diff(output.patch_map, golden["patch_map"]) < GOLDEN_TOL
    assert _max_diff(full, golden["anomaly_map"]) < GOLDEN_TOL
    if impl == "auto" and _compiled_triton():
        info = backend_info(DEVICE)
        assert info.impl == "triton", info.reason


def test_cuda_forward_and_public_anomaly_map_match_golden(cuda_reference, golden, fp32_only):
    """The default path users call: model(pixels) and fbclip_edge.anomaly_map on a CUDA
    tensor (torch in, torch out, on the same device)."""
    with torch.no_grad():
        output = cuda_reference(golden["pixel_values"].to(DEVICE))
        full = public_anomaly_map(output.patch_map, (518, 518), sigma=4.0)
    assert isinstance(full, torch.Tensor) and full.device.type == DEVICE
    assert _max_diff(output.image_score, golden["image_score"]) < GOLDEN_TOL
    assert _max_diff(output.patch_map, golden["patch_map"]) < GOLDEN_TOL
    assert _max_diff(full, golden["anomaly_map"]) < GOLDEN_TOL


def test_map_scorer_moves_to_cuda_and_matches_golden(
    cuda_reference, reference_model, golden, fp32_only
):
    """MapScorer (what onnxruntime and TensorRT backends score with) built from host
    tensors, as loaded from text_features.npy / map_weights.npy, fed CUDA maps."""
    scorer = MapScorer(
        reference_model.text_features.cpu(),
        reference_model.map_weights().detach().cpu(),
        reference_model.config.temperature,
    )
    with torch.no_grad():
        maps = cuda_reference.encode_maps(golden["pixel_values"].to(DEVICE))
    score, patch = scorer(maps)
    assert scorer.text_features.device == scorer.map_weights.device == maps.device
    assert score.device == patch.device == maps.device
    assert patch.shape == golden["patch_map"].shape
    assert _max_diff(score, golden["image_score"]) < GOLDEN_TOL
    assert _max_diff(patch, golden["patch_map"]) < GOLDEN_TOL


# ---------------------------------------------------------------- 2. fp16 autocast


def test_torch_backend_fp16_autocast_is_close_to_fp32():
    model = create_model("tiny", image_size=112, seed=0)
    fp32 = TorchBackend(copy.deepcopy(model), device=DEVICE)
    fp16 = TorchBackend(copy.deepcopy(model), device=DEVICE, precision="fp16")
    assert fp16.info.precision == "fp16" and fp16.input_device.type == DEVICE
    pixels = _pixels(4, 112, seed=1)
    score32, patch32 = fp32.run(pixels)  # host pixels: run() moves them
    score16, patch16 = fp16.run(pixels.to(DEVICE))
    for tensor in (score32, patch32, score16, patch16):
        assert tensor.device.type == DEVICE and tensor.dtype == torch.float32
        assert torch.isfinite(tensor).all()
    assert score16.shape == (4,) and patch16.shape == (4, 1, 8, 8)
    assert _max_diff(score16, score32) < FP16_TOL
    assert _max_diff(patch16, patch32) < FP16_TOL
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.float16):
        maps = fp16.model.encode_maps(pixels.to(DEVICE))
    assert maps.dtype == torch.float16  # the network really ran in half precision


def test_fp16_autocast_reference_model_is_close_to_golden(cuda_reference, golden):
    """The authors' weights at 518 px in fp16 autocast, scored by the default (Triton) path
    on the half-precision maps."""
    with torch.no_grad():
        with torch.autocast(DEVICE, dtype=torch.float16):
            maps = cuda_reference.encode_maps(golden["pixel_values"].to(DEVICE))
        output = cuda_reference.score(maps)
    assert maps.dtype == torch.float16
    assert torch.isfinite(output.image_score).all() and torch.isfinite(output.patch_map).all()
    assert _max_diff(output.image_score, golden["image_score"]) < FP16_TOL
    assert _max_diff(output.patch_map, golden["patch_map"]) < FP16_TOL


# ---------------------------------------------------------------- 3. Detector on CUDA

DET_SIZE = 56
DET_SHAPES = [(30, 44), (64, 20), (56, 56)]


@pytest.fixture(scope="module")
def detectors():
    """(CPU, CUDA) Detectors over the same weights, torch backend."""
    model = create_model("tiny", image_size=DET_SIZE, seed=0)
    cpu = Detector(TorchBackend(copy.deepcopy(model), device="cpu"))
    gpu = Detector(TorchBackend(model, device=DEVICE))
    return cpu, gpu


def _frames() -> list[np.ndarray]:
    return [_rgb(h, w, seed) for seed, (h, w) in enumerate(DET_SHAPES)]


def test_device_preprocessing_runs_on_cuda_and_matches_cpu(detectors):
    _, gpu = detectors
    assert gpu.device.type == DEVICE
    frames = _frames()
    on_gpu, sizes = preprocess_on_device(frames, DET_SIZE, gpu.device)
    on_cpu, cpu_sizes = preprocess_on_device(frames, DET_SIZE, torch.device("cpu"))
    host, host_sizes = preprocess_on_host(frames, DET_SIZE)
    assert on_gpu.device.type == DEVICE and on_gpu.dtype == torch.float32
    assert sizes == cpu_sizes == host_sizes == DET_SHAPES
    # Same torch bicubic on both devices: at most one grey level apart after rounding.
    assert _max_diff(on_gpu, on_cpu) <= ONE_LEVEL * 1.01
    # Against PIL: the tolerance test_detector.py uses for the device-side path on CPU.
    assert (on_gpu.cpu() - host).abs().mean() < 3 / 255 / 0.27


def test_cuda_detector_matches_cpu_detector_on_the_same_pixels(detectors, fp32_only):
    """Same normalized pixels through both Detectors: the network, the Triton score and
    anomaly-map kernels and the per-size grouping on CUDA give the CPU's detections."""
    cpu, gpu = detectors
    pixels, sizes = preprocess_on_device(_frames(), DET_SIZE, torch.device("cpu"))
    expected = cpu._infer(pixels, sizes)
    got = gpu._infer(pixels.to(DEVICE), sizes)
    assert len(got) == len(expected) == 3
    for a, b in zip(got, expected, strict=True):
        assert a.anomaly_map.shape == b.anomaly_map.shape and a.anomaly_map.dtype == np.float32
        assert abs(a.image_score - b.image_score) < GOLDEN_TOL
        assert np.abs(a.anomaly_map - b.anomaly_map).max() < GOLDEN_TOL
        assert a.is_anomalous == (a.image_score >= gpu.thresholds.image)
        clear = np.abs(b.anomaly_map - cpu.thresholds.pixel) > GOLDEN_TOL
        assert np.array_equal(a.defect_mask[clear], b.defect_mask[clear])


def test_cuda_detector_host_arrays_and_cuda_tensors_agree(detectors, fp32_only):
    """predict() with host uint8 arrays and with CUDA uint8 tensors (RGB and grey) gives
    the same detections; against the CPU Detector (PIL resize) within 5e-3, measured on CPU
    as about 3e-4 for torch-vs-PIL preprocessing of these frames."""
    cpu, gpu = detectors
    frames = _frames()
    tensors = [torch.from_numpy(f).to(DEVICE) for f in frames]
    tensors[2] = torch.from_numpy(frames[2][..., 0].copy()).to(DEVICE)  # (H, W) grey
    arrays = [*frames[:2], frames[2][..., 0].copy()]
    from_arrays = gpu.predict(arrays)
    from_tensors = gpu.predict(tensors)
    on_cpu = cpu.predict(arrays)
    assert [d.anomaly_map.shape for d in from_tensors] == DET_SHAPES
    for a, b, c in zip(from_arrays, from_tensors, on_cpu, strict=True):
        assert abs(a.image_score - b.image_score) < 1e-6
        assert np.abs(a.anomaly_map - b.anomaly_map).max() < 1e-6
        assert 0.0 < a.image_score < 1.0
        assert abs(a.image_score - c.image_score) < 5e-3
        assert np.abs(a.anomaly_map - c.anomaly_map).max() < 5e-3


def test_cuda_detector_stream_matches_predict(detectors):
    """stream(): the worker thread preprocesses on the GPU while batches run."""
    _, gpu = detectors
    frames = _frames() * 3
    streamed = list(gpu.stream(iter(frames), batch_size=2))
    direct = gpu.predict(frames)
    assert len(streamed) == len(direct) == 9
    for a, b in zip(streamed, direct, strict=True):
        assert a.anomaly_map.shape == b.anomaly_map.shape
        assert abs(a.image_score - b.image_score) < 1e-6
        assert np.abs(a.anomaly_map - b.anomaly_map).max() < 1e-6


# ---------------------------------------------------------------- 4. bench harness on CUDA

BENCH_BACKENDS = (BASELINE, "torch-fp16-sdpa", "torch-compile")


def test_bench_torch_backends_on_cuda(tmp_path):
    config = BenchConfig(
        image_size=28,
        batches=(1, 2),
        warmup=1,
        iters=4,
        repeats=2,
        input_sets=2,
        frame_size=(24, 32),
        backends=BENCH_BACKENDS,
        command="pytest gpu bench",
    )
    results = run_bench(config)
    status = {b.name: (b.status, b.reason, b.batch_failures) for b in results.backends}
    assert status == {name: ("ok", None, {}) for name in BENCH_BACKENDS}
    backends = {b.name: b for b in results.backends}
    assert {name: b.precision for name, b in backends.items()} == {
        BASELINE: "fp32",
        "torch-fp16-sdpa": "fp16",
        "torch-compile": "fp16",
    }
    assert backends[BASELINE].kernel_impl == "torch"
    assert backends["torch-compile"].kernel_impl == "auto"
    assert all(torch.device(b.device).type == DEVICE for b in results.backends)

    total = results.device.gpu.total_memory_bytes
    for name in BENCH_BACKENDS:
        for batch in (1, 2):
            row = results.measurement(name, batch)
            base = results.measurement(BASELINE, batch)
            assert row is not None and base is not None, (name, batch)
            assert row.pipeline.iterations == 4 and len(row.pipeline.samples_ms) == 4
            assert row.pipeline.p50_ms > 0 and row.pipeline.throughput > 0
            assert set(row.stages) == set(STAGES)
            assert all(row.stages[s] is not None for s in STAGES)  # torch scores apart
            assert row.stages["network"].p50_ms > 0 and row.model_p50_ms > 0
            assert all(row.stages[s].min_ms >= 0 for s in STAGES)
            assert row.gpu_peak_allocated_bytes is not None
            assert 0 < row.gpu_peak_allocated_bytes <= total
            assert row.gpu_used_bytes is not None and row.gpu_used_bytes > 0
            assert row.achieved_tflops > 0
            assert row.speedup == pytest.approx(row.pipeline.throughput / base.pipeline.throughput)
            assert row.model_speedup == pytest.approx(row.model_throughput / base.model_throughput)
            if name == BASELINE:
                assert row.speedup == pytest.approx(1.0)
    assert {(c.device, c.dtype) for c in results.ceilings} == {
        (DEVICE, "float32"),
        (DEVICE, "float16"),
    }
    assert all(c.tflops > 0 for c in results.ceilings)
    assert any(note.startswith("preprocess gpu") for note in results.notes)

    files = write_results(results, tmp_path)
    data = json.loads(files.json.read_text(), parse_constant=lambda c: pytest.fail(c))
    assert len(data["measurements"]) == 6
    text = files.markdown.read_text()
    assert f"GPU: {results.device.gpu.name}" in text and "torch-compile" in text
    assert files.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- 5. export and onnxruntime

ORT_SIZE = 112
ORT_CUDA = "CUDAExecutionProvider" in _ort_providers()
needs_ort_provider = pytest.mark.skipif(
    f"{ORT_PROVIDER.upper()}ExecutionProvider" not in _ort_providers(),
    reason=f"onnxruntime has no {ORT_PROVIDER.upper()}ExecutionProvider (install onnxruntime-gpu)",
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """fp32 and fp16 vision graphs of the tiny model, exported on the GPU machine (the
    parity reference runs on CUDA). The export's own fp32 gate is widened to the 1e-3 the
    runtime tests below use; test_export_parity_... checks the default 1e-4 separately."""
    if not _ort_providers():
        pytest.skip("onnxruntime is not installed")
    model = create_model("tiny", image_size=ORT_SIZE, seed=3)
    root = tmp_path_factory.mktemp("gpu-export")
    save_model(model, root / "model")
    frames = [_rgb(64, 64, seed) for seed in range(2)]
    result = export_artifacts(
        root / "model",
        root / "artifacts",
        precision="fp16",
        targets="onnx",
        batch="1:2:4",
        parity_frames=frames,
        tolerances={Precision.FP32: Tolerance(score=1e-3, map=1e-3)},
    )
    return model, result


def test_export_parity_reference_runs_on_cuda(exported):
    """Export on a GPU machine: the float32 reference runs on CUDA (strict fp32), every
    graph is compared through onnxruntime's best provider, within the default tolerances."""
    _, result = exported
    report = result.parity
    assert report is not None and report.reference == f"torch fp32 on {DEVICE}"
    assert {row.target for row in report.rows} == {"vision.onnx", "vision.fp16.onnx"}
    provider = "cuda" if ORT_CUDA else "cpu"
    for row in report.rows:
        assert row.details["provider"] == provider
        limit = DEFAULT_TOLERANCES[Precision(row.precision)]
        assert row.score_max_abs <= limit.score, (row.target, row.score_max_abs, limit)
        assert row.map_max_abs <= limit.map, (row.target, row.map_max_abs, limit)


@needs_ort_provider
@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_cuda_fp32_matches_torch(exported, batch):
    model, result = exported
    backend = open_backend(
        result.artifacts, backend="onnxruntime", provider=ORT_PROVIDER, precision="fp32"
    )
    assert backend.info.details["provider"] == ORT_PROVIDER
    assert backend.info.details["graph"] == "vision.onnx" and backend.info.precision == "fp32"
    if ORT_PROVIDER == "cuda":
        assert backend.info.details["providers"].startswith("CUDAExecutionProvider")
        assert backend.input_device.type == DEVICE
    pixels = _pixels(batch, ORT_SIZE, seed=batch)
    score, patch = backend.run(pixels.to(backend.input_device))
    with torch.no_grad():
        expected = model(pixels)
    assert score.device.type == patch.device.type == backend.input_device.type
    assert score.shape == (batch,) and patch.shape == (batch, 1, 8, 8)
    assert _max_diff(score, expected.image_score) < 1e-3
    assert _max_diff(patch, expected.patch_map) < 1e-3


@needs_ort_provider
def test_onnxruntime_cuda_runs_the_fp16_graph_by_default(exported):
    model, result = exported
    backend = open_backend(result.artifacts, backend="onnxruntime", provider=ORT_PROVIDER)
    if ORT_PROVIDER == "cuda":
        assert backend.info.precision == "fp16"
        assert backend.info.details["graph"] == "vision.fp16.onnx"
    pixels = _pixels(2, ORT_SIZE, seed=11)
    score, patch = backend.run(pixels)
    with torch.no_grad():
        expected = model(pixels)
    assert torch.isfinite(score).all() and torch.isfinite(patch).all()
    limit = DEFAULT_TOLERANCES[Precision.FP16]
    assert _max_diff(score, expected.image_score) <= limit.score
    assert _max_diff(patch, expected.patch_map) <= limit.map


# ---------------------------------------------------------------- 6. training on CUDA

TRAIN_SIZE = 112


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-train") / "data"
    make_synthetic(root, categories=2, images=4, size=TRAIN_SIZE, seed=1)
    return root


def test_cuda_training_step_matches_cpu(fp32_only):
    """Forward, the four losses and the gradients of every learned parameter on CUDA
    (float32) against the same step on the CPU."""
    cpu_model = create_model("tiny", image_size=TRAIN_SIZE, seed=0).train()
    gpu_model = copy.deepcopy(cpu_model).to(DEVICE).train()
    pixels = _pixels(2, TRAIN_SIZE, seed=2)
    masks = torch.zeros(2, TRAIN_SIZE, TRAIN_SIZE)
    masks[1, 30:60, 40:70] = 1
    labels = torch.tensor([0.0, 1.0])
    expected = training_step(cpu_model, pixels, masks, labels)
    got = training_step(gpu_model, pixels.to(DEVICE), masks.to(DEVICE), labels.to(DEVICE))
    for name in ("focal_image", "focal_pixel", "dice", "scr", "total"):
        value = getattr(got, name)
        assert value.device.type == DEVICE and torch.isfinite(value), name
        assert abs(value.item() - getattr(expected, name).item()) < GOLDEN_TOL, name
    expected.total.backward()
    got.total.backward()
    gpu_params = dict(gpu_model.named_parameters())
    learned = [(n, p) for n, p in cpu_model.named_parameters() if p.grad is not None]
    assert learned and not any(n.startswith("clip.") for n, _ in learned)
    for name, param in learned:
        grad = gpu_params[name].grad
        assert grad is not None and grad.device.type == DEVICE, name
        scale = param.grad.abs().max().item()
        assert _max_diff(grad, param.grad) <= 1e-3 * scale + 1e-7, name


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_train_on_cuda_with_amp(train_data, tmp_path, precision):
    """Two AMP steps (fp16 with a GradScaler, or bf16), a checkpoint folder, then a resume
    on CUDA that restores optimizer, scaler and RNG state."""
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    config = TrainConfig(
        data=train_data,
        out=tmp_path / "run",
        backbone="tiny",
        image_size=TRAIN_SIZE,
        epochs=1,
        batch_size=2,
        max_steps=2,
        device=DEVICE,
        precision=precision,
        progress=False,
    )
    result = train(config)
    assert result.global_step == 2
    (log,) = result.history
    assert log.steps == 2 and log.images == 4
    assert all(math.isfinite(value) for value in log.losses.values()), log.losses

    initial = create_model("tiny", image_size=TRAIN_SIZE, seed=config.seed).state_dict()
    trained = load(result.last).state_dict()
    for key, value in initial.items():
        if key.startswith("clip."):
            assert torch.equal(value, trained[key]), key
    changed = {
        key
        for key, value in initial.items()
        if not key.startswith("clip.")
        and key != "text_features_frozen"
        and not torch.equal(value, trained[key])
    }
    assert "scale_weights" in changed
    assert any(key.startswith("fb_attention.") for key in changed)
    assert any(key.startswith("prompt_learner.") for key in changed)

    folder = result.checkpoints[0]
    state = read_train_state(folder)
    assert "cuda" in state["rng"]
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    if precision == "fp16":
        assert state["scaler"] and state["scaler"]["scale"] > 0
    else:
        assert state["scaler"] == {}
    run = _build_run(resume_config(folder, epochs=2), torch.device(DEVICE), dtype)
    assert run.epoch == 1 and run.global_step == 2
    assert all(p.device.type == DEVICE for p in run.model.parameters())
    restored = run.optimizer.state_dict()["state"]
    for index, values in state["optimizer"]["state"].items():
        for key, value in values.items():
            assert torch.equal(restored[index][key].cpu(), value.cpu()), (index, key)
    if precision == "fp16":
        assert run.scaler.get_scale() == state["scaler"]["scale"]
