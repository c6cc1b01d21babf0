"""The benchmark's backends: what each name runs, whether it can run here, and why not.

Each backend is reduced to two timed callables (network, then scoring when the backend
exposes it separately) so the harness times every backend the same way.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fbclip_edge.artifacts.options import tensorrt_installed
from fbclip_edge.errors import FBClipError
from fbclip_edge.runtime import Backend, TorchBackend

BASELINE = "torch-eager-fp32"
TORCH_BACKENDS = (BASELINE, "torch-fp16-sdpa", "torch-compile")
# CPU runtimes in the CPU precisions. No onnxruntime-cpu-bf16: onnxruntime's CPU provider
# has no bf16 MatMul/Gemm kernels (1.32), OpenVINO runs bf16.
CPU_EXPORTED_BACKENDS = (
    "onnxruntime-cpu",
    "onnxruntime-cpu-int8",
    "openvino-cpu-fp32",
    "openvino-cpu-bf16",
    "openvino-cpu-int8",
)
EXPORTED_BACKENDS = CPU_EXPORTED_BACKENDS + ("onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt")
ALL_BACKENDS = TORCH_BACKENDS + EXPORTED_BACKENDS

# (runtime.open backend, provider, precision) per exported backend name; None: the default.
_OPEN_ARGS: dict[str, tuple[str, str | None, str | None]] = {
    "onnxruntime-cpu": ("onnxruntime", "cpu", "fp32"),
    "onnxruntime-cpu-int8": ("onnxruntime", "cpu", "int8"),
    "openvino-cpu-fp32": ("openvino", None, "fp32"),
    "openvino-cpu-bf16": ("openvino", None, "bf16"),
    "openvino-cpu-int8": ("openvino", None, "int8"),
    "onnxruntime-cuda": ("onnxruntime", "cuda", None),
    "onnxruntime-tensorrt": ("onnxruntime", "tensorrt", None),
    "tensorrt": ("tensorrt", None, None),
}
_ORT_PROVIDERS = {
    "onnxruntime-cpu": "CPUExecutionProvider",
    "onnxruntime-cpu-int8": "CPUExecutionProvider",
    "onnxruntime-cuda": "CUDAExecutionProvider",
    "onnxruntime-tensorrt": "TensorrtExecutionProvider",
}
GPU_ORT_CPU_REASON = (
    "not in the default list on a CUDA machine: the CPU runtimes are not the deployment path "
    "next to a GPU (and are slow on large models); pass --backends {name} to include it"
)
CPU_COMPILE_REASON = (
    "not in the default list on CPU: inductor takes from 40 s to over 2 min per batch size "
    "to compile the model on a 2-core CPU; pass --backends torch-compile to include it"
)

Outputs = tuple[torch.Tensor, torch.Tensor]


@dataclass
class BenchBackend:
    """A ready backend reduced to what the harness times.

    network: float32 (B, 3, S, S) pixels (host or device) -> intermediate (maps, or the
    final outputs when scoring is None because the backend scores inside its graph).
    scoring: intermediate -> (image_score (B,), patch_map (B, 1, g, g)).
    kernel_impl: impl the anomaly map (and torch scoring) use: 'torch' for the baseline,
    which runs the way the authors' code does, 'auto' (Triton on CUDA) for the rest.
    """

    name: str
    device: torch.device
    precision: str
    network: Callable[[torch.Tensor], Any]
    scoring: Callable[[Any], Outputs] | None
    kernel_impl: str
    setup_seconds: float
    details: dict[str, Any] = field(default_factory=dict)


def device_for(name: str) -> torch.device:
    """Where backend `name` runs: CUDA for the torch backends when there is a GPU, else the
    CPU (exported backends pick their device when they open)."""
    return torch.device("cuda" if torch.cuda.is_available() and name in TORCH_BACKENDS else "cpu")


def onnxruntime_providers() -> list[str] | None:
    """onnxruntime's available execution providers; None when it does not import."""
    try:
        import onnxruntime
    except Exception:  # a broken install counts as absent, with the reason given elsewhere
        return None
    return list(onnxruntime.get_available_providers())


def _torch_reason(name: str, cuda: bool) -> str | None:
    if name == "torch-fp16-sdpa" and not cuda:
        return "needs CUDA (float16 matmuls on CPU are not a deployment path)"
    if name == "torch-compile":
        if cuda and importlib.util.find_spec("triton") is None:
            return "torch.compile on CUDA needs triton (pip install triton)"
        if not cuda and shutil.which("cc") is None and shutil.which("g++") is None:
            return "torch.compile on CPU needs a C/C++ compiler (cc or g++ on PATH)"
    return None


