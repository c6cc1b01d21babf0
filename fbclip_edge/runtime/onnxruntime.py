"""onnxruntime backend (CPU, CUDA and TensorRT execution providers) over exported graphs.

onnxruntime silently falls back to CPU when a GPU provider cannot start, so the provider
actually in use is read back from the session, reported, and a fallback is an error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fbclip_edge.artifacts.manifest import ArtifactError, GraphSpec, Manifest, verify_files
from fbclip_edge.artifacts.options import GraphRole, Precision, Scoring
from fbclip_edge.errors import FBClipError
from fbclip_edge.runtime.base import Backend, BackendInfo, MapScorer, run_split
from fbclip_edge.runtime.cpu_features import detect, refuse_without_isa
from fbclip_edge.runtime.onnx_session import (
    PROVIDERS,
    check_available,
    import_onnxruntime,
    load_session,
    session_options,
)


def available_providers() -> list[str]:
    """Short names ('cpu', 'cuda', 'tensorrt') of the providers this onnxruntime offers."""
    try:
        names = import_onnxruntime().get_available_providers()
    except FBClipError:
        return []
    return [short for short, full in PROVIDERS.items() if full in names]


def run_batch_limit(manifest: Manifest, provider: str, device: torch.device) -> int | None:
    """Largest batch per session run, or None for no limit.

    onnxruntime's CPU and CUDA providers materialize each attention call's score matrices
    where torch and TensorRT fuse attention. The exported graphs chunk every method's extra
    attention so that no call holds more scores than one CLIP block (CLIP heads x T^2 floats
    per image); larger batches are split so a run stays within a quarter of the RAM (CPU) or
    half the free GPU memory (CUDA) instead of being OOM-killed.
    """
    if provider == "tensorrt":
        return None
    vision = manifest.model.config.get("backbone", {}).get("vision", {})
    width = int(vision.get("width", 1024))
    heads = max(1, width // int(vision.get("head_width", 64)))
    per_image = 3 * 4 * heads * manifest.tokens**2
    if provider == "cuda" and torch.cuda.is_available():
        budget = torch.cuda.mem_get_info(device)[0] // 2
    else:
        budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    return max(1, int(budget // per_image))


def _physical_cores() -> int:
    features = detect()
    return features.physical_cores or features.logical_cores


def _cache_dir(graph_sha: str) -> Path:
    """Where the TensorRT provider keeps its engines: per graph, outside the artifacts."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "fbclip-edge" / "ort-tensorrt" / graph_sha[:16]


def _provider_list(
    provider: str, device_id: int, spec: GraphSpec, manifest: Manifest, graph_sha: str
) -> list[Any]:
    """The provider chain: the asked one first, CPU last (for the few ops a GPU EP skips)."""
    cuda = ("CUDAExecutionProvider", {"device_id": device_id})
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        return [cuda, "CPUExecutionProvider"]
    size, batch = manifest.image_size, manifest.batch
    cache = _cache_dir(graph_sha)
    cache.mkdir(parents=True, exist_ok=True)

    def shape(n: int) -> str:
        return f"pixel_values:{n}x3x{size}x{size}"

    options = {
        "device_id": device_id,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_profile_min_shapes": shape(batch.min),
        "trt_profile_opt_shapes": shape(batch.opt),
        "trt_profile_max_shapes": shape(batch.max),
    }
    return [("TensorrtExecutionProvider", options), cuda, "CPUExecutionProvider"]


