"""The attention scores an exported graph holds, read from a real onnxruntime run.

Every attention in an exported graph is MatMul-Softmax-MatMul, so the Softmax outputs are
its score tensors: exposing them as graph outputs and running the graph once gives their
actual shapes (ONNX shape inference leaves many of them symbolic).
"""

from __future__ import annotations

from math import prod
from pathlib import Path

import numpy as np
import onnx


def softmax_shapes(path: Path, pixels: np.ndarray) -> list[tuple[int, ...]]:
    """Shape of every Softmax output of the graph at `path` for this input batch."""
    import onnxruntime as ort

    model = onnx.load(str(path))
    names = [node.output[0] for node in model.graph.node if node.op_type == "Softmax"]
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return [np.shape(out) for out in session.run(names, {"pixel_values": pixels})]


def square_scores(shapes: list[tuple[int, ...]], side: int) -> list[int]:
    """Leading size (batch x maps x heads) of every (..., side, side) score tensor."""
    return [prod(shape[:-2]) for shape in shapes if shape[-2:] == (side, side)]
