"""FP32 ONNX -> mixed FP16/FP32 ONNX with autocast rules, for strongly typed TensorRT builds.

Matrix products run in FP16; LayerNorm, Softmax, reductions, square roots, clamps and the
scoring einsum run in FP32; every other op runs at the widest type among its inputs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Heavy ops: FP16 is where the speed comes from, and FP32 accumulation happens inside.
FP16_OPS = frozenset({"MatMul", "Gemm", "Conv"})
# Range- or accumulation-sensitive ops: always FP32 (eps values like 1e-8 underflow in FP16).
FP32_OPS = frozenset(
    {
        "LayerNormalization",
        "Softmax",
        "LogSoftmax",
        "ReduceL1",
        "ReduceL2",
        "ReduceMax",
        "ReduceMean",
        "ReduceMin",
        "ReduceProd",
        "ReduceSum",
        "ReduceSumSquare",
        "ReduceLogSumExp",
        "Sqrt",
        "Pow",
        "Exp",
        "Log",
        "Clip",
        "Max",
        "Min",
        "Einsum",
        "Resize",
        "CumSum",
        "Reciprocal",
    }
)
# Ops whose float inputs are read, not computed on, or that fix their own output type.
_TYPE_AGNOSTIC = frozenset({"Shape", "Size", "Cast", "ConstantOfShape", "Constant"})
# Largest constant (in elements) whose values decide its consumer's precision.
_SMALL_CONSTANT = 64
_FP16_MIN_NORMAL = 6.104e-05
_FP16_MAX = 65504.0

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16


def _fits_fp16(values: np.ndarray) -> bool:
    """Whether an eps-like constant survives FP16: no overflow, no nonzero value flushed."""
    magnitude = np.abs(values[np.isfinite(values)])
    nonzero = magnitude[magnitude > 0]
    return bool(np.all(magnitude <= _FP16_MAX) and np.all(nonzero >= _FP16_MIN_NORMAL))


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor, inferred on a weightless copy (initializers become typed
    inputs) so graphs over protobuf's 2 GiB limit work too."""
    graph = model.graph
    weights = [
        helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
        for init in graph.initializer
    ]
    skeleton = helper.make_model(
        helper.make_graph(list(graph.node), graph.name, [*graph.input, *weights], graph.output),
        opset_imports=model.opset_import,
        ir_version=model.ir_version,
    )
    inferred = onnx.shape_inference.infer_shapes(skeleton).graph
    return {
        value.name: value.type.tensor_type.elem_type
        for value in [*inferred.input, *inferred.value_info, *inferred.output]
    }


class _Converter:
    """One pass in topological order: decide each node's type, insert the casts it needs."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.types = _element_types(model)
        self.constants: dict[str, np.ndarray] = {}
        for init in model.graph.initializer:
            self.types[init.name] = init.data_type
            if init.data_type == FLOAT:
                self.constants[init.name] = numpy_helper.to_array(init)
        for node in model.graph.node:
            attrs = node.attribute
            if node.op_type == "Constant" and len(attrs) == 1 and attrs[0].name == "value":
                tensor = node.attribute[0].t
                self.types[node.output[0]] = tensor.data_type
                if tensor.data_type == FLOAT:
                    self.constants[node.output[0]] = numpy_helper.to_array(tensor)
        self.model = model
        self.half: set[str] = set()  # float tensors that now hold FP16
        self.casts: dict[tuple[str, int], str] = {}
        self.half_constants: dict[str, str] = {}
        self.new_nodes: list[onnx.NodeProto] = []
        self.new_initializers: list[onnx.TensorProto] = []

    def is_float(self, name: str) -> bool:
        """Whether the tensor was float32 in the source graph (the only type converted)."""
        return bool(name) and self.types.get(name) == FLOAT

    def _cast(self, name: str, to: int) -> str:
        """Name of `name` cast to `to`; one Cast node per tensor and type, shared by users."""
        key = (name, to)
        if key not in self.casts:
            out = f"{name}__to_{'fp16' if to == HALF else 'fp32'}"
            self.new_nodes.append(
                helper.make_node("Cast", [name], [out], to=to, name=f"{out}_cast")
            )
            self.casts[key] = out
        return self.casts[key]

    def _half_constant(self, name: str) -> str:
        """An FP16 copy of a constant, so weights are stored once, in the type they are used."""
        if name not in self.half_constants:
            out = f"{name}__fp16"
            self.new_initializers.append(
                numpy_helper.from_array(self.constants[name].astype(np.float16), out)
            )
            self.half_constants[name] = out
        return self.half_constants[name]

    def _compute_type(self, node: onnx.NodeProto, inputs: list[str]) -> int:
        """Autocast's rule: listed ops fixed, others FP16 only when every computed input is."""
        if node.op_type in FP32_OPS:
            return FLOAT
        if node.op_type in FP16_OPS:
            return HALF
        computed = [n for n in inputs if n not in self.constants]
        if not computed or any(n not in self.half for n in computed):
            return FLOAT  # constant folding, or an FP32 operand: stay wide
        small = [self.constants[n] for n in inputs if n in self.constants]
        if any(c.size <= _SMALL_CONSTANT and not _fits_fp16(c) for c in small):
            return FLOAT
        return HALF

    def convert_node(self, node: onnx.NodeProto) -> None:
        """Rewrite one node's float inputs to its compute type and record its outputs' type."""
        if node.op_type in _TYPE_AGNOSTIC:
            self.new_nodes.append(node)
            return
        if node.op_type == "CastLike":  # output type is the second input's, whatever it is now
            self.new_nodes.append(node)
            if node.input[1] in self.half:
                self.half.update(n for n in node.output if self.is_float(n))
            return
        inputs = [n for n in node.input if self.is_float(n)]
        if not inputs:
            self.new_nodes.append(node)
            return
        target = self._compute_type(node, inputs)
        for index, name in enumerate(node.input):
            if not self.is_float(name):
                continue
            if target == HALF:
                if name in self.constants:
                    replacement = self._half_constant(name)
                else:
                    replacement = name if name in self.half else self._cast(name, HALF)
            else:
                replacement = self._cast(name, FLOAT) if name in self.half else name
            node.input[index] = replacement
        self.new_nodes.append(node)
        if target == HALF:
            self.half.update(n for n in node.output if self.is_float(n))

    def run(self) -> onnx.ModelProto:
        """Convert every node, keep graph outputs float32, drop stale value_info."""
        graph = self.model.graph
        for node in list(graph.node):
            self.convert_node(node)
        outputs = {o.name for o in graph.output}
        renames = {name: f"{name}__fp16" for name in outputs if name in self.half}
        for node in self.new_nodes:
            for index, name in enumerate(node.output):
                if name in renames:
                    node.output[index] = renames[name]
            for index, name in enumerate(node.input):
                if name in renames:
                    node.input[index] = renames[name]
        for name, half_name in renames.items():
            self.new_nodes.append(
                helper.make_node("Cast", [half_name], [name], to=FLOAT, name=f"{name}_out_cast")
            )
        del graph.node[:]
        graph.node.extend(self.new_nodes)  # casts sit just before their first user
        graph.initializer.extend(self.new_initializers)
        del graph.value_info[:]
        onnx.helper.set_model_props(self.model, {"fbclip_edge.precision": "fp16-mixed"})
        return self.model


def to_mixed_precision(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of `model` with FP16 compute and FP32 inputs, outputs and sensitive ops."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return _Converter(copy).run()
