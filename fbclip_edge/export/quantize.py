"""FP32 ONNX -> static INT8 QDQ ONNX for CPUs with VNNI or AMX (onnxruntime and OpenVINO).

What is quantized: MatMul and Gemm whose weight is a constant (the CLIP tower's and the
heads' linear layers), weights per output channel (int8, symmetric), activations per tensor
(uint8, the layout onnxruntime recommends on x86 with VNNI) from MinMax calibration on good
frames; their outputs stay float. Everything else stays float32: LayerNorm, Softmax, the L2
normalizations, the activation x activation products of attention (softmax probabilities in
8 bits lose the small weights the FB attention relies on), in a full graph every scoring op,
and the patch embedding Conv: it reads the normalized pixels, whose 8-bit steps reach every
token (alone it moved AnomalyCLIP's tiny map by 6.5e-2, everything else together by 1e-2),
for about 0.2% of the FLOPs. MinMax, Entropy and Percentile calibration and symmetric int8
activations all land within 1.3x of each other there.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import torch

from fbclip_edge.artifacts.manifest import GraphSpec
from fbclip_edge.artifacts.options import Precision
from fbclip_edge.errors import FBClipError
from fbclip_edge.export.onnx_graph import INPUT_NAME, check_graph, graph_file, save_graph

QUANTIZED_OPS = ("MatMul", "Gemm")
# Prefix of the scoring nodes merged into full.onnx (onnx_graph.export_graphs).
SCORING_PREFIX = "score/"


def _import_quantization() -> ModuleType:
    """onnxruntime.quantization, or a one-line error naming the extra to install."""
    try:
        import onnxruntime.quantization as quantization
    except ImportError:
        raise FBClipError(
            "--precision int8 quantizes with onnxruntime; install fbclip-edge[cpu]"
        ) from None
    return quantization


def weight_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul/Gemm nodes whose second input is a stored weight, outside the
    scoring ops; unnamed nodes get a name (the quantizer selects by name)."""
    graph = model.graph
    constants = {init.name for init in graph.initializer}
    constants |= {node.output[0] for node in graph.node if node.op_type == "Constant"}
    chosen = []
    for index, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{index}"
        if (
            node.op_type in QUANTIZED_OPS
            and len(node.input) > 1
            and node.input[1] in constants
            and not node.name.startswith(SCORING_PREFIX)
        ):
            chosen.append(node.name)
    return chosen


def _reader(pixels: torch.Tensor, base: Any) -> Any:
    """A CalibrationDataReader over the pixels, one image per run (the batch is dynamic)."""

    class FrameReader(base):
        def __init__(self) -> None:
            self.frames: Iterator[np.ndarray] = iter(pixels.float().cpu().numpy())

        def get_next(self) -> dict[str, np.ndarray] | None:
            frame = next(self.frames, None)
            return None if frame is None else {INPUT_NAME: frame[None]}

    return FrameReader()


def _float_sources(graph: onnx.GraphProto) -> dict[str, str]:
    """Dequantized activation -> the float tensor its QuantizeLinear read."""
    producer = {out: node for node in graph.node for out in node.output}
    sources = {}
    for node in graph.node:
        quantize = producer.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if quantize is not None and quantize.op_type == "QuantizeLinear":
            sources[node.output[0]] = quantize.input[0]
    return sources


def _drop_unused_qdq(graph: onnx.GraphProto) -> None:
    """Remove QuantizeLinear/DequantizeLinear nodes nothing reads, until none is left."""
    qdq = ("QuantizeLinear", "DequantizeLinear")
    while True:
        used = {name for node in graph.node for name in node.input}
        used |= {output.name for output in graph.output}
        dead = [n for n in graph.node if n.op_type in qdq and not set(n.output) & used]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)


def keep_float_elsewhere(model: onnx.ModelProto, quantized: set[str]) -> None:
    """Point every consumer of a dequantized activation that is not a quantized product back
    at the float tensor: the quantizer hands the fake-quantized copy to all of a tensor's
    consumers (Shape, Reshape, the residual Add, the L2 norms), which would move 8-bit error
    into ops that are meant to stay float32. Q/DQ pairs left without users are dropped."""
    graph = model.graph
    sources = _float_sources(graph)
    for node in graph.node:
        if node.name in quantized or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for index, name in enumerate(node.input):
            node.input[index] = sources.get(name, name)
    _drop_unused_qdq(graph)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The quantizer logs advice per node on the root logger ('consider pre-processing',
    'bias not constant'): noise for a user, who sees the parity table instead."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def quantize_int8(fp32: GraphSpec, folder: Path, pixels: torch.Tensor) -> GraphSpec:
    """Write `<role>.int8.onnx` beside `fp32` (calibrated on `pixels`, preprocessed good
    frames) and return its spec."""
    if pixels.shape[0] == 0:
        raise FBClipError("no calibration frames for --precision int8; pass some good images")
    quantization = _import_quantization()
    model = onnx.load(str(folder / fp32.file))
    nodes = weight_nodes(model)
    name = graph_file(fp32.role, Precision.INT8)
    external = bool(fp32.data_files)
    with _quiet(), tempfile.TemporaryDirectory(prefix=".calibrate-", dir=folder) as scratch:
        source, quantized = Path(scratch) / "named.onnx", Path(scratch) / name
        onnx.save_model(
            model,
            str(source),
            save_as_external_data=external,
            location="named.onnx.data" if external else None,
        )
        del model
        quantization.quantize_static(
            str(source),
            str(quantized),
            _reader(pixels, quantization.CalibrationDataReader),
            quant_format=quantization.QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            nodes_to_quantize=nodes,
            per_channel=True,
            reduce_range=False,
            activation_type=quantization.QuantType.QUInt8,
            weight_type=quantization.QuantType.QInt8,
            use_external_data_format=external,
            calibrate_method=quantization.CalibrationMethod.MinMax,
            # float outputs: the products' results feed float32 ops (bias, residual, norms).
            # Not CalibMaxIntermediateOutputs: onnxruntime 1.32's MinMax calibrator drops the
            # collected outputs at that limit without merging their ranges ("No data is
            # collected"), so the calibrator keeps every frame's activations in memory.
            extra_options={"OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS)},
        )
        result = onnx.load(str(quantized))
        keep_float_elsewhere(result, set(nodes))
        data_files = save_graph(result, folder / name)
        del result
    check = check_graph(folder / name)
    return GraphSpec(
        fp32.role, Precision.INT8, name, check.inputs, check.outputs, sorted(check.ops), data_files
    )
