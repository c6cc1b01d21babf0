"""`open(artifacts)`: the one entry point from an export folder to a ready Backend.

backend='auto' takes the fastest thing that can run here (TensorRT engine, onnxruntime
CUDA, onnxruntime CPU, torch) and records in `info.details['selected']` why.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fbclip_edge.artifacts.manifest import (
    ArtifactError,
    Manifest,
    export_command,
    read_manifest,
    sha256_file,
)
from fbclip_edge.artifacts.options import tensorrt_installed
from fbclip_edge.checkpoint import WEIGHTS_FILE
from fbclip_edge.errors import FBClipError
from fbclip_edge.runtime.base import Backend, TorchBackend

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")


def _open_torch(
    artifacts: Path, manifest: Manifest, device: str | None, precision: str, verify: bool
) -> Backend:
    """Reload the model folder named in the manifest, refusing it if it changed since export."""
    folder = Path(manifest.model.path)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ArtifactError(
            f"backend='torch' reloads the model folder {folder} recorded in {artifacts}, and "
            f"{weights} is gone; restore it, or use backend='onnxruntime'"
        )
    if verify and sha256_file(weights) != manifest.model.weights_sha256:
        raise ArtifactError(
            f"the model in {folder} changed since {artifacts} was exported (sha256 of "
            f"{WEIGHTS_FILE} differs); re-export with `{export_command(manifest, artifacts)}`"
        )
    from fbclip_edge.checkpoint import load

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


def _auto(manifest: Manifest) -> tuple[str, str | None, str]:
    """(backend, provider, why) for backend='auto'."""
    skipped = []
    blocker = _tensorrt_blocker(manifest)
    if blocker is None:
        return "tensorrt", None, "a TensorRT engine built for this GPU and TensorRT version"
    skipped.append(f"not tensorrt: {blocker}")
    from fbclip_edge.runtime.onnxruntime import available_providers

    providers = available_providers()
    if "cuda" in providers and torch.cuda.is_available():
        return "onnxruntime", "cuda", "; ".join([*skipped, "onnxruntime has CUDA"])
    if providers:
        skipped.append("not onnxruntime cuda: no CUDA provider or no CUDA GPU")
        return "onnxruntime", "cpu", "; ".join(skipped)
    skipped.append("not onnxruntime: not installed")
    return "torch", None, "; ".join(skipped)


def _check_options(
    backend: str, provider: str | None, cuda_graph: bool | int, precision: str | None
) -> None:
    """Options that only one backend understands are errors elsewhere, not ignored."""
    if provider is not None and backend != "onnxruntime":
        raise FBClipError(f"provider applies to backend='onnxruntime' only, not {backend!r}")
    if cuda_graph and backend != "tensorrt":
        raise FBClipError("cuda_graph applies to backend='tensorrt' only")
    if precision is not None and precision not in ("fp32", "fp16"):
        raise FBClipError(f"precision must be fp32 or fp16, not {precision!r}")


def _open_onnxruntime(
    folder: Path,
    manifest: Manifest,
    provider: str | None,
    device: str | None,
    precision: str | None,
    verify: bool,
) -> Backend:
    from fbclip_edge.runtime.onnxruntime import OnnxRuntimeBackend, available_providers

    if provider is None:
        cuda = "cuda" in available_providers() and torch.cuda.is_available()
        provider = "cuda" if cuda else "cpu"
    return OnnxRuntimeBackend(folder, manifest, provider, device, precision, verify)


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
) -> Backend:
    """Open an artifacts folder made by `fbclip-edge export` as a Backend.

    backend: 'auto' | 'torch' | 'onnxruntime' | 'tensorrt'. provider (onnxruntime only):
    'cpu' | 'cuda' | 'tensorrt'; default CUDA when available, else CPU. cuda_graph
    (TensorRT only): capture a CUDA graph at the profile's opt batch (True) or this batch.
    precision: onnxruntime runs the 'fp32' or 'fp16' graph (default: fp16 on GPU providers
    when exported); torch runs fp32 (default) or fp16 autocast; tensorrt must match the
    engine. verify: check the sha256 of every file used (seconds for large graphs).
    """
    folder = Path(artifacts)
    manifest = read_manifest(folder)
    if backend not in BACKENDS:
        raise FBClipError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    why = f"asked for {backend}"
    if backend == "auto":
        if provider is not None:
            backend, why = "onnxruntime", f"provider={provider} given"
        else:
            backend, provider, why = _auto(manifest)
    _check_options(backend, provider, cuda_graph, precision)
    opened: Backend
    if backend == "torch":
        opened = _open_torch(folder, manifest, device, precision or "fp32", verify)
    elif backend == "onnxruntime":
        opened = _open_onnxruntime(folder, manifest, provider, device, precision, verify)
    else:
        opened = _open_tensorrt(folder, manifest, device, cuda_graph, precision, verify)
    opened.info.details["selected"] = why
    opened.info.details["artifacts"] = str(folder)
    return opened
