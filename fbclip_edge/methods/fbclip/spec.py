"""FB-CLIP's entry in the method registry."""

from __future__ import annotations

from typing import Any

from fbclip_edge.clip.config import BackboneConfig
from fbclip_edge.methods.base import MethodSpec, TrainRecipe
from fbclip_edge.methods.fbclip.config import FBCLIPConfig
from fbclip_edge.methods.fbclip.fbclip import FBCLIP
from fbclip_edge.methods.fbclip.flops import forward_flops
from fbclip_edge.methods.fbclip.importer import import_official, looks_like


def new_config(
    backbone: BackboneConfig,
    image_size: int = 518,
    feature_layers: tuple[int, ...] | None = None,
    **settings: Any,
) -> FBCLIPConfig:
    """FBCLIPConfig with the paper's defaults for anything not given."""
    return FBCLIPConfig(
        backbone=backbone,
        image_size=image_size,
        feature_layers=tuple(feature_layers or ()),
        **settings,
    )


SPEC = MethodSpec(
    name="fbclip",
    title="FB-CLIP (CVPR 2026)",
    model_cls=FBCLIP,
    config_from_dict=FBCLIPConfig.from_dict,
    new_config=new_config,
    import_official=import_official,
    looks_like=looks_like,
    flops=forward_flops,
    # spec section 7: Adam lr 5e-5, betas (0.5, 0.999), batch 4, 3 epochs, seed 42, 518 px
    recipe=TrainRecipe(lr=5e-5, betas=(0.5, 0.999), batch_size=4, epochs=3, seed=42),
    import_hint=(
        "fbclip-edge import-official --method fbclip --clip-weights ViT-L-14-336px.pt "
        "--checkpoint FBCLIP.pth --out DIR"
    ),
)
