"""Build a TensorRT 10 engine from an exported ONNX graph (strongly typed, dynamic batch).

Precision choice: FP16 engines are built from the mixed-precision ONNX (mixed_precision.py)
as a *strongly typed* network, not with BuilderFlag.FP16 plus per-layer FP32 constraints.
TensorRT 10.12 deprecated those weak-typing APIs and 11 removes them; with strong typing the
FP32 islands (LayerNorm, Softmax, reductions, normalizations) are in the graph itself, so
TensorRT cannot trade them away, and onnxruntime can check the very same graph on a CPU.

Typing: `tensorrt` is imported inside the functions (the package must import without it), and
annotated with its real classes, so mypy checks every call against tensorrt-stubs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from fbclip_edge.artifacts.manifest import EngineSpec, GraphSpec
from fbclip_edge.artifacts.options import BatchProfile, Precision
from fbclip_edge.errors import FBClipError
from fbclip_edge.export.onnx_graph import INPUT_NAME
from fbclip_edge.runtime.tensorrt_env import (
    compute_capability,
    import_tensorrt,
    make_logger,
)

if TYPE_CHECKING:
    import tensorrt as trt

@dataclass(frozen=True)
class BuildSettings:
    """Builder knobs recorded in the manifest."""

    batch: BatchProfile
    precision: Precision
    workspace_bytes: int = 8 << 30
    optimization_level: int = 3


def _describe(error: trt.ParserError) -> str:
    """'node NAME (OP): description'; node_name/node_operator exist from TensorRT 8.6 on."""
    name = getattr(error, "node_name", lambda: "")() or str(error.node())
    operator = getattr(error, "node_operator", lambda: "")()
    where = f"node {name} ({operator})" if operator else f"node {name}"
    return f"{where}: {error.desc()}"


def _parse(
    builder: trt.Builder, logger: trt.ILogger, onnx_path: Path
) -> tuple[trt.INetworkDefinition, trt.OnnxParser]:
    """Strongly typed network from the ONNX file; parser errors named by node and operator."""
    import tensorrt as trt

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


def _dims(shape: tuple[int, ...]) -> trt.Dims:
    """A shape where TensorRT takes Dims: it converts tuples itself, the stubs don't say so."""
    return cast("trt.Dims", shape)


def _configure(
    builder: trt.Builder, settings: BuildSettings, size: int, cache_bytes: bytes
) -> trt.IBuilderConfig:
    """Memory pool, optimization level, batch profile, strict FP32 and the timing cache."""
    import tensorrt as trt

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    config.builder_optimization_level = settings.optimization_level
    if settings.precision == Precision.FP32:
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 matmuls miss the 1e-4 parity target
    profile = builder.create_optimization_profile()
    b = settings.batch
    profile.set_shape(
        INPUT_NAME,
        _dims((b.min, 3, size, size)),
        _dims((b.opt, 3, size, size)),
        _dims((b.max, 3, size, size)),
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
    import_tensorrt()
    import tensorrt as trt

    logger = make_logger()
    started = time.perf_counter()
    with torch.cuda.device(device):
        builder = trt.Builder(logger)
        network, _parser = _parse(builder, logger, folder / graph.file)
        cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
        config = _configure(builder, settings, image_size, cache_bytes)
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
