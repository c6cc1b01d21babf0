"""FB-CLIP (CVPR 2026): frozen CLIP plus learned foreground/background heads. Pure torch."""

from fbclip_edge.methods.fbclip.config import FBCLIPConfig
from fbclip_edge.methods.fbclip.fbclip import FBCLIP, FBCLIPIntermediates, FBCLIPOutput

__all__ = ["FBCLIP", "FBCLIPConfig", "FBCLIPIntermediates", "FBCLIPOutput"]
