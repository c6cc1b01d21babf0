"""Declarative config of the FB-CLIP heads (spec sections 1-6)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from fbclip_edge.clip.config import BackboneConfig
from fbclip_edge.errors import FBClipError
from fbclip_edge.methods.base import config_kwargs


def default_feature_layers(num_layers: int) -> tuple[int, ...]:
    """The paper's layers 1, 6, 12, 18, 24 for 24 blocks, scaled to other depths."""
    if num_layers == 24:
        return (1, 6, 12, 18, 24)
    scaled = sorted({1, *(max(1, round(k * num_layers / 24)) for k in (6, 12, 18, 24))})
    return tuple(scaled)


@dataclass(frozen=True)
class FBCLIPConfig:
    """Architecture plus every FB-CLIP setting; defaults are the published recipe."""

    backbone: BackboneConfig
    image_size: int = 518
    feature_layers: tuple[int, ...] = ()
    n_ctx: int = 12
    class_name: str = "object"
    normal_template: str = "{} without defect."
    abnormal_template: str = "{} with defect."
    # MSTFF fusion weights: global, attention-weighted, end-of-text.
    text_fusion: tuple[float, float, float] = (1.0, 0.5, 0.5)
    # Soft foreground mask: weights of saliency, center, cls_inc, change; box size; threshold.
    mask_weights: tuple[float, float, float, float] = (0.3, 0.3, 0.3, 0.1)
    mask_smooth: int = 5
    mask_threshold: float = 0.5
    mask_low: float = 0.5
    sem_mix: float = 0.6
    spa_kernel: int = 5
    fb_heads: int = 8
    fb_dim_head: int = 64
    bs_mean_weight: float = 0.5
    bs_mix: float = 0.5
    temperature: float = 0.07
    n_scale_weights: int = 6
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.feature_layers:
            object.__setattr__(
                self, "feature_layers", default_feature_layers(self.backbone.vision_layers)
            )
        object.__setattr__(self, "feature_layers", tuple(int(k) for k in self.feature_layers))
        self.validate()

    @property
    def grid_size(self) -> int:
        """Patches per side g = image_size / patch_size."""
        return self.image_size // self.backbone.patch_size

    @property
    def num_maps(self) -> int:
        """Three views (ID, SEM, SPA) per feature layer."""
        return 3 * len(self.feature_layers)

    def validate(self) -> None:
        """Reject settings the model cannot run, with the fix in the message."""
        patch = self.backbone.patch_size
        if self.image_size <= 0 or self.image_size % patch:
            raise FBClipError(
                f"image size {self.image_size} is not a multiple of the patch size {patch}; "
                f"use e.g. {max(patch, round(self.image_size / patch) * patch)}"
            )
        layers = self.backbone.vision_layers
        bad = [k for k in self.feature_layers if not 1 <= k <= layers]
        if bad or list(self.feature_layers) != sorted(set(self.feature_layers)):
            raise FBClipError(
                f"feature layers {list(self.feature_layers)} must be increasing and within "
                f"1..{layers} for {self.backbone.name}"
            )
        if len(self.feature_layers) > self.n_scale_weights:
            raise FBClipError(
                f"at most {self.n_scale_weights} feature layers are supported "
                f"(one scale weight each); got {len(self.feature_layers)}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FBCLIPConfig:
        """Inverse of to_dict; unknown keys are an error so typos do not pass silently."""
        return cls(**config_kwargs(cls, data, ""))
