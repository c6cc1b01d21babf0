"""One inference interface over torch, onnxruntime, TensorRT and OpenVINO backends.

`fbclip_edge.runtime.open(artifacts, backend="auto")` opens an export folder as a Backend;
`open_frames` opens the artifacts of a method that takes frames and categories (FiLo).
"""

from fbclip_edge.runtime.base import (
    Backend,
    BackendInfo,
    Box,
    FrameBackend,
    FrameResult,
    MapScorer,
    TorchBackend,
)
from fbclip_edge.runtime.open import (
    open,  # noqa: A004 - the runtime's public entry point
    open_frames,
)

__all__ = [
    "Backend",
    "BackendInfo",
    "Box",
    "FrameBackend",
    "FrameResult",
    "MapScorer",
    "TorchBackend",
    "open",
    "open_frames",
]
