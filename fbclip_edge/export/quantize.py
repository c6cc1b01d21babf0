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

Calibration is a loop of our own (`calibrate_minmax`), not onnxruntime's calibrator. Both
run the graph with a ReduceMin and a ReduceMax on every MatMul/Gemm input and output, one
frame per run, and keep two numbers per tensor per frame, but onnxruntime's session runs
those reductions in its default node order, late, so nearly every activation of the frame is
alive at once: ViT-B-16 @ 512 took 12.4 GB to calibrate (one frame run alone: 5.3 GB against
0.9 GB without the reductions), and ViT-L @ 518 was OOM-killed at 24 GB. Ours places each
reduction right after the node that makes its tensor and runs in priority order, which takes
them as soon as they are ready (2.9 GB there), and merges a running min and max per tensor
after each frame. The ranges are onnxruntime MinMax's to the bit (tests/test_calibration.py)
and reach `quantize_static` as its calibration cache.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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


Progress = Callable[[str, int, int], None]
# Suffixes of the reductions' outputs in the augmented graph (onnxruntime's names).
MIN_SUFFIX, MAX_SUFFIX = "_ReduceMin", "_ReduceMax"
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


@dataclass(frozen=True)
class Reduction:
    """A calibrated tensor and the augmented graph's outputs holding its min and max."""

    tensor: str
    lowest: str
    highest: str


def calibrated_tensors(model: onnx.ModelProto, op_types: Sequence[str]) -> list[str]:
    """The tensors onnxruntime's MinMax calibrator measures (its select_tensors_to_calibrate):
    float inputs and outputs of `op_types` nodes with a known type, weights excepted; in
    graph order, so the augmented graph is the same from run to run. `model` must have been
    through shape inference."""
    graph = model.graph
    types = {info.name: info.type for info in graph.value_info}
    types.update({info.name: info.type for info in graph.output})
    types.update({info.name: info.type for info in graph.input})
    weights = {init.name for init in graph.initializer}
    chosen: dict[str, None] = {}
    for node in graph.node:
        if op_types and node.op_type not in op_types:
            continue
        for name in (*node.input, *node.output):
            kind = types.get(name)
            if (
                kind is not None
                and kind.HasField("tensor_type")
                and kind.tensor_type.elem_type in _FLOAT_TYPES
                and name not in weights
            ):
                chosen[name] = None
    return list(chosen)


def _reduce(tensor: str, op_type: str, suffix: str) -> tuple[onnx.NodeProto, str]:
    """One full reduction of `tensor` (keepdims: a dim of 0 cannot be dropped)."""
    output = tensor + suffix
    return onnx.helper.make_node(op_type, [tensor], [output], name=output, keepdims=1), output


def augment_for_ranges(model: onnx.ModelProto, tensors: Sequence[str]) -> list[Reduction]:
    """Add a ReduceMin and a ReduceMax of each tensor as graph outputs, each pair placed right
    after the node that makes the tensor (graph inputs: first). With the session's priority
    order (ties go to the lower node index) they run as soon as the tensor exists, so it is
    freed after its last real consumer; onnxruntime's default order runs them late and holds
    the whole frame's activations."""
    graph = model.graph
    types = {info.name: info.type for info in (*graph.value_info, *graph.output, *graph.input)}
    pending = set(tensors)
    reductions: list[Reduction] = []

    def reductions_of(names: Sequence[str]) -> list[onnx.NodeProto]:
        nodes = []
        for name in names:
            if name not in pending:
                continue
            pending.discard(name)
            low_node, low = _reduce(name, "ReduceMin", MIN_SUFFIX)
            high_node, high = _reduce(name, "ReduceMax", MAX_SUFFIX)
            nodes += [low_node, high_node]
            reductions.append(Reduction(name, low, high))
            elem_type = types[name].tensor_type.elem_type
            for output in (low, high):
                graph.output.append(onnx.helper.make_tensor_value_info(output, elem_type, None))
        return nodes

    ordered = reductions_of([info.name for info in graph.input])
    for node in graph.node:
        ordered += [node, *reductions_of(list(node.output))]
    if pending:
        raise FBClipError(
            f"cannot calibrate {sorted(pending)[0]!r}: no node makes it; please report this "
            "with the model's config.json"
        )
    del graph.node[:]
    graph.node.extend(ordered)
    return reductions


class RunningRanges:
    """Per tensor, the running min and max over the frames seen so far: all that calibration
    keeps between frames, so memory does not grow with the number of frames. Merged with
    fmin/fmax, the NaN-skipping min and max that onnxruntime's nanmin/nanmax over all frames
    reduce to, so the result is the same to the bit."""

    def __init__(self) -> None:
        self.lowest: dict[str, np.ndarray] = {}
        self.highest: dict[str, np.ndarray] = {}
        self.frames = 0

    def update(self, lowest: dict[str, np.ndarray], highest: dict[str, np.ndarray]) -> None:
        """Merge one frame's per-tensor minima and maxima (1-element arrays)."""
        for store, new, merge in (
            (self.lowest, lowest, np.fmin),
            (self.highest, highest, np.fmax),
        ):
            for name, value in new.items():
                value = value.reshape(-1)
                store[name] = value if name not in store else merge(store[name], value)
        self.frames += 1

    @property
    def nbytes(self) -> int:
        """Bytes held for the ranges (constant in the number of frames)."""
        return sum(a.nbytes for store in (self.lowest, self.highest) for a in store.values())

    def tensors_data(self, method: Any, symmetric: bool = False) -> Any:
        """onnxruntime's TensorsData of the ranges; symmetric as its CalibTensorRangeSymmetric
        (-m, m with m the larger magnitude)."""
        from onnxruntime.quantization import TensorsData

        pairs = {}
        for name, low in self.lowest.items():
            high = self.highest[name]
            if symmetric:
                magnitude = np.nanmax([np.abs(low), np.abs(high)], axis=0)
                low, high = -magnitude, magnitude
            pairs[name] = (low, high)
        return TensorsData(method, pairs)


