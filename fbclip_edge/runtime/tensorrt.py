"""TensorRT backend: torch owns the device buffers, execute_async_v3 runs on torch's stream.

Engine lifecycle: load (deserialize, check) -> allocate (shapes, buffers, addresses for a
batch) -> infer; capture records one CUDA graph at a fixed batch and replays it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fbclip_edge.artifacts.manifest import (
    ArtifactError,
    EngineSpec,
    Manifest,
    export_command,
    verify_files,
)
from fbclip_edge.errors import FBClipError
from fbclip_edge.runtime.base import Backend, BackendInfo, MapScorer
from fbclip_edge.runtime.tensorrt_env import compute_capability, import_tensorrt, make_logger

if TYPE_CHECKING:
    import tensorrt as trt  # typed by tensorrt-stubs; imported at run time where used


def engine_mismatch(spec: EngineSpec, tensorrt_version: str, capability: str) -> str | None:
    """Why this engine cannot run here (other TensorRT or GPU generation), or None."""
    if spec.tensorrt_version != tensorrt_version:
        return f"it was built with TensorRT {spec.tensorrt_version}, this is {tensorrt_version}"
    if spec.compute_capability != capability:
        return (
            f"it was built for compute capability {spec.compute_capability} "
            f"({spec.gpu}), this GPU is {capability}"
        )
    return None


def _ints(dims: trt.Dims) -> tuple[int, ...]:
    """A TensorRT shape as a tuple (Dims index like a tuple; the stubs give no __iter__)."""
    return tuple(int(dims[i]) for i in range(len(dims)))


def _torch_dtype(dtype: trt.DataType) -> torch.dtype:
    import tensorrt as trt

    kinds = trt.DataType
    table = {
        kinds.FLOAT: torch.float32,
        kinds.HALF: torch.float16,
        kinds.INT32: torch.int32,
        kinds.INT64: torch.int64,
        kinds.BOOL: torch.bool,
        kinds.BF16: torch.bfloat16,
    }
    if dtype not in table:
        raise FBClipError(f"engine tensor type {dtype} is not supported here; re-export")
    return table[dtype]


class TensorRTEngine:
    """One engine and one execution context with torch-allocated I/O buffers."""

    def __init__(self, path: Path, device: torch.device) -> None:
        """Load: deserialize on `device`; None from TensorRT means another version or GPU."""
        import_tensorrt()
        import tensorrt as trt

        self.device = device
        self.logger = make_logger()
        with torch.cuda.device(device):
            self.runtime = trt.Runtime(self.logger)
            self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                details = "; ".join(self.logger.errors[-2:]) or "no details"
                raise ArtifactError(f"TensorRT cannot load {path.name} ({details})")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if len(inputs) != 1:
            raise ArtifactError(f"{path.name} has inputs {inputs}, expected one; re-export")
        self.input = inputs[0]
        self.outputs = [n for n in names if n != self.input]
        low, _, high = self.engine.get_tensor_profile_shape(self.input, 0)
        self.batch_range = (int(low[0]), int(high[0]))
        self.input_shape = _ints(self.engine.get_tensor_shape(self.input))
        self.buffers: dict[str, torch.Tensor] = {}
        self.batch: int | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_batch: int | None = None

    def allocate(self, batch: int) -> None:
        """Set the input shape and bind fresh output buffers for this batch (no-op if same)."""
        if batch == self.batch:
            return
        low, high = self.batch_range
        if not low <= batch <= high:
            raise FBClipError(
                f"batch {batch} is outside the engine's profile {low}..{high}; "
                "split the batch or rebuild with a wider --batch"
            )
        shape = (batch, *self.input_shape[1:])
        if not self.context.set_input_shape(self.input, shape):
            raise FBClipError(f"TensorRT refused input shape {shape}; rebuild the engine")
        self.buffers = {self.input: torch.empty(shape, dtype=torch.float32, device=self.device)}
        for name in self.outputs:
            dims = _ints(self.context.get_tensor_shape(name))
            dtype = _torch_dtype(self.engine.get_tensor_dtype(name))
            self.buffers[name] = torch.empty(dims, dtype=dtype, device=self.device)
        for name, buffer in self.buffers.items():
            self.context.set_tensor_address(name, buffer.data_ptr())
        self.batch, self.graph = batch, None  # new addresses: a captured graph is stale

    def _enqueue(self, stream: torch.cuda.Stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            details = "; ".join(self.logger.errors[-2:]) or "no details"
            raise FBClipError(f"TensorRT execution failed ({details})")

    def infer(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run on torch's current stream; outputs are the engine's buffers (valid until the
        next call), so callers that keep them must clone."""
        batch = pixels.shape[0]
        if batch == self.graph_batch and self.graph is None:
            self.capture(batch)  # re-record: another batch re-bound the buffers meanwhile
        else:
            self.allocate(batch)
        self.buffers[self.input].copy_(pixels, non_blocking=True)
        if self.graph is not None and batch == self.graph_batch:
            self.graph.replay()
        else:
            self._enqueue(torch.cuda.current_stream(self.device))
        return {name: self.buffers[name] for name in self.outputs}

    def capture(self, batch: int) -> None:
        """Record one CUDA graph at `batch`; other batches run without it (and re-binding for
        them makes the next `batch` call record again)."""
        self.allocate(batch)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._enqueue(stream)  # first run does deferred setup that must not be captured
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            self._enqueue(stream)
        self.graph, self.graph_batch = graph, batch


