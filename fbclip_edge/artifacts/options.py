"""Export settings as types: precision, scoring mode, targets, batch profile and tolerances."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from fbclip_edge.errors import FBClipError


class Precision(str, Enum):
    """Compute precision of the export; ONNX graphs are always exported in float32 too.

    fp16: a mixed-precision graph (and engine) for GPUs. bf16 and int8 are CPU precisions:
    int8 adds a statically quantized QDQ graph (`vision.int8.onnx`); bf16 adds no graph,
    since onnxruntime's CPU provider has no bf16 MatMul/Gemm kernels: OpenVINO runs the
    float32 graph with INFERENCE_PRECISION_HINT=bf16 (its own bf16 conversion, measured
    1.35x its float32 on a Xeon with AMX), and the manifest's precision says to do so.
    """

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"

    @property
    def cpu_only(self) -> bool:
        """bf16 and int8 run on the CPU runtimes (onnxruntime CPU, OpenVINO), not TensorRT."""
        return self in (Precision.BF16, Precision.INT8)


class Scoring(str, Enum):
    """Where the maps are scored: the fused kernels after the vision graph, or inside the graph."""

    KERNEL = "kernel"
    GRAPH = "graph"


class Target(str, Enum):
    """What export builds besides the always-written float32 ONNX graphs."""

    ONNX = "onnx"
    TRT = "trt"
    TRITON = "triton"  # a Triton Inference Server model repository


class GraphRole(str, Enum):
    """vision: pixels -> 15 projected token maps; full: pixels -> image score and patch map.

    FiLo's split export (its text depends on the image) adds text (prompt embeddings -> text
    features), score (head features, text, conditioning -> score and map) and grounding
    (Grounding DINO); its vision graph gives the conditioning vector and head features.
    """

    VISION = "vision"
    FULL = "full"
    TEXT = "text"
    SCORE = "score"
    GROUNDING = "grounding"


def _choice(kind: type[Enum], value: object, option: str) -> Enum:
    """Enum member from its value, or a one-line error listing the choices."""
    if isinstance(value, kind):
        return value
    try:
        return kind(str(value).strip().lower())
    except ValueError:
        choices = "|".join(str(member.value) for member in kind)
        raise FBClipError(f"{option} must be {choices}, not {value!r}") from None


def parse_precision(value: str | Precision) -> Precision:
    """'fp16' | 'fp32' | 'bf16' | 'int8' -> Precision."""
    return _choice(Precision, value, "--precision")  # type: ignore[return-value]


def parse_scoring(value: str | Scoring) -> Scoring:
    """'kernel' | 'graph' -> Scoring."""
    return _choice(Scoring, value, "--scoring")  # type: ignore[return-value]


def tensorrt_installed() -> bool:
    """The tensorrt library is importable. tensorrt-stubs alone (installed to type-check) leaves
    an empty `tensorrt` namespace package that find_spec finds too: it has no origin."""
    import importlib.util

    spec = importlib.util.find_spec("tensorrt")
    return spec is not None and spec.origin is not None


def tensorrt_usable() -> bool:
    """TensorRT imports and a CUDA device is present (what an engine build needs)."""
    import torch

    return tensorrt_installed() and torch.cuda.is_available()


def parse_targets(value: str | Iterable[str | Target]) -> tuple[Target, ...]:
    """'onnx,trt' (or an iterable) -> ordered, de-duplicated targets.

    'auto' means onnx, plus trt where TensorRT and a GPU are present.
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    if any(str(item).strip().lower() == "auto" for item in items):
        automatic = ["onnx", "trt"] if tensorrt_usable() else ["onnx"]
        items = automatic + [i for i in items if str(i).strip().lower() != "auto"]
    targets: list[Target] = []
    for item in items:
        if str(getattr(item, "value", item)).strip():
            target = _choice(Target, item, "--targets")
            if target not in targets:
                targets.append(target)  # type: ignore[arg-type]
    if not targets:
        raise FBClipError("--targets is empty; use auto, onnx, trt, triton or a list like onnx,trt")
    return tuple(targets)


@dataclass(frozen=True)
class BatchProfile:
    """Batch sizes an engine accepts (min..max) and the one it is tuned for (opt)."""

    min: int = 1
    opt: int = 8
    max: int = 32

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise FBClipError(
                f"batch profile {self} needs 1 <= min <= opt <= max; write it as MIN:OPT:MAX, "
                "e.g. 1:8:32"
            )

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"

    @classmethod
    def parse(cls, text: str | BatchProfile) -> BatchProfile:
        """'1:8:32' (min:opt:max) or 'N' (exactly N) -> BatchProfile."""
        if isinstance(text, BatchProfile):
            return text
        parts = str(text).split(":")
        try:
            numbers = [int(part) for part in parts]
        except ValueError:
            raise FBClipError(
                f"--batch '{text}' must be MIN:OPT:MAX integers, e.g. 1:8:32"
            ) from None
        if len(numbers) == 1:
            numbers = numbers * 3
        if len(numbers) != 3:
            raise FBClipError(f"--batch '{text}' must be MIN:OPT:MAX, e.g. 1:8:32")
        return cls(*numbers)

    def check(self, batch: int, what: str = "these artifacts") -> None:
        """Refuse a batch outside min..max: TensorRT cannot run it, and the profile is the
        contract every backend of an artifacts folder keeps."""
        if not self.min <= batch <= self.max:
            raise FBClipError(
                f"batch {batch} is outside the profile {self.min}..{self.max} of {what}; split "
                f"the batch, or re-export with --batch {self.min}:{self.opt}:{max(batch, self.max)}"
            )

    def as_dict(self) -> dict[str, int]:
        """JSON-ready dict."""
        return {"min": self.min, "opt": self.opt, "max": self.max}


@dataclass(frozen=True)
class Tolerance:
    """Largest accepted max-abs difference to the float32 PyTorch model."""

    score: float
    map: float


# bf16 and int8 keep the starting point, score 1e-2 and map 2e-2. Measured (max abs
# on the 6 synthetic parity frames): the FB-CLIP fixture at 112 px reaches 4e-4 / 5e-4 in
# bf16 (OpenVINO) and 1e-3 / 1.4e-3 in int8 (onnxruntime and OpenVINO); AnomalyCLIP's
# random-weight tiny model at 56 px, whose 4x4-patch maps move most, 2e-3 / 8e-3 in bf16 and
# 3e-3 / 1e-2 in int8 (3e-2 when calibrated on 2 plates only: calibrate on several good
# frames). See tests/test_cpu_precisions.py.
DEFAULT_TOLERANCES: dict[Precision, Tolerance] = {
    Precision.FP32: Tolerance(score=1e-4, map=1e-4),
    Precision.FP16: Tolerance(score=5e-3, map=1e-2),
    Precision.BF16: Tolerance(score=1e-2, map=2e-2),
    Precision.INT8: Tolerance(score=1e-2, map=2e-2),
}
