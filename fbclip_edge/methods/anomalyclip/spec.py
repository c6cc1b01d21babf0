"""AnomalyCLIP's entry in the method registry."""

from __future__ import annotations

from typing import Any

from fbclip_edge.clip.config import BackboneConfig
from fbclip_edge.methods.anomalyclip.config import AnomalyCLIPConfig, default_settings
from fbclip_edge.methods.anomalyclip.flops import forward_flops
from fbclip_edge.methods.anomalyclip.importer import import_official, looks_like
from fbclip_edge.methods.anomalyclip.model import AnomalyCLIP
from fbclip_edge.methods.base import MethodSpec, TrainRecipe


def new_config(
    backbone: BackboneConfig,
    image_size: int = 518,
    feature_layers: tuple[int, ...] | None = None,
    **settings: Any,
) -> AnomalyCLIPConfig:
    """AnomalyCLIPConfig with the paper's defaults, scaled to the backbone's depth
    (config.py), for anything not given."""
    return AnomalyCLIPConfig(
        backbone=backbone,
        image_size=image_size,
        feature_layers=tuple(feature_layers or ()),
        **{**default_settings(backbone), **settings},
    )


SPEC = MethodSpec(
    name="anomalyclip",
    title="AnomalyCLIP (ICLR 2024)",
    model_cls=AnomalyCLIP,
    config_from_dict=AnomalyCLIPConfig.from_dict,
    new_config=new_config,
    import_official=import_official,
    looks_like=looks_like,
    flops=forward_flops,
    # spec section 8: Adam lr 1e-3, betas (0.5, 0.999), batch 8, 15 epochs, seed 111, 518 px
    recipe=TrainRecipe(lr=1e-3, betas=(0.5, 0.999), batch_size=8, epochs=15, seed=111),
    import_hint=(
        "fbclip-edge import-official --method anomalyclip --clip-weights ViT-L-14-336px.pt "
        "--checkpoint epoch_15.pth --out DIR --feature-layers 24"
    ),
)
