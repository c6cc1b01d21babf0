"""ONNX graphs of FB-CLIP: vision (pixels -> token maps) and full (pixels -> scores), checked.

Exported with the TorchScript exporter at opset 17: it traces the SPA shift loop and SDPA
in seconds (the dynamo exporter takes minutes here) and emits LayerNorm as one
LayerNormalization node, which TensorRT keeps in FP32 as a single fused layer.
"""

from __future__ import annotations

import shutil
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from onnx import TensorProto
from torch import nn

from fbclip_edge.artifacts.manifest import GraphSpec, TensorSpec
from fbclip_edge.artifacts.options import GraphRole, Precision
from fbclip_edge.errors import FBClipError
from fbclip_edge.export.mixed_precision import to_mixed_precision
from fbclip_edge.methods import AnomalyModel

OPSET = 17
INPUT_NAME = "pixel_values"
OUTPUT_NAMES: dict[GraphRole, tuple[str, ...]] = {
    GraphRole.VISION: ("maps",),
    GraphRole.FULL: ("image_score", "patch_map"),
}
# protobuf cannot serialize a message over 2 GiB; stay clear of it.
_INLINE_LIMIT = 1_800_000_000

# ONNX operators TensorRT 10's ONNX parser supports (onnx-tensorrt docs/operators.md); a graph
# using anything else fails at engine build, so export checks against this list first.
TENSORRT_ONNX_OPS = frozenset(
    """Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool
    BatchNormalization Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv
    ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal
    Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm
    GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GroupNormalization
    HardSigmoid HardSwish Hardmax Identity If InstanceNormalization IsInf IsNaN
    LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LpNormalization LpPool
    MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonZero Not OneHot
    Or Pad Pow PRelu QuantizeLinear Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
    ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu
    Reshape Resize Round Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin
    Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
    ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Where Xor""".split()
)

_DTYPES: dict[int, str] = {
    TensorProto.FLOAT: "float32",
    TensorProto.FLOAT16: "float16",
    TensorProto.INT64: "int64",
    TensorProto.INT32: "int32",
    TensorProto.BOOL: "bool",
}


class VisionGraph(nn.Module):
    """pixel_values (B, 3, S, S) -> maps (B, M, T, D): the fused kernels score these."""

    def __init__(self, model: AnomalyModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The model's own encode_maps, so the graph cannot drift from the reference."""
        return self.model.encode_maps(pixel_values)


class ScoreGraph(nn.Module):
    """maps -> image_score (B,), patch_map (B, 1, g, g), text features and map weights frozen
    in as constants; appended to the vision graph to make the full graph."""

    def __init__(self, model: AnomalyModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's score with the torch ops (a Triton call cannot be traced)."""
        output = self.model.score(maps, impl="torch")
        return output.image_score, output.patch_map


@dataclass(frozen=True)
class GraphCheck:
    """What the checker and shape inference found: interface and operator histogram."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    ops: Counter[str]


def graph_file(role: GraphRole, precision: Precision) -> str:
    """vision.onnx, full.onnx, vision.fp16.onnx, ..."""
    suffix = "" if precision == Precision.FP32 else f".{precision.value}"
    return f"{role.value}{suffix}.onnx"


def _prune(model: onnx.ModelProto) -> None:
    """Drop initializers and Constant nodes nothing reads (left over by conversions)."""
    graph = model.graph
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [node for node in graph.node if node.op_type != "Constant" or node.output[0] in used]
    del graph.node[:]
    graph.node.extend(keep)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    initializers = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(initializers)


def save_graph(model: onnx.ModelProto, path: Path) -> list[str]:
    """Save one file, or the graph plus one `<file>.data` when over protobuf's 2 GiB limit.

    Returns the external data file names (empty when inline).
    """
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    if weights < _INLINE_LIMIT:
        onnx.save_model(model, str(path))
        return []
    data_name = f"{path.name}.data"
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_name,
        size_threshold=1024,
    )
    return [data_name]


def _tensor_specs(values: list[onnx.ValueInfoProto]) -> list[TensorSpec]:
    specs = []
    for value in values:
        tensor = value.type.tensor_type
        shape: list[int | str] = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        specs.append(
            TensorSpec(value.name, shape, _DTYPES.get(tensor.elem_type, str(tensor.elem_type)))
        )
    return specs


def check_graph(path: Path) -> GraphCheck:
    """ONNX checker (full, with strict shape inference) plus an explicit inference pass whose
    output shapes must agree with the declared ones; a failure is an exporter bug."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path), load_external_data=False)
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        first = str(error).strip().splitlines()[0]
        raise FBClipError(
            f"{path.name} fails the ONNX checker ({first}); please report this "
            "with the model's config.json"
        ) from None
    declared = _tensor_specs(list(model.graph.output))
    found = _tensor_specs(list(inferred.graph.output))
    for want, got in zip(declared, found, strict=True):
        if len(want.shape) != len(got.shape) or any(
            isinstance(a, int) and isinstance(b, int) and a and b and a != b
            for a, b in zip(want.shape, got.shape, strict=True)
        ):
            raise FBClipError(
                f"{path.name}: inferred shape of {want.name} {got.shape} != "
                f"declared {want.shape}; please report this"
            )
    ops = Counter(node.op_type for node in model.graph.node)
    return GraphCheck(_tensor_specs(list(model.graph.input)), declared, ops)


def unsupported_by_tensorrt(ops: Counter[str] | list[str]) -> list[str]:
    """Operator types TensorRT's ONNX parser would reject."""
    return sorted(set(ops) - TENSORRT_ONNX_OPS)


def _trace(
    module: nn.Module,
    example: torch.Tensor,
    inputs: tuple[str, ...],
    outputs: tuple[str, ...],
    path: Path,
) -> onnx.ModelProto:
    """TorchScript export with a dynamic batch axis (traced at batch 2 so nothing specializes
    on 1); tracer warnings about sizes are silenced: image size and token counts are fixed
    per export. nn.MultiheadAttention's fused fast path (taken in eval mode when the head
    count is even, e.g. ViT-L) has no ONNX form, so it is off while tracing. Returns the
    loaded model, external data included."""
    scratch = path.parent / f".trace-{path.stem}"
    scratch.mkdir()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example,),
                str(scratch / path.name),
                dynamo=False,
                opset_version=OPSET,
                input_names=list(inputs),
                output_names=list(outputs),
                dynamic_axes={name: {0: "batch"} for name in (*inputs, *outputs)},
                do_constant_folding=True,
            )
        return onnx.load(str(scratch / path.name))
    except torch.onnx.errors.OnnxExporterError as error:
        raise FBClipError(
            f"ONNX export of {path.name} failed ({type(error).__name__}: "
            f"{str(error).splitlines()[0]}); please report this with the model's config.json"
        ) from None
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        shutil.rmtree(scratch, ignore_errors=True)


