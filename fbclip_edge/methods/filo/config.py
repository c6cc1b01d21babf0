"""Declarative config of FiLo (docs/filo-spec.md sections 2-9).

Every width comes from the backbone (Dv vision, Dt text, D joint); nothing assumes ViT-L/14.
Rules for backbones other than the reference's 24-block tower:
- feature layers: the paper's 6, 12, 18, 24 scaled to the depth (round(k * Lv / 24)).
- V-V blocks: the reference hard-codes its surgery on the last Lv - 6 blocks (7..Lv); for other
  depths the path starts after the first default feature layer, as it does for 24 blocks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from fbclip_edge.clip.config import BackboneConfig
from fbclip_edge.errors import FBClipError
from fbclip_edge.methods.base import config_kwargs

REFERENCE_VISION_LAYERS = 24
REFERENCE_FEATURE_LAYERS = (6, 12, 18, 24)
#: The reference applies its V-V surgery to blocks 7..Lv (`range(1, layers + 1 - 6)`).
REFERENCE_VV_START = 7


def default_feature_layers(num_layers: int) -> tuple[int, ...]:
    """The paper's layers 6, 12, 18, 24 for 24 blocks, scaled to other depths."""
    scaled = {
        max(1, round(k * num_layers / REFERENCE_VISION_LAYERS)) for k in REFERENCE_FEATURE_LAYERS
    }
    return tuple(sorted(scaled))


def default_vv_start(num_layers: int) -> int:
    """7 for 24 blocks; otherwise the block after the first default feature layer."""
    if num_layers == REFERENCE_VISION_LAYERS:
        return REFERENCE_VV_START
    return min(num_layers, default_feature_layers(num_layers)[0] + 1)


@dataclass(frozen=True)
class FiLoConfig:
    """Architecture plus every FiLo setting; defaults are the published test/train programs.

    `backbone` is CLIP's pretrained architecture (its positional embedding is resized to
    image_size once, at load). `quick_gelu` is False on purpose: the reference builds both
    towers with the exact GELU although the OpenAI weights were trained with QuickGELU.
    """

    backbone: BackboneConfig
    image_size: int = 518
    feature_layers: tuple[int, ...] = ()
    vv_start: int = 0  # 0: default_vv_start(Lv)
    n_ctx: int = 12
    meta_reduction: int = 16  # meta-net D -> D / 16 -> Dt
    adapter_reduction: int = 2  # adapter D -> D / 2 -> D
    quick_gelu: bool = False
    logit_scale: float = 100.0
    adapter_temperature: float = 0.07
    blur_sigma: float = 4.0
    box_threshold: float = 0.25
    # [ref quirk] test.py passes the box threshold as the text threshold: both 0.25.
    text_threshold: float = 0.25
    area_threshold: float = 0.7
    outside_box_factor: float = 0.7

    def __post_init__(self) -> None:
        if not self.feature_layers:
            object.__setattr__(
                self, "feature_layers", default_feature_layers(self.backbone.vision_layers)
            )
        object.__setattr__(self, "feature_layers", tuple(int(k) for k in self.feature_layers))
        if not self.vv_start:
            object.__setattr__(self, "vv_start", default_vv_start(self.backbone.vision_layers))
        self.validate()

    @property
    def grid_size(self) -> int:
        """Patches per side g = image_size / patch_size."""
        return self.image_size // self.backbone.patch_size

    @property
    def num_patches(self) -> int:
        """N = g * g patch tokens (the CLS token excluded)."""
        return self.grid_size**2

    @property
    def vision_width(self) -> int:
        """Dv: width of the vision tower and of the seven token tensors."""
        return self.backbone.vision_width

    @property
    def text_width(self) -> int:
        """Dt: width of the text tower and of the learned contexts."""
        return self.backbone.text_width

    @property
    def embed_dim(self) -> int:
        """D: the joint embedding width (head outputs, text features, adapter)."""
        return self.backbone.embed_dim

    @property
    def entry_layers(self) -> tuple[tuple[int, str], ...]:
        """The reference's `features_list` entries in order, as (layer, kind) (spec 2.3).

        A layer before the V-V path gives one entry, a layer on it two (V-V first). Kinds, with
        the reference's in-place updates applied: 'plain' X_k (k < vv_start - 1); 'vv' the final
        V-V state V_L (k = vv_start - 1, and the first entry of every later layer); 'original'
        X_k plus block k+1's attention output (X_L for the last block).
        """
        entries: list[tuple[int, str]] = []
        for layer in self.feature_layers:
            if layer < self.vv_start - 1:
                entries.append((layer, "plain"))
            elif layer == self.vv_start - 1:
                entries.append((layer, "vv"))
            else:
                entries += [(layer, "vv"), (layer, "original")]
        return tuple(entries)

    @property
    def num_linear(self) -> int:
        """Linear heads: the entries at even positions (4 by default)."""
        return (len(self.entry_layers) + 1) // 2

    @property
    def num_mmci(self) -> int:
        """MMCI heads: the entries at odd positions (3 by default)."""
        return len(self.entry_layers) // 2

    @property
    def num_maps(self) -> int:
        """One map per head: linear ones first, then the MMCI ones."""
        return self.num_linear + self.num_mmci

    def validate(self) -> None:
        """Reject settings the model cannot run, with the fix in the message."""
        patch = self.backbone.patch_size
        if self.image_size <= 0 or self.image_size % patch:
            raise FBClipError(
                f"image size {self.image_size} is not a multiple of the patch size {patch}; "
                f"use e.g. {max(patch, round(self.image_size / patch) * patch)}"
            )
        self._validate_layers()
        for name in ("n_ctx", "meta_reduction", "adapter_reduction"):
            if int(getattr(self, name)) < 1:
                raise FBClipError(f"{name} must be >= 1, got {getattr(self, name)}")
        if (
            self.embed_dim // self.meta_reduction < 1
            or self.embed_dim // self.adapter_reduction < 1
        ):
            raise FBClipError(
                f"embed dim {self.embed_dim} is too small for meta_reduction "
                f"{self.meta_reduction} / adapter_reduction {self.adapter_reduction}; lower them"
            )
        if self.logit_scale <= 0 or self.adapter_temperature <= 0 or self.blur_sigma <= 0:
            raise FBClipError("logit_scale, adapter_temperature and blur_sigma must be > 0")

    def _validate_layers(self) -> None:
        layers = self.backbone.vision_layers
        bad = [k for k in self.feature_layers if not 1 <= k <= layers]
        if bad or list(self.feature_layers) != sorted(set(self.feature_layers)):
            raise FBClipError(
                f"feature layers {list(self.feature_layers)} must be increasing and within "
                f"1..{layers} for {self.backbone.name}; e.g. {list(default_feature_layers(layers))}"
            )
        if not 2 <= self.vv_start <= layers:
            raise FBClipError(
                f"vv_start {self.vv_start} must be within 2..{layers} (the V-V path runs in "
                f"blocks vv_start..{layers}); the reference uses {default_vv_start(layers)}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FiLoConfig:
        """Inverse of to_dict; unknown keys are an error so typos do not pass silently."""
        return cls(**config_kwargs(cls, data, "FiLo "))