def _cpu_reason(name: str) -> str | None:
    """Why a CPU-precision backend cannot run here: OpenVINO missing, or the CPU lacks the
    instructions of its precision (it would be refused at load time)."""
    from fbclip_edge.runtime.cpu_features import detect
    from fbclip_edge.runtime.openvino import openvino_available

    if name.startswith("openvino-") and not openvino_available():
        return "openvino is not installed (pip install fbclip-edge[openvino])"
    precision = _OPEN_ARGS[name][2]
    missing = detect().lacks(precision) if precision else ()
    if missing:
        return f"this CPU has none of {', '.join(missing)}, which {precision} needs"
    return None


def _exported_reason(name: str, cuda: bool) -> str | None:
    if name in CPU_EXPORTED_BACKENDS:
        reason = _cpu_reason(name)
        if reason:
            return reason
    if name in _ORT_PROVIDERS:
        providers = onnxruntime_providers()
        if providers is None:
            return "onnxruntime is not installed (pip install fbclip-edge[cpu] or [gpu])"
        if _ORT_PROVIDERS[name] not in providers:
            return (
                f"onnxruntime has no {_ORT_PROVIDERS[name]} (available: {', '.join(providers)}); "
                "install onnxruntime-gpu (and TensorRT) on a CUDA machine"
            )
    if name == "tensorrt":
        if not cuda:
            return "needs a CUDA GPU"
        if not tensorrt_installed():
            return "the tensorrt Python package is not installed (pip install fbclip-edge[trt])"
    return exported_unavailable()


def skip_reason(name: str) -> str | None:
    """Why backend `name` cannot run on this machine, or None when it can (cheap checks only)."""
    if name not in ALL_BACKENDS:
        return f"unknown backend; choose from {', '.join(ALL_BACKENDS)}"
    cuda = torch.cuda.is_available()
    if name in TORCH_BACKENDS:
        return _torch_reason(name, cuda)
    return _exported_reason(name, cuda)


def default_backends() -> tuple[list[str], dict[str, str]]:
    """Backends a no-argument run measures, and skip reasons for every other one."""
    chosen: list[str] = []
    skipped: dict[str, str] = {}
    for name in ALL_BACKENDS:
        reason = skip_reason(name)
        if reason is None and name == "torch-compile" and not torch.cuda.is_available():
            reason = CPU_COMPILE_REASON
        if reason is None and name in CPU_EXPORTED_BACKENDS and torch.cuda.is_available():
            reason = GPU_ORT_CPU_REASON.format(name=name)
        if reason is None:
            chosen.append(name)
        else:
            skipped[name] = reason
    return chosen, skipped


def _torch_scoring(backend: TorchBackend, impl: str) -> Callable[[torch.Tensor], Outputs]:
    """model.score with an explicit kernel impl, so the baseline can stay on plain torch."""
    model = backend.model

    def scoring(maps: torch.Tensor) -> Outputs:
        output = model.score(maps, impl=impl)
        return output.image_score.float(), output.patch_map.float()

    return scoring


