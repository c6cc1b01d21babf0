"""Build new models of any method on CLIP weights from any of the three sources."""

from __future__ import annotations

from pathlib import Path

import torch

from fbclip_edge.clip.weights import (
    clip_from_file,
    clip_from_pretrained,
    clip_from_state_dict,
    load_clip,
    read_state_dict_file,
)
from fbclip_edge.methods import get_method
from fbclip_edge.methods.base import AnomalyModel

__all__ = [
    "clip_from_file",
    "clip_from_pretrained",
    "clip_from_state_dict",
    "create_model",
    "load_clip",
    "read_state_dict_file",
]


def create_model(
    backbone: str | None = "tiny",
    pretrained: str | None = None,
    clip_weights: str | Path | None = None,
    image_size: int = 518,
    feature_layers: tuple[int, ...] | None = None,
    seed: int | None = 0,
    method: str = "fbclip",
    **settings: object,
) -> AnomalyModel:
    """A new model of `method` (learned parts freshly initialised) in eval mode.

    With no weights given, CLIP is random too: fine for tests, export and benchmarks.
    """
    spec = get_method(method)
    if seed is not None:
        torch.manual_seed(seed)
    clip, backbone_cfg = load_clip(backbone, pretrained, clip_weights)
    config = spec.new_config(
        backbone_cfg, image_size=image_size, feature_layers=feature_layers, **settings
    )
    return spec.build(config, clip).eval()
