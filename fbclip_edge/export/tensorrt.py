"""Build a TensorRT 10 engine from an exported ONNX graph (strongly typed, dynamic batch).

Precision choice: FP16 engines are built from the mixed-precision ONNX (mixed_precision.py)
as a *strongly typed* network, not with BuilderFlag.FP16 plus per-layer FP32 constraints.
TensorRT 10.12 deprecated those weak-typing APIs and 11 removes them; with strong typing the
FP32 islands (LayerNorm, Softmax, reductions, normalizations) are in the graph itself, so
TensorRT cannot trade them away, and onnxruntime can check the very same graph on a CPU.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from fbclip_edge.errors import FBClipError
from fbclip_edge.export.manifest import EngineSpec, GraphSpec
from fbclip_edge.export.onnx_graph import INPUT_NAME
from fbclip_edge.export.options import BatchProfile, Precision

INSTALL_HINT = "install fbclip-edge[trt] on a machine with an NVIDIA GPU"


def import_tensorrt() -> ModuleType:
    """The tensorrt module, or a one-line error saying how to get it."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as error:
        raise FBClipError(f"TensorRT is not available ({error}); {INSTALL_HINT}") from None
    if not torch.cuda.is_available():
        raise FBClipError(f"TensorRT needs a CUDA GPU and torch sees none; {INSTALL_HINT}")
    return trt


def compute_capability(device: torch.device | int | None = None) -> str:
    """'8.9', '9.0', ...: engines only run on the compute capability they were built for."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


@dataclass(frozen=True)
class BuildSettings:
    """Builder knobs recorded in the manifest."""

    batch: BatchProfile
    precision: Precision
    workspace_bytes: int = 8 << 30
    optimization_level: int = 3


def make_logger(trt: ModuleType) -> Any:
    """A TensorRT logger that keeps errors, so failures can be reported in one line."""

    class _Logger(trt.ILogger):  # type: ignore[name-defined, misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg.strip())

    return _Logger()


def _describe(error: Any) -> str:
    """'node NAME (OP): description'; node_name/node_operator exist from TensorRT 8.6 on."""
    name = getattr(error, "node_name", lambda: "")() or str(error.node())
    operator = getattr(error, "node_operator", lambda: "")()
    where = f"node {name} ({operator})" if operator else f"node {name}"
    return f"{where}: {error.desc()}"


def _parse(trt: ModuleType, builder: Any, logger: Any, onnx_path: Path) -> Any:
    """Strongly typed network from the ONNX file; parser errors named by node and operator."""
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external data next to the file
        problems = [_describe(parser.get_error(i)) for i in range(parser.num_errors)]
        shown = "; ".join(problems[:3]) or "no details"
        raise FBClipError(
            f"TensorRT cannot parse {onnx_path.name}: {shown}; re-export with "
            "`fbclip-edge export` or update TensorRT"
        )
    return network, parser


def _configure(
    trt: ModuleType, builder: Any, settings: BuildSettings, size: int, cache_bytes: bytes
) -> Any:
    """Memory pool, optimization level, batch profile, strict FP32 and the timing cache."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    config.builder_optimization_level = settings.optimization_level
    if settings.precision == Precision.FP32:
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 matmuls miss the 1e-4 parity target
    profile = builder.create_optimization_profile()
    b = settings.batch
    profile.set_shape(
        INPUT_NAME, (b.min, 3, size, size), (b.opt, 3, size, size), (b.max, 3, size, size)
    )
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        # A cache from another GPU or TensorRT version: start a fresh one instead of failing.
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    return config


def build_engine(
    graph: GraphSpec,
    folder: Path,
    settings: BuildSettings,
    image_size: int,
    timing_cache: Path | None = None,
    device: int = 0,
) -> EngineSpec:
    """Parse `folder/graph.file`, build, write `<role>.<precision>.engine` and timing.cache."""
    trt = import_tensorrt()
    logger = make_logger(trt)
    started = time.perf_counter()
    with torch.cuda.device(device):
        builder = trt.Builder(logger)
        network, _parser = _parse(trt, builder, logger, folder / graph.file)
        cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
        config = _configure(trt, builder, settings, image_size, cache_bytes)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            details = "; ".join(logger.errors[-3:]) or "no details"
            raise FBClipError(
                f"TensorRT could not build an engine from {graph.file} ({details}); try a "
                "smaller --batch maximum or a larger workspace, or a newer TensorRT"
            )
        name = f"{graph.role.value}.{settings.precision.value}.engine"
        (folder / name).write_bytes(bytes(serialized))
        (folder / "timing.cache").write_bytes(bytes(config.get_timing_cache().serialize()))
        gpu = torch.cuda.get_device_name(device)
        capability = compute_capability(device)
    return EngineSpec(
        file=name,
        role=graph.role,
        precision=settings.precision,
        tensorrt_version=str(trt.__version__),
        compute_capability=capability,
        gpu=gpu,
        batch=settings.batch,
        optimization_level=settings.optimization_level,
        workspace_bytes=settings.workspace_bytes,
        strongly_typed=True,
        build_seconds=round(time.perf_counter() - started, 1),
    )
