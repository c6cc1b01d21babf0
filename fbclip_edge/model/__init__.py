"""Pure-torch FB-CLIP: configs, backbone wrapper, heads, losses. No file I/O here."""

from fbclip_edge.model.backbone import TINY_BACKBONE, backbone_config, build_clip
from fbclip_edge.model.config import BackboneConfig, FBCLIPConfig
from fbclip_edge.model.fbclip import FBCLIP, FBCLIPIntermediates, FBCLIPOutput

__all__ = [
    "FBCLIP",
    "TINY_BACKBONE",
    "BackboneConfig",
    "FBCLIPConfig",
    "FBCLIPIntermediates",
    "FBCLIPOutput",
    "backbone_config",
    "build_clip",
]
