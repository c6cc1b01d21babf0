"""The CLIP backbone architecture, shared by every method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BackboneConfig:
    """Everything needed to rebuild the CLIP module without open_clip's name registry.

    `vision` and `text` are open_clip CLIPVisionCfg / CLIPTextCfg fields, so any open_clip
    ViT (and the tiny test configs) builds from the same code path.
    """

    name: str
    embed_dim: int
    vision: dict[str, Any]
    text: dict[str, Any]
    quick_gelu: bool = True

    @property
    def patch_size(self) -> int:
        """Side of one square patch in pixels."""
        return int(self.vision["patch_size"])

    @property
    def vision_layers(self) -> int:
        """Number of transformer blocks in the vision tower."""
        return int(self.vision["layers"])

    @property
    def vision_width(self) -> int:
        """Residual width Dv of the vision tower."""
        return int(self.vision["width"])

    @property
    def text_width(self) -> int:
        """Residual width Dt of the text tower."""
        return int(self.text["width"])

    @property
    def pretrained_image_size(self) -> int:
        """Image side the positional embedding was trained for."""
        size = self.vision["image_size"]
        return int(size[0] if isinstance(size, (list, tuple)) else size)