class OnnxRuntimeBackend(Backend):
    """One onnxruntime session over the graph the manifest's scoring mode needs."""

    def __init__(
        self,
        artifacts: Path,
        manifest: Manifest,
        provider: str = "cpu",
        device: str | None = None,
        precision: str | None = None,
        verify: bool = True,
        threads: int | None = None,
    ) -> None:
        ort = import_onnxruntime()
        check_available(ort, provider)
        spec = self._graph(artifacts, manifest, provider, precision)
        files = [spec.file, *spec.data_files]
        if manifest.scoring == Scoring.KERNEL:
            files += [manifest.text_features, manifest.map_weights]
        if verify:
            verify_files(manifest, artifacts, files)
        gpu = torch.device(device or "cuda")
        device_id = gpu.index or 0
        # GPU providers exchange torch CUDA tensors when torch has CUDA, else host arrays.
        self.bind = provider != "cpu" and torch.cuda.is_available()
        self.device = gpu if self.bind else torch.device("cpu")
        options = session_options(ort, provider, threads)
        chain = _provider_list(
            provider, device_id, spec, manifest, manifest.files.get(spec.file, spec.file)
        )
        self.session = load_session(ort, artifacts / spec.file, options, chain)
        used = self.session.get_providers()
        self._check_interface(spec, manifest)
        self.spec, self.provider = spec, provider
        self.run_batch = run_batch_limit(manifest, provider, self.device)
        self.batch_range = (manifest.batch.min, manifest.batch.max)
        self.scorer = MapScorer.for_artifacts(artifacts, manifest)
        self.info = BackendInfo(
            "onnxruntime",
            str(self.device),
            spec.precision.value,
            manifest.image_size,
            {
                "provider": provider,
                "providers": ", ".join(used),
                "graph": spec.file,
                "scoring": manifest.scoring.value,
                "onnxruntime": ort.__version__,
                "run_batch": self.run_batch or "any",
                # onnxruntime's default is one intra-op thread per physical core
                "threads": threads or f"default ({_physical_cores()} physical cores)",
            },
        )

    @staticmethod
    def _graph(
        artifacts: Path, manifest: Manifest, provider: str, precision: str | None
    ) -> GraphSpec:
        """FP16 (mixed) graph on GPU providers when exported, the INT8 graph on the CPU when
        exported, float32 otherwise or if asked. bf16 is OpenVINO's: onnxruntime's CPU
        provider has no bfloat16 MatMul/Gemm kernels (1.32), so a bf16 export runs its
        float32 graph here, reported as fp32."""
        role = GraphRole.VISION if manifest.scoring == Scoring.KERNEL else GraphRole.FULL
        if precision == Precision.BF16.value:
            raise FBClipError(
                "onnxruntime has no bfloat16 MatMul/Gemm kernels on the CPU; open with "
                "backend='openvino' for bf16, or precision='fp32'"
            )
        if precision is None:
            gpu_fp16 = provider != "cpu" and manifest.precision == Precision.FP16
            cpu_int8 = provider == "cpu" and manifest.precision == Precision.INT8
            wanted = Precision.FP16 if gpu_fp16 else Precision.INT8 if cpu_int8 else Precision.FP32
        else:
            wanted = Precision(precision)
        if wanted == Precision.INT8 and provider == "cpu":
            refuse_without_isa(wanted, artifacts)  # before the graph: the reason comes first
        spec = manifest.graph(role, wanted) or manifest.graph(role, Precision.FP32)
        if spec is None or (precision is not None and spec.precision != wanted):
            raise ArtifactError(
                f"the artifacts have no {wanted.value} {role.value} graph; re-export with "
                f"--precision {wanted.value} --scoring {manifest.scoring.value}"
            )
        return spec

    def _check_interface(self, spec: GraphSpec, manifest: Manifest) -> None:
        """The graph must fit the manifest (catches a graph copied from another export)."""
        found = [(t.name, list(t.shape)) for t in self.session.get_outputs()]
        expected = [(t.name, list(t.shape)) for t in spec.outputs]
        size = manifest.image_size
        shape = list(self.session.get_inputs()[0].shape)
        if shape[1:] != [3, size, size] or [(name, dims[1:]) for name, dims in found] != [
            (name, dims[1:]) for name, dims in expected
        ]:
            raise ArtifactError(
                f"{spec.file} takes {shape} and gives {found}, but the manifest describes "
                f"(3, {size}, {size}) -> {expected}: the graph belongs to another export; "
                "re-export the folder"
            )

    @property
    def input_device(self) -> torch.device:
        """CPU for the CPU provider, else the GPU the session runs on."""
        return self.device

    def _outputs_bound(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """GPU providers: torch tensors bound in place, no host round trip."""
        pixels = pixels.to(self.device).contiguous()
        binding = self.session.io_binding()
        index = self.device.index or 0
        binding.bind_input(
            "pixel_values", "cuda", index, np.float32, tuple(pixels.shape), pixels.data_ptr()
        )
        outputs = []
        for spec in self.spec.outputs:
            shape = [pixels.shape[0] if d == "batch" else int(d) for d in spec.shape]
            out = torch.empty(shape, dtype=torch.float32, device=self.device)
            binding.bind_output(spec.name, "cuda", index, np.float32, tuple(shape), out.data_ptr())
            outputs.append(out)
        torch.cuda.current_stream(self.device).synchronize()  # input written before ORT reads
        self.session.run_with_iobinding(binding)
        return outputs

    def _session_run(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        if self.bind:
            return self._outputs_bound(pixels)
        feed = {"pixel_values": np.ascontiguousarray(pixels.cpu().numpy())}
        return [torch.from_numpy(o) for o in self.session.run(None, feed)]

    @torch.inference_mode()
    def _run(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return run_split(pixel_values, self.run_batch, self._session_run, self.scorer)
