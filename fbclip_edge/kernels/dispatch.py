"""Pick Triton or torch for the fused kernels, once per device type, and say why.

Triton is imported lazily so that TRITON_INTERPRET can still be set before the kernels are
decorated (the variable is read when a @triton.jit kernel is defined, not at each launch).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Literal

import torch

from fbclip_edge.errors import FBClipError

Impl = Literal["auto", "triton", "torch"]
Chosen = Literal["triton", "torch"]
IMPLS: tuple[str, ...] = ("auto", "triton", "torch")

_TRUE_WORDS = ("1", "true", "yes", "on", "y")
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendInfo:
    """What impl='auto' runs on one device type, and the reason, for logs and bench reports."""

    device: str
    impl: Chosen
    reason: str
    triton_version: str | None
    interpret: bool

    def as_dict(self) -> dict[str, object]:
        """Plain dict for JSON reports."""
        return asdict(self)


def interpret_requested() -> bool:
    """Whether TRITON_INTERPRET is set the way Triton itself reads it (1/true/yes/on)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE_WORDS


@functools.cache
def _load_triton() -> tuple[ModuleType | None, ModuleType | None, str]:
    """Import the Triton kernel modules once; (score, map, "") or (None, None, why not)."""
    if importlib.util.find_spec("triton") is None:
        return None, None, "triton is not installed (normal on CPU-only and Jetson installs)"
    try:
        from fbclip_edge.kernels import triton_map, triton_score
    except Exception as exc:  # any import failure means "use torch", with the cause
        return None, None, f"triton does not import ({type(exc).__name__}: {exc})"
    return triton_score, triton_map, ""


def triton_modules() -> tuple[ModuleType, ModuleType]:
    """The (score, map) Triton kernel modules, or FBClipError naming why Triton is unusable."""
    score, amap, why = _load_triton()
    if score is None or amap is None:
        raise FBClipError(f"impl='triton' is unavailable: {why}; use impl='torch' or 'auto'")
    return score, amap


def kernels_interpreted() -> bool:
    """True when the kernels were defined under TRITON_INTERPRET=1 (they then run on the CPU)."""
    score, _, _ = _load_triton()
    return bool(score is not None and score.INTERPRETED)


def _triton_version() -> str | None:
    score, _, _ = _load_triton()
    return None if score is None else score.TRITON_VERSION


@functools.cache
def _auto_choice(device_type: str) -> BackendInfo:
    """The auto choice for a device type, made once (the Triton import is cached too)."""
    if device_type != "cuda":
        info = BackendInfo(
            device_type,
            "torch",
            f"device is {device_type}: the Triton kernels are CUDA kernels "
            "(impl='triton' runs them in the interpreter only with TRITON_INTERPRET=1)",
            None,
            interpret_requested(),
        )
    else:
        score, _, why = _load_triton()
        if score is None:
            info = BackendInfo(device_type, "torch", why, None, interpret_requested())
        elif score.INTERPRETED:
            info = BackendInfo(
                device_type,
                "torch",
                "TRITON_INTERPRET=1 was set when the kernels were defined, so Triton would run "
                "in the slow CPU interpreter",
                score.TRITON_VERSION,
                True,
            )
        else:
            info = BackendInfo(
                device_type,
                "triton",
                f"CUDA device and Triton {score.TRITON_VERSION} imports",
                score.TRITON_VERSION,
                False,
            )
    _log.info("fbclip_edge.kernels: auto uses %s on %s (%s)", info.impl, info.device, info.reason)
    return info


def _device_type(device: torch.device | str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def backend_info(device: torch.device | str | None = None) -> BackendInfo:
    """What impl='auto' runs on device (default: CUDA when present, else CPU) and why."""
    return _auto_choice(_device_type(device))


def selected_impl(device: torch.device | str | None = None) -> Chosen:
    """The implementation impl='auto' runs for tensors on device, when no gradient is needed."""
    return backend_info(device).impl


def in_graph_capture() -> bool:
    """True while tracing / compiling / exporting: those need the torch ops, not a Triton call."""
    return bool(
        torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or torch.onnx.is_in_onnx_export()
    )


def resolve_impl(impl: str, device: torch.device, needs_grad: bool) -> Chosen:
    """Map impl ('auto' | 'triton' | 'torch') to the one that runs, or raise a one-line error.

    auto keeps torch whenever autograd or graph capture needs it; 'triton' on a CPU tensor
    needs kernels defined under TRITON_INTERPRET=1.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch"
    if impl == "auto":
        if needs_grad or in_graph_capture():
            return "torch"
        return selected_impl(device)
    if needs_grad:
        raise FBClipError(
            "impl='triton' has no backward pass; use impl='auto' or 'torch' when inputs "
            "require grad"
        )
    triton_modules()
    if device.type == "cpu" and not kernels_interpreted():
        raise FBClipError(
            "impl='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "in the environment before triton or fbclip_edge's Triton kernels are imported"
        )
    if device.type not in ("cpu", "cuda"):
        raise FBClipError(f"impl='triton' runs on CUDA (or CPU when interpreted), not {device}")
    return "triton"


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will record an op on these tensors."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
