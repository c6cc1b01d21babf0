"""`open(artifacts)`: the one entry point from an export folder to a ready Backend.

backend='auto' takes the fastest thing that can run here (TensorRT engine, onnxruntime
CUDA, then on the CPU onnxruntime or OpenVINO in the export's CPU precision, torch) and
records in `info.details['selected']` why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fbclip_edge.artifacts.manifest import (
    Manifest,
    model_folder,
    read_manifest,
)
from fbclip_edge.artifacts.options import Precision, tensorrt_installed
from fbclip_edge.errors import FBClipError
from fbclip_edge.runtime import cpu_features
from fbclip_edge.runtime.base import Backend, FrameBackend, TorchBackend

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt", "openvino")
PRECISIONS = tuple(p.value for p in Precision)
# CPU runtimes per precision, in the order 'auto' takes them when the manifest has no timing
# from this CPU (an export on the same CPU model and core count times every CPU run of its
# precision, and the fastest of those wins). fp32: onnxruntime first (OpenVINO's fp32
# measured 0.80x onnxruntime's on a Xeon, ViT-B-16 @ 224, full graph); bf16: OpenVINO alone
# (onnxruntime's CPU provider has no bf16 MatMul); int8: onnxruntime first, the runtime the
# graph is quantized for (the two were within this VM's noise of each other on ViT-B-16 @
# 224, 2-core Xeon with avx512_vnni: 299 and 297 ms per image, best of 5 interleaved);
# fp16 graphs only run on onnxruntime.
CPU_RULE: dict[Precision, tuple[str, ...]] = {
    Precision.FP32: ("onnxruntime", "openvino"),
    Precision.FP16: ("onnxruntime",),
    Precision.BF16: ("openvino",),
    Precision.INT8: ("onnxruntime", "openvino"),
}


def _open_torch(
    artifacts: Path, manifest: Manifest, device: str | None, precision: str, verify: bool
) -> Backend:
    """Reload the model folder named in the manifest, refusing it if it changed since export."""
    folder = model_folder(artifacts, manifest, verify)
    from fbclip_edge.checkpoint import load

    if precision not in ("fp32", "fp16"):
        raise FBClipError(
            f"backend='torch' runs fp32 or fp16, not {precision}; use backend='openvino' or "
            "'onnxruntime' for the CPU precisions"
        )
    model = load(folder, image_size=manifest.image_size)
    backend = TorchBackend(model, device, precision)
    backend.batch_range = (manifest.batch.min, manifest.batch.max)
    backend.info.details.update(model=str(folder), scoring="model")
    return backend


def _tensorrt_blocker(manifest: Manifest) -> str | None:
    """Why the TensorRT engine cannot be used here, or None."""
    spec = manifest.engine()
    if spec is None:
        return "the artifacts have no TensorRT engine"
    if not tensorrt_installed():
        return "tensorrt is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    import tensorrt

    from fbclip_edge.runtime.tensorrt import engine_mismatch
    from fbclip_edge.runtime.tensorrt_env import compute_capability

    problem = engine_mismatch(spec, str(tensorrt.__version__), compute_capability())
    return f"the engine does not fit: {problem}" if problem else None


@dataclass(frozen=True)
class CpuChoice:
    """The CPU runtime and precision 'auto' opens, and why."""

    backend: str
    precision: Precision
    why: str


def _timed_here(
    manifest: Manifest,
    features: cpu_features.CpuFeatures,
    wanted: Precision,
    runnable: list[str],
) -> tuple[bool, dict[str, float]]:
    """(the export was timed on this CPU model and core count, runtime -> ms per image)."""
    timing = manifest.cpu_timing
    if timing is None or (timing.cpu, timing.logical_cores) != (
        features.model,
        features.logical_cores,
    ):
        return False, {}
    keys = {name: f"{name} {wanted.value}" for name in runnable}
    return True, {n: timing.ms_per_image[k] for n, k in keys.items() if k in timing.ms_per_image}


def choose_cpu(
    manifest: Manifest,
    features: cpu_features.CpuFeatures,
    installed: Sequence[str],
    precision: str | None = None,
) -> CpuChoice | None:
    """The export's CPU precision (or the asked one) on the fastest runtime installed: the
    fastest measured at export when that ran on this CPU model and core count, else
    CPU_RULE's order. None: no exported runtime installed for fp32 (torch runs it). A CPU
    without the precision's instructions is refused with the reason."""
    wanted = cpu_features.cpu_precision(manifest, precision)
    refusal = features.refusal(
        wanted,
        "re-export with --precision fp32, or pass precision='fp32' to run the float32 graph",
    )
    if refusal is not None:
        raise FBClipError(refusal)
    runnable = [name for name in CPU_RULE[wanted] if name in installed]
    if not runnable:
        if wanted in (Precision.FP32, Precision.FP16):
            return None
        raise FBClipError(
            f"{wanted.value} artifacts run on {' or '.join(CPU_RULE[wanted])}, and none is "
            "installed; install fbclip-edge[openvino], or pass precision='fp32'"
        )
    here, measured = _timed_here(manifest, features, wanted, runnable)
    has = [flag for flag in cpu_features.required_isa(wanted) if flag in features.flags]
    what = f"{wanted.value}" + (f" (this CPU has {', '.join(has)})" if has else "")
    if len(runnable) == 1:
        best, reason = runnable[0], "the one runtime installed here that runs it"
    elif len(measured) > 1:
        best = min(measured, key=lambda name: measured[name])
        times = ", ".join(f"{name} {ms:.2f}" for name, ms in sorted(measured.items()))
        reason = f"fastest at export on this CPU, ms per image: {times}"
    else:
        best = runnable[0]
        source = "no export timing from this CPU" if not here else "not all timed at export"
        reason = f"first by rule ({source}; installed: {', '.join(runnable)})"
    return CpuChoice(best, wanted, f"{what} on {best}: {reason}")