def _session(path: Path) -> Any:
    """An onnxruntime CPU session on the augmented graph: no graph optimizations (onnxruntime's
    calibrator runs none, so the numbers are the same) and priority order (see
    augment_for_ranges)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.execution_order = onnxruntime.ExecutionOrder.PRIORITY_BASED
    return onnxruntime.InferenceSession(
        str(path), sess_options=options, providers=["CPUExecutionProvider"]
    )


def calibrate_minmax(
    model_path: Path,
    frames: torch.Tensor | np.ndarray,
    op_types: Sequence[str] = QUANTIZED_OPS,
    *,
    input_name: str = INPUT_NAME,
    symmetric: bool = False,
    progress: Progress | None = None,
) -> Any:
    """onnxruntime's MinMax ranges (a TensorsData) of the tensors its calibrator would
    measure in `model_path`, from `frames` run one at a time (as its calibrator is fed), with
    memory for one frame's activations. The augmented graph is written beside `model_path`
    (it reads the same external data files, no copy of the weights) and removed after.
    `progress(description, frames done, frames)` after each frame."""
    quantization = _import_quantization()
    if len(frames) == 0:
        raise FBClipError("no calibration frames for --precision int8; pass some good images")
    handle, name = tempfile.mkstemp(prefix=".augmented-", suffix=".onnx", dir=model_path.parent)
    os.close(handle)
    augmented = Path(name)
    try:
        # Shape inference from file to file, as onnxruntime's calibrator does: one copy of
        # inline weights in memory, and external ones are not read at all.
        onnx.shape_inference.infer_shapes_path(str(model_path), str(augmented))
        model = onnx.load(str(augmented), load_external_data=False)
        reductions = augment_for_ranges(model, calibrated_tensors(model, op_types))
        onnx.save_model(model, str(augmented))
        del model
        session = _session(augmented)
        fetch = [name for r in reductions for name in (r.lowest, r.highest)]
        ranges = RunningRanges()
        total = len(frames)
        for index in range(total):
            frame = frames[index : index + 1]
            feed = frame.float().cpu().numpy() if isinstance(frame, torch.Tensor) else frame
            values = dict(zip(fetch, session.run(fetch, {input_name: feed}), strict=True))
            ranges.update(
                {r.tensor: values[r.lowest] for r in reductions},
                {r.tensor: values[r.highest] for r in reductions},
            )
            if progress is not None:
                progress(f"int8 calibration: frame {index + 1} of {total}", index + 1, total)
        del session
    finally:
        augmented.unlink(missing_ok=True)
    return ranges.tensors_data(quantization.CalibrationMethod.MinMax, symmetric)


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


def static_options(quantization: ModuleType, nodes: list[str], external: bool) -> dict:
    """quantize_static's settings (but the ranges): QDQ, weights int8 per output channel,
    activations uint8 per tensor from MinMax ranges, only the `nodes` products."""
    return {
        "quant_format": quantization.QuantFormat.QDQ,
        "op_types_to_quantize": list(QUANTIZED_OPS),
        "nodes_to_quantize": nodes,
        "per_channel": True,
        "reduce_range": False,
        "activation_type": quantization.QuantType.QUInt8,
        "weight_type": quantization.QuantType.QInt8,
        "use_external_data_format": external,
        "calibrate_method": quantization.CalibrationMethod.MinMax,
        # float outputs: the products' results feed float32 ops (bias, residual, norms).
        "extra_options": {"OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS)},
    }


def quantize_int8(
    fp32: GraphSpec, folder: Path, pixels: torch.Tensor, progress: Progress | None = None
) -> GraphSpec:
    """Write `<role>.int8.onnx` beside `fp32` (calibrated on `pixels`, preprocessed good
    frames) and return its spec; `progress` hears of each calibration frame."""
    if pixels.shape[0] == 0:
        raise FBClipError("no calibration frames for --precision int8; pass some good images")
    quantization = _import_quantization()
    model = onnx.load(str(folder / fp32.file))
    nodes = weight_nodes(model)
    name = graph_file(fp32.role, Precision.INT8)
    external = bool(fp32.data_files)
    with _quiet(), tempfile.TemporaryDirectory(prefix=".calibrate-", dir=folder) as scratch:
        source, quantized = Path(scratch) / "named.onnx", Path(scratch) / name
        cache = Path(scratch) / "ranges.json"
        onnx.save_model(
            model,
            str(source),
            save_as_external_data=external,
            location="named.onnx.data" if external else None,
        )
        del model
        ranges = calibrate_minmax(source, pixels, QUANTIZED_OPS, progress=progress)
        # quantize_static's calibration cache is how onnxruntime takes ranges computed
        # elsewhere: with the file present it runs no calibrator of its own.
        quantization.save_tensors_data(ranges, cache)
        del ranges
        quantization.quantize_static(
            str(source),
            str(quantized),
            None,
            calibration_cache_path=str(cache),
            **static_options(quantization, nodes, external),
        )
        result = onnx.load(str(quantized))
        keep_float_elsewhere(result, set(nodes))
        data_files = save_graph(result, folder / name)
        del result
    check = check_graph(folder / name)
    return GraphSpec(
        fp32.role, Precision.INT8, name, check.inputs, check.outputs, sorted(check.ops), data_files
    )
