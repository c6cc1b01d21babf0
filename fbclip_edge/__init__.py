"""fbclip-edge: zero-shot anomaly detection (FB-CLIP, AnomalyCLIP) from PyTorch to fast
deployment.

Public API: `load`, `create_model`, `import_official`, `preprocess`, `anomaly_map`,
`AnomalyModel` (every method's model), `FBCLIP`, `Detector`; `fbclip_edge.methods` for the
registry; `fbclip_edge.runtime.open` for exported artifacts; `fbclip_edge.metrics`.
"""

from fbclip_edge.checkpoint import import_official, load, save_model
from fbclip_edge.errors import FBClipError
from fbclip_edge.factory import create_model
from fbclip_edge.line.detector import Detection, Detector
from fbclip_edge.methods import AnomalyModel, ModelOutput
from fbclip_edge.methods.fbclip import FBCLIP, FBCLIPConfig, FBCLIPOutput
from fbclip_edge.postprocess import anomaly_map
from fbclip_edge.preprocess import preprocess
from fbclip_edge.version import __version__

__all__ = [
    "AnomalyModel",
    "Detection",
    "Detector",
    "FBCLIP",
    "FBCLIPConfig",
    "FBCLIPOutput",
    "FBClipError",
    "ModelOutput",
    "__version__",
    "anomaly_map",
    "create_model",
    "import_official",
    "load",
    "preprocess",
    "save_model",
]