def _cpu_runtimes() -> list[str]:
    """Exported CPU runtimes installed here."""
    from fbclip_edge.runtime.onnxruntime import available_providers
    from fbclip_edge.runtime.openvino import openvino_available

    found = ["onnxruntime"] if "cpu" in available_providers() else []
    return found + (["openvino"] if openvino_available() else [])


def _auto(manifest: Manifest, precision: str | None) -> tuple[str, str | None, str | None, str]:
    """(backend, provider, precision, why) for backend='auto'."""
    skipped = []
    blocker = _tensorrt_blocker(manifest)
    if blocker is None:
        why = "a TensorRT engine built for this GPU and TensorRT version"
        return "tensorrt", None, precision, why
    skipped.append(f"not tensorrt: {blocker}")
    from fbclip_edge.runtime.onnxruntime import available_providers

    providers = available_providers()
    if "cuda" in providers and torch.cuda.is_available():
        return "onnxruntime", "cuda", precision, "; ".join([*skipped, "onnxruntime has CUDA"])
    skipped.append("not onnxruntime cuda: no CUDA provider or no CUDA GPU")
    choice = choose_cpu(manifest, cpu_features.detect(), _cpu_runtimes(), precision)
    if choice is not None:
        provider = "cpu" if choice.backend == "onnxruntime" else None
        return choice.backend, provider, choice.precision.value, "; ".join([*skipped, choice.why])
    skipped.append("not onnxruntime or openvino: not installed")
    return "torch", None, precision, "; ".join(skipped)


def _check_options(
    backend: str,
    provider: str | None,
    cuda_graph: bool | int,
    precision: str | None,
    device: str | None,
    threads: int | None,
) -> None:
    """Options that only one backend understands are errors elsewhere, not ignored."""
    if provider is not None and backend != "onnxruntime":
        raise FBClipError(f"provider applies to backend='onnxruntime' only, not {backend!r}")
    if cuda_graph and backend != "tensorrt":
        raise FBClipError("cuda_graph applies to backend='tensorrt' only")
    if precision is not None and precision not in PRECISIONS:
        raise FBClipError(f"precision must be {' or '.join(PRECISIONS)}, not {precision!r}")
    if backend == "openvino" and device not in (None, "cpu"):
        raise FBClipError(f"backend='openvino' runs on the CPU; drop device={device!r}")
    if threads is not None and (backend not in ("onnxruntime", "openvino") or threads < 1):
        raise FBClipError("threads takes a count >= 1, for backend='onnxruntime' or 'openvino'")


