"""fbclip-edge: FB-CLIP zero-shot anomaly detection from PyTorch to fast deployment."""

__version__ = "0.1.0"
