"""One inference interface over torch, onnxruntime and TensorRT backends."""

from fbclip_edge.runtime.base import Backend, BackendInfo, TorchBackend

__all__ = ["Backend", "BackendInfo", "TorchBackend"]