def output_shapes(model: AnomalyModel, role: GraphRole) -> list[list[int | str]]:
    """Declared output shapes: the exporter leaves most dims symbolic, we know them."""
    cfg = model.config
    if role == GraphRole.VISION:
        return [["batch", cfg.num_maps, cfg.grid_size**2 + 1, cfg.backbone.embed_dim]]
    return [["batch"], ["batch", 1, cfg.grid_size, cfg.grid_size]]


def _declare(values: list[onnx.ValueInfoProto], shapes: list[list[int | str]]) -> None:
    for value, shape in zip(values, shapes, strict=True):
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for size in shape:
            dim = dims.add()
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = size


def _finish(
    proto: onnx.ModelProto, model: AnomalyModel, role: GraphRole, folder: Path
) -> GraphSpec:
    """Prune, declare output shapes, save (external data over 2 GB) and check."""
    _prune(proto)
    _declare(list(proto.graph.output), output_shapes(model, role))
    name = graph_file(role, Precision.FP32)
    data_files = save_graph(proto, folder / name)
    check = check_graph(folder / name)
    return GraphSpec(
        role, Precision.FP32, name, check.inputs, check.outputs, sorted(check.ops), data_files
    )


def export_graphs(model: AnomalyModel, folder: Path) -> tuple[GraphSpec, GraphSpec]:
    """vision.onnx, then full.onnx = vision + the traced scoring ops: one trace of the
    backbone (the slow part), and the full graph cannot differ from the vision graph."""
    model = model.eval()
    cfg = model.config
    size = cfg.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    vision_names = (INPUT_NAME, *OUTPUT_NAMES[GraphRole.VISION])
    vision = _trace(
        VisionGraph(model).eval(),
        pixels,
        vision_names[:1],
        vision_names[1:],
        folder / graph_file(GraphRole.VISION, Precision.FP32),
    )
    maps = torch.randn(2, cfg.num_maps, cfg.grid_size**2 + 1, cfg.backbone.embed_dim)
    score = _trace(
        ScoreGraph(model).eval(),
        maps,
        ("maps",),
        OUTPUT_NAMES[GraphRole.FULL],
        folder / "score.onnx",
    )
    score = onnx.compose.add_prefix(score, "score/", rename_inputs=False, rename_outputs=False)
    # merged before the vision graph is saved: saving with external data moves its weights
    # out of the proto, and a merge after that would point full.onnx at vision.onnx.data
    full = onnx.compose.merge_models(vision, score, io_map=[("maps", "maps")])
    vision_spec = _finish(vision, model, GraphRole.VISION, folder)
    return vision_spec, _finish(full, model, GraphRole.FULL, folder)


def export_mixed_precision(fp32: GraphSpec, folder: Path) -> GraphSpec:
    """The FP16 graph TensorRT builds strongly typed: see mixed_precision.py for the rules."""
    proto = onnx.load(str(folder / fp32.file))
    mixed = to_mixed_precision(proto)
    _prune(mixed)
    name = graph_file(fp32.role, Precision.FP16)
    data_files = save_graph(mixed, folder / name)
    check = check_graph(folder / name)
    return GraphSpec(
        fp32.role, Precision.FP16, name, check.inputs, check.outputs, sorted(check.ops), data_files
    )