def _open_onnxruntime(
    folder: Path,
    manifest: Manifest,
    provider: str | None,
    device: str | None,
    precision: str | None,
    verify: bool,
    threads: int | None,
) -> Backend:
    from fbclip_edge.runtime.onnxruntime import OnnxRuntimeBackend, available_providers

    if provider is None:
        cuda = "cuda" in available_providers() and torch.cuda.is_available()
        provider = "cuda" if cuda else "cpu"
    return OnnxRuntimeBackend(folder, manifest, provider, device, precision, verify, threads)


def _open_tensorrt(
    folder: Path,
    manifest: Manifest,
    device: str | None,
    cuda_graph: bool | int,
    precision: str | None,
    verify: bool,
) -> Backend:
    from fbclip_edge.runtime.tensorrt import TensorRTBackend

    opened = TensorRTBackend(folder, manifest, device, cuda_graph, verify)
    if precision is not None and precision != opened.info.precision:
        raise FBClipError(
            f"the engine is {opened.info.precision}; re-export with --precision {precision}"
        )
    return opened


def open(  # noqa: A001 - the public name the runtime is known by
    artifacts: str | Path,
    backend: str = "auto",
    provider: str | None = None,
    device: str | None = None,
    cuda_graph: bool | int = False,
    precision: str | None = None,
    verify: bool = True,
    threads: int | None = None,
) -> Backend:
    """Open an artifacts folder made by `fbclip-edge export` as a Backend.

    backend: 'auto' | 'torch' | 'onnxruntime' | 'tensorrt' | 'openvino'. provider
    (onnxruntime only): 'cpu' | 'cuda' | 'tensorrt'; default CUDA when available, else CPU.
    cuda_graph (TensorRT only): capture a CUDA graph at the profile's opt batch (True) or
    this batch. precision: onnxruntime runs the 'fp32', 'fp16' or 'int8' graph (default:
    fp16 on GPU providers, int8 on the CPU, when exported); openvino runs 'fp32', 'bf16'
    (the float32 graph compiled to bf16) or 'int8' (default: the export's bf16 or int8,
    else fp32); torch runs fp32 (default) or fp16 autocast; tensorrt must match the engine.
    bf16 and int8 are refused on a CPU without their instructions (cpu_features). threads
    (onnxruntime, openvino): intra-op threads, default the runtime's. verify: check the
    sha256 of every file used (seconds for large graphs).
    """
    folder = Path(artifacts)
    manifest = read_manifest(folder)
    if manifest.method == "filo":
        raise FBClipError(
            f"{folder} holds FiLo artifacts, which take frames and a category; open them with "
            "Detector.open(artifacts, category=...) or fbclip_edge.runtime.open_frames"
        )
    if backend not in BACKENDS:
        raise FBClipError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    why = f"asked for {backend}"
    if backend == "auto":
        if provider is not None:
            backend, why = "onnxruntime", f"provider={provider} given"
        else:
            backend, provider, precision, why = _auto(manifest, precision)
    _check_options(backend, provider, cuda_graph, precision, device, threads)
    opened: Backend
    if backend == "torch":
        opened = _open_torch(folder, manifest, device, precision or "fp32", verify)
    elif backend == "onnxruntime":
        opened = _open_onnxruntime(
            folder, manifest, provider, device, precision, verify, threads
        )
    elif backend == "openvino":
        from fbclip_edge.runtime.openvino import OpenVinoBackend

        opened = OpenVinoBackend(folder, manifest, precision, threads, verify)
    else:
        opened = _open_tensorrt(folder, manifest, device, cuda_graph, precision, verify)
    opened.info.details["selected"] = why
    opened.info.details["artifacts"] = str(folder)
    return opened


def open_frames(
    artifacts: str | Path,
    backend: str = "auto",
    provider: str | None = None,
    device: str | None = None,
    precision: str | None = None,
    verify: bool = True,
    threads: int | None = None,
) -> FrameBackend:
    """Open artifacts of a method that takes frames and categories (FiLo) as a FrameBackend.

    backend: 'auto' (onnxruntime when installed) | 'torch' | 'onnxruntime'; the other
    options as for `open`.
    """
    folder = Path(artifacts)
    manifest = read_manifest(folder)
    if manifest.method != "filo":
        raise FBClipError(
            f"{folder} holds {manifest.method} artifacts, which take preprocessed pixels; "
            "open them with fbclip_edge.runtime.open"
        )
    from fbclip_edge.runtime.filo import open_filo

    return open_filo(folder, manifest, backend, provider, device, precision, verify, threads)
