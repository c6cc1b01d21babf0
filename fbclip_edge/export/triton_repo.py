"""A Triton Inference Server model repository for scale-out serving of an export.

The served model is the full graph (pixels -> image_score, patch_map), so clients get
scores without running the scoring kernels: the TensorRT engine as model.plan when one was
built for the full graph, else the ONNX full graph on Triton's onnxruntime backend.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fbclip_edge.artifacts.manifest import GraphSpec, Manifest, TensorSpec
from fbclip_edge.artifacts.options import GraphRole, Precision
from fbclip_edge.errors import FBClipError

REPOSITORY = "triton"
DATA_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64"}


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard link when possible (the engine can be GBs), else copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _tensor(spec: TensorSpec) -> str:
    """One input/output block; a batch-only tensor is served as [1] reshaped to []."""
    dims = [int(d) for d in spec.shape[1:]]
    data_type = DATA_TYPES.get(spec.dtype)
    if data_type is None:
        raise FBClipError(
            f"tensor {spec.name} has dtype {spec.dtype}, which the serving repo cannot map"
        )
    reshape = ""
    if not dims:
        dims, reshape = [1], " reshape: { shape: [ ] }"
    shape = ", ".join(map(str, dims))
    return f'  {{ name: "{spec.name}" data_type: {data_type} dims: [ {shape} ]{reshape} }}'


def _full_graph(manifest: Manifest) -> GraphSpec:
    graph = manifest.graph(GraphRole.FULL, manifest.precision) or manifest.graph(GraphRole.FULL)
    if graph is None:
        raise FBClipError(
            "the artifacts have no full graph to serve; re-export with --targets onnx,triton"
        )
    return graph


def config_pbtxt(
    manifest: Manifest,
    model_name: str,
    platform: str,
    graph: GraphSpec,
    instances: int = 1,
    max_queue_delay_us: int = 2000,
) -> str:
    """Model configuration: dynamic batching up to the export's batch profile, GPU instances."""
    batch = manifest.batch
    preferred = sorted({b for b in (batch.opt, batch.max) if b >= 1})
    lines = [
        f'name: "{model_name}"',
        f'platform: "{platform}"',
        f"max_batch_size: {batch.max}",
        "input [",
        ",\n".join(_tensor(t) for t in graph.inputs),
        "]",
        "output [",
        ",\n".join(_tensor(t) for t in graph.outputs),
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]",
        f"  max_queue_delay_microseconds: {max_queue_delay_us}",
        "}",
        f"instance_group [ {{ count: {instances} kind: KIND_GPU }} ]",
    ]
    if platform == "onnxruntime_onnx" and manifest.precision == Precision.FP16:
        lines += [
            "optimization { execution_accelerators { gpu_execution_accelerator: [",
            '  { name: "tensorrt" parameters { key: "precision_mode" value: "FP16" } }',
            "] } }",
        ]
    return "\n".join(lines) + "\n"


def write_triton_repository(
    manifest: Manifest, artifacts: Path, model_name: str = "fbclip", instances: int = 1
) -> list[str]:
    """Write `artifacts/triton/<model_name>/{config.pbtxt, 1/model.plan|model.onnx}`.

    Returns the written paths relative to `artifacts`, for the manifest's file list.
    """
    engine = next((e for e in manifest.engines if e.role == GraphRole.FULL), None)
    graph = _full_graph(manifest)
    root = artifacts / REPOSITORY / model_name
    if engine is not None:
        platform, source, model_file = "tensorrt_plan", artifacts / engine.file, "model.plan"
    else:
        platform, source, model_file = "onnxruntime_onnx", artifacts / graph.file, "model.onnx"
    _link_or_copy(source, root / "1" / model_file)
    written = [f"{REPOSITORY}/{model_name}/1/{model_file}"]
    for data_file in graph.data_files if engine is None else []:
        _link_or_copy(artifacts / data_file, root / "1" / data_file)
        written.append(f"{REPOSITORY}/{model_name}/1/{data_file}")
    (root / "config.pbtxt").write_text(
        config_pbtxt(manifest, model_name, platform, graph, instances)
    )
    written.append(f"{REPOSITORY}/{model_name}/config.pbtxt")
    return written
