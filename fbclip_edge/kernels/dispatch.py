"""Pick Triton or torch for the fused kernels, once per device type, and say why.

Triton is imported lazily, on the first CUDA (or impl='triton') call. TRITON_INTERPRET is read
when a @triton.jit function is defined, triton.language's own helpers included, so it only
works when set before anything imports triton.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Literal

import torch

from fbclip_edge.errors import FBClipError

Impl = Literal["auto", "triton", "torch"]
Chosen = Literal["triton", "torch"]
IMPLS: tuple[str, ...] = ("auto", "triton", "torch")

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendInfo:
    """What impl='auto' runs on one device type, and the reason, for logs and bench reports."""

    device: str
    impl: Chosen
    reason: str
    triton_version: str | None
    triton_mode: str  # compiled | interpreted | mixed | unavailable | not imported

    def as_dict(self) -> dict[str, object]:
        """Plain dict for JSON reports."""
        return asdict(self)


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


def kernel_mode() -> str:
    """'compiled', 'interpreted', 'mixed' (TRITON_INTERPRET set after triton was imported:
    unusable) or 'unavailable'; fixed when the kernels are first imported."""
    score, amap, _ = _load_triton()
    if score is None or amap is None:
        return "unavailable"
    return score.MODE if score.MODE == amap.MODE else "mixed"


def kernels_interpreted() -> bool:
    """True when the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 from the start)."""
    return kernel_mode() == "interpreted"


_MIXED = (
    "TRITON_INTERPRET was set after triton was imported, so Triton can run neither compiled "
    "nor interpreted"
)
_REASONS = {
    "interpreted": "TRITON_INTERPRET=1: Triton would run in the slow CPU interpreter",
    "mixed": _MIXED,
}


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
            "not imported",
        )
    else:
        score, _, why = _load_triton()
        mode = kernel_mode()
        if score is None:
            info = BackendInfo(device_type, "torch", why, None, mode)
        elif mode == "compiled":
            version = score.TRITON_VERSION
            reason = f"CUDA device and Triton {version} imports"
            info = BackendInfo(device_type, "triton", reason, version, mode)
        else:
            info = BackendInfo(device_type, "torch", _REASONS[mode], score.TRITON_VERSION, mode)
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
        torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()
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
    mode = kernel_mode()
    if mode == "mixed":
        raise FBClipError(f"impl='triton': {_MIXED}; set it before anything imports triton")
    if device.type == "cpu" and mode != "interpreted":
        raise FBClipError(
            "impl='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "in the environment before anything imports triton"
        )
    if device.type not in ("cpu", "cuda"):
        raise FBClipError(f"impl='triton' runs on CUDA (or CPU when interpreted), not {device}")
    return "triton"


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will record an op on these tensors."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
