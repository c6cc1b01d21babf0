"""fbclip-edge: FB-CLIP zero-shot anomaly detection from PyTorch to fast deployment.

Public API: `load`, `create_model`, `import_official`, `preprocess`, `anomaly_map`, `FBCLIP`,
`Detector`; `fbclip_edge.runtime.open` for exported artifacts; `fbclip_edge.metrics`.
"""

from fbclip_edge.checkpoint import import_official, load, save_model
from fbclip_edge.detector import Detection, Detector
from fbclip_edge.errors import FBClipError
from fbclip_edge.factory import create_model
from fbclip_edge.model import FBCLIP, FBCLIPConfig, FBCLIPOutput
from fbclip_edge.postprocess import anomaly_map
from fbclip_edge.preprocess import preprocess

__version__ = "0.1.0"

__all__ = [
    "Detection",
    "Detector",
    "FBCLIP",
    "FBCLIPConfig",
    "FBCLIPOutput",
    "FBClipError",
    "anomaly_map",
    "create_model",
    "import_official",
    "load",
    "preprocess",
    "save_model",
]
