"""Declarative config of AnomalyCLIP (docs/anomalyclip-spec.md sections 3-6).

Rules for backbones other than the reference's ViT-L/14@336px (24 vision blocks, 12 text
blocks), applied by `default_settings` when a setting is not given:
- feature layers: the paper's 6, 12, 18, 24 scaled to the depth (round(k * Lv / 24)).
- V-V blocks: the reference runs the V-V path in the last `dpam_layer - 1` blocks, i.e. blocks
  Lv - dpam_layer + 2 .. Lv (6..24 with dpam_layer 20). Elsewhere the path starts at the
  first default feature layer, block round(Lv / 4), as block 6 does for 24 blocks: so
  dpam_layer = Lv - round(Lv / 4) + 2 (11 for 12 blocks: V-V in blocks 3..12).
- compound-prompt depth: 9 (text blocks 2..9), capped at the text depth.
Setting them explicitly is always allowed within the ranges `validate` names.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from fbclip_edge.clip.config import BackboneConfig
from fbclip_edge.errors import FBClipError
from fbclip_edge.methods.base import config_kwargs

REFERENCE_VISION_LAYERS = 24
REFERENCE_FEATURE_LAYERS = (6, 12, 18, 24)
REFERENCE_DPAM_LAYER = 20
REFERENCE_DEPTH = 9


def default_feature_layers(num_layers: int) -> tuple[int, ...]:
    """The paper's layers 6, 12, 18, 24 for 24 blocks, scaled to other depths."""
    scaled = {
        max(1, round(k * num_layers / REFERENCE_VISION_LAYERS)) for k in REFERENCE_FEATURE_LAYERS
    }
    return tuple(sorted(scaled))


def default_dpam_layer(num_layers: int) -> int:
    """20 for 24 blocks (V-V in 6..24); else the V-V path starts at block round(Lv / 4)."""
    if num_layers == REFERENCE_VISION_LAYERS:
        return REFERENCE_DPAM_LAYER
    first = default_feature_layers(num_layers)[0]
    return num_layers - first + 2


def default_settings(backbone: BackboneConfig) -> dict[str, Any]:
    """Depth-dependent defaults for a backbone (the reference values on ViT-L/14@336px)."""
    return {
        "dpam_layer": default_dpam_layer(backbone.vision_layers),
        "depth": min(REFERENCE_DEPTH, int(backbone.text["layers"])),
    }


@dataclass(frozen=True)
class AnomalyCLIPConfig:
    """Architecture plus every AnomalyCLIP setting; defaults are the published recipe.

    feature_layers are 1-based vision blocks whose V-V tokens feed the maps; only those from
    position feature_map_start on enter the maps (the reference's feature_map_layer[0]).
    """

    backbone: BackboneConfig
    image_size: int = 518
    feature_layers: tuple[int, ...] = ()
    feature_map_start: int = 0
    n_ctx: int = 12
    depth: int = REFERENCE_DEPTH
    t_n_ctx: int = 4
    dpam_layer: int = REFERENCE_DPAM_LAYER
    temperature: float = 0.07
    class_name: str = "object"
    normal_template: str = "{}."
    abnormal_template: str = "damaged {}."

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
    def map_layers(self) -> tuple[int, ...]:
        """The feature layers whose maps are summed (from feature_map_start on)."""
        return self.feature_layers[self.feature_map_start :]

    @property
    def num_maps(self) -> int:
        """One map per selected feature layer."""
        return len(self.map_layers)

    @property
    def vv_start(self) -> int:
        """First (1-based) block of the V-V path; vv_start > Lv means no V-V path."""
        return self.backbone.vision_layers - self.dpam_layer + 2

    @property
    def templates(self) -> tuple[str, str]:
        """(normal, abnormal) prompt templates, '{}' standing for the class name."""
        return (self.normal_template, self.abnormal_template)

    def validate(self) -> None:
        """Reject settings the model cannot run, with the fix in the message."""
        self._validate_vision()
        self._validate_text()
        if self.temperature <= 0:
            raise FBClipError(f"temperature must be > 0, got {self.temperature}; use 0.07")

    def _validate_vision(self) -> None:
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
                f"1..{layers} for {self.backbone.name}; e.g. {list(default_feature_layers(layers))}"
            )
        if not 0 <= self.feature_map_start < len(self.feature_layers):
            raise FBClipError(
                f"feature_map_start {self.feature_map_start} must index the feature layers "
                f"{list(self.feature_layers)}: use 0..{len(self.feature_layers) - 1}"
            )
        if not 1 <= self.dpam_layer <= layers + 1:
            raise FBClipError(
                f"dpam_layer {self.dpam_layer} puts the V-V path in the last "
                f"{self.dpam_layer - 1} blocks, but {self.backbone.name} has {layers}; use "
                f"1..{layers + 1} (default {default_dpam_layer(layers)}: V-V in blocks "
                f"{layers - default_dpam_layer(layers) + 2}..{layers})"
            )

    def _validate_text(self) -> None:
        text_layers = int(self.backbone.text["layers"])
        if self.n_ctx < 1:
            raise FBClipError(f"n_ctx must be >= 1, got {self.n_ctx}; the reference uses 12")
        if not 1 <= self.depth <= text_layers:
            raise FBClipError(
                f"depth {self.depth} puts compound prompts in text blocks 2..{self.depth}, but "
                f"{self.backbone.name} has {text_layers} text blocks; use depth 1..{text_layers}"
            )
        if self.depth > 1 and not 1 <= self.t_n_ctx <= self.n_ctx:
            raise FBClipError(
                f"t_n_ctx {self.t_n_ctx} must be within 1..n_ctx ({self.n_ctx}): the compound "
                "prompts overwrite context positions; the reference uses 4"
            )
        for template in self.templates:
            if "{}" not in template:
                raise FBClipError(
                    f"prompt template {template!r} has no '{{}}' for the class name; "
                    "e.g. '{}.' and 'damaged {}.'"
                )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnomalyCLIPConfig:
        """Inverse of to_dict; unknown keys are an error so typos do not pass silently."""
        return cls(**config_kwargs(cls, data, ""))
