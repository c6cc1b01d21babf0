"""The frozen CLIP backbone every method builds on: architecture configs and the wrapper."""

from fbclip_edge.clip.backbone import TINY_BACKBONE, backbone_config, build_clip
from fbclip_edge.clip.config import BackboneConfig

__all__ = ["TINY_BACKBONE", "BackboneConfig", "backbone_config", "build_clip"]
