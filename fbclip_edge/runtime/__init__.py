"""One inference interface over torch, onnxruntime, TensorRT and OpenVINO backends.

`fbclip_edge.runtime.open(artifacts, backend="auto")` opens an export folder as a Backend.
"""

from fbclip_edge.runtime.base import Backend, BackendInfo, MapScorer, TorchBackend
from fbclip_edge.runtime.open import open  # noqa: A004 - the runtime's public entry point

__all__ = ["Backend", "BackendInfo", "MapScorer", "TorchBackend", "open"]