class TensorRTBackend(Backend):
    """An engine from an artifacts folder, checked against this machine before loading."""

    def __init__(
        self,
        artifacts: Path,
        manifest: Manifest,
        device: str | None = None,
        cuda_graph: bool | int = False,
        verify: bool = True,
    ) -> None:
        import_tensorrt()
        import tensorrt as trt

        spec = manifest.engine()
        if spec is None:
            raise ArtifactError(
                f"{artifacts} has no TensorRT engine for scoring={manifest.scoring.value}; "
                f"build one with `{export_command(manifest, artifacts)}`"
            )
        self.device = torch.device(device or "cuda")
        problem = engine_mismatch(spec, str(trt.__version__), compute_capability(self.device))
        if problem:
            raise ArtifactError(
                f"{artifacts / spec.file} cannot run here: {problem}. Engines are tied to one "
                f"TensorRT version and GPU; rebuild on this machine with "
                f"`{export_command(manifest, artifacts)}`"
            )
        names = [spec.file, manifest.text_features, manifest.map_weights]
        if verify:
            verify_files(manifest, artifacts, names)
        self.engine = TensorRTEngine(artifacts / spec.file, self.device)
        size = manifest.image_size
        if self.engine.input_shape[1:] != (3, size, size) or self.engine.batch_range != (
            spec.batch.min,
            spec.batch.max,
        ):
            raise ArtifactError(
                f"{spec.file} takes {self.engine.input_shape} with batch "
                f"{self.engine.batch_range}, the manifest says (3, {size}, {size}) and "
                f"{spec.batch}: the engine belongs to another export; re-export the folder"
            )
        self.batch_range = self.engine.batch_range
        self.scorer = MapScorer.for_artifacts(artifacts, manifest)
        self.info = BackendInfo(
            "tensorrt",
            str(self.device),
            spec.precision.value,
            size,
            {
                "engine": spec.file,
                "tensorrt": spec.tensorrt_version,
                "compute_capability": spec.compute_capability,
                "scoring": manifest.scoring.value,
                "batch_profile": str(spec.batch),
                "cuda_graph": False,
            },
        )
        if cuda_graph:
            self.enable_cuda_graph(spec.batch.opt if cuda_graph is True else int(cuda_graph))

    def enable_cuda_graph(self, batch: int) -> None:
        """Capture a CUDA graph at `batch`: calls of that batch replay it (one launch)."""
        self.engine.capture(batch)
        self.info.details["cuda_graph"] = f"batch {batch}"

    @property
    def input_device(self) -> torch.device:
        """The engine's GPU: preprocess there to skip a host-to-device copy."""
        return self.device

    @torch.inference_mode()
    def _run(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.engine.infer(pixel_values.to(self.device, non_blocking=True))
        if self.scorer is not None:
            return self.scorer(outputs["maps"])
        return outputs["image_score"].float().clone(), outputs["patch_map"].float().clone()