def _encoder(backend: TorchBackend) -> Callable[[torch.Tensor], torch.Tensor]:
    """encode_maps with the host-to-device copy and autocast TorchBackend.run applies."""
    model, device, dtype = backend.model, backend.device, backend.dtype

    def network(pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return model.encode_maps(pixels)

    return network


def build_torch_backend(name: str, model: Any, device: torch.device) -> BenchBackend:
    """torch-eager-fp32, torch-fp16-sdpa or torch-compile over the same model object."""
    start = time.perf_counter()
    precision = "fp16" if name == "torch-fp16-sdpa" or (
        name == "torch-compile" and device.type == "cuda") else "fp32"
    backend = TorchBackend(model, device=device, precision=precision)
    network = _encoder(backend)
    details: dict[str, Any] = {"runtime": "torch", "torch": torch.__version__}
    impl = "torch" if name == BASELINE else "auto"
    if name == BASELINE:
        details["note"] = "eager float32, torch scoring and map: how the authors' code runs"
    elif name == "torch-fp16-sdpa":
        details["note"] = ("autocast float16; attention through F.scaled_dot_product_attention "
                           "(flash / memory-efficient kernels)")
    else:
        network = torch.compile(network, dynamic=False)
        details["note"] = (f"torch.compile (inductor, default mode) of encode_maps, {precision}; "
                           "one compile per batch size, paid during warm-up")
    return BenchBackend(
        name=name,
        device=device,
        precision=precision,
        network=network,
        scoring=_torch_scoring(backend, impl),
        kernel_impl=impl,
        setup_seconds=time.perf_counter() - start,
        details=details,
    )


def _open_runtime() -> Callable[..., Backend] | None:
    """fbclip_edge.runtime.open.open when the export runtime is importable here."""
    with contextlib.suppress(ImportError, AttributeError):
        module = importlib.import_module("fbclip_edge.runtime.open")
        return module.open if callable(module.open) else None
    return None


def _export_function() -> Callable[..., Any] | None:
    """fbclip_edge.export.export_artifacts when the exporter is importable here."""
    with contextlib.suppress(ImportError, AttributeError):
        module = importlib.import_module("fbclip_edge.export")
        return module.export_artifacts if callable(module.export_artifacts) else None
    return None


def exported_unavailable() -> str | None:
    """Why exported backends cannot be built from this install at all, or None."""
    if _open_runtime() is None:
        return "fbclip_edge.runtime.open does not import in this install"
    if _export_function() is None:
        return "fbclip_edge.export does not import in this install"
    return None


@dataclass(frozen=True)
class ExportPlan:
    """What the bench exports so that every requested exported backend can open it."""

    precision: str
    targets: str
    batch_profile: str


def export_plan(names: list[str], batches: tuple[int, ...]) -> ExportPlan:
    """float16 graphs (and a TensorRT engine when `tensorrt` runs) on CUDA; on the CPU int8
    when an int8 backend runs (its folder also holds the float32 graphs the fp32 and bf16
    backends open), else bf16 when openvino-cpu-bf16 runs, else float32 ONNX. A batch
    profile spanning the measured batch sizes, tuned for the middle one. CPU-precision
    backends asked for next to GPU ones find no int8 graph and fail with the re-export hint."""
    ordered = sorted(batches)
    profile = f"{ordered[0]}:{ordered[len(ordered) // 2]}:{ordered[-1]}"
    gpu = any(name not in CPU_EXPORTED_BACKENDS for name in names) and torch.cuda.is_available()
    targets = "onnx,trt" if "tensorrt" in names else "onnx"
    if gpu:
        precision = "fp16"
    elif any(name.endswith("-int8") for name in names):
        precision = "int8"
    elif "openvino-cpu-bf16" in names:
        precision = "bf16"
    else:
        precision = "fp32"
    return ExportPlan(precision, targets, profile)


def export_for_bench(model: Any, model_dir: Path | None, scratch: Path, plan: ExportPlan) -> Path:
    """Export `model` (saved to scratch first unless it came from `model_dir`) into
    scratch/artifacts with fbclip_edge.export, parity check included; returns the folder."""
    export = _export_function()
    if export is None:
        raise FBClipError("exporting needs fbclip_edge.export; pass --artifacts DIR instead")
    if model_dir is None:
        from fbclip_edge.checkpoint import save_model

        model_dir = save_model(model, scratch / "model")
    out = scratch / "artifacts"
    export(model_dir, out, image_size=model.config.image_size, batch=plan.batch_profile,
           precision=plan.precision, targets=plan.targets, scoring="kernel")
    return out


def _split_scorer(runtime_backend: Backend) -> tuple[Callable[[torch.Tensor], Any],
                                                     Callable[[Any], Outputs] | None]:
    """(network, scoring) of an opened runtime backend.

    Vision-graph exports (scoring='kernel') score with a `scorer` after the graph: swapping
    it for a pass-through makes run() stop at the maps, so the kernel is timed on its own.
    Full-graph exports score inside the graph: scoring is None.
    """
    scorer = getattr(runtime_backend, "scorer", None)
    if scorer is None:
        return runtime_backend.run, None
    runtime_backend.scorer = lambda maps: maps  # type: ignore[attr-defined]
    return runtime_backend.run, scorer


def build_exported_backend(name: str, artifacts: Path) -> BenchBackend:
    """An onnxruntime or TensorRT backend opened from an artifacts folder with runtime.open."""
    opener = _open_runtime()
    if opener is None:
        raise FBClipError("fbclip_edge.runtime.open is not available in this install")
    backend_name, provider, precision = _OPEN_ARGS[name]
    start = time.perf_counter()
    runtime_backend = opener(
        artifacts, backend=backend_name, provider=provider, precision=precision
    )
    setup = time.perf_counter() - start
    info = runtime_backend.info
    device = torch.device(getattr(runtime_backend, "input_device", None) or info.device)
    network, scoring = _split_scorer(runtime_backend)
    details = {"runtime": info.name, **{k: str(v) for k, v in info.details.items()}}
    return BenchBackend(
        name=name,
        device=device,
        precision=info.precision,
        network=network,
        scoring=scoring,
        kernel_impl="auto",
        setup_seconds=setup,
        details=details,
    )
