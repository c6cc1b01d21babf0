"""The TensorRT environment shared by the engine builder (export) and the engine runtime:
is TensorRT really there, which GPU generation, and a logger that keeps errors.

Typing: `tensorrt` is imported inside the functions (the package must import without it)
and annotated with its real classes, so mypy checks every call against tensorrt-stubs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, cast

import torch

from fbclip_edge.errors import FBClipError

if TYPE_CHECKING:
    import tensorrt as trt

    class ErrorLogger(trt.ILogger):
        """What make_logger returns: a TensorRT logger that keeps the errors it was sent."""

        errors: list[str]


INSTALL_HINT = "install fbclip-edge[trt] on a machine with an NVIDIA GPU"


def import_tensorrt() -> None:
    """Check that tensorrt imports and a GPU is there, or raise a one-line error saying how to
    get them; callers then `import tensorrt as trt` (typed by tensorrt-stubs)."""
    try:
        module = importlib.import_module("tensorrt")
    except ImportError as error:
        raise FBClipError(f"TensorRT is not available ({error}); {INSTALL_HINT}") from None
    if getattr(module, "__file__", None) is None:
        # tensorrt-stubs alone leaves an empty `tensorrt` namespace package: types, no library.
        raise FBClipError(f"TensorRT is not available (only its type stubs are); {INSTALL_HINT}")
    if not torch.cuda.is_available():
        raise FBClipError(f"TensorRT needs a CUDA GPU and torch sees none; {INSTALL_HINT}")


def compute_capability(device: torch.device | int | None = None) -> str:
    """'8.9', '9.0', ...: engines only run on the compute capability they were built for."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


def make_logger() -> ErrorLogger:
    """A TensorRT logger that keeps errors, so failures can be reported in one line."""
    import tensorrt as trt

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg.strip())

    return cast("ErrorLogger", _Logger())  # the class needs tensorrt, so mypy knows it by name
