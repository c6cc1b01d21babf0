"""Analytic forward-pass FLOPs per image: plain CLIP vision tower vs AnomalyCLIP's additions.

Counted as 2 FLOPs per multiply-accumulate of every matrix product (the convention of
torch.utils.flop_counter); norms, softmax and elementwise work are left out. `backbone`
is CLIP's own vision tower (patch embedding and all blocks: the global feature needs the
last one). `heads` is what AnomalyCLIP adds: the V-V attention (scores, mixing and
out_proj; it reuses the block's v projection) in the dual-path blocks up to the last
selected layer, ln_post + proj of each map's patch tokens, the global projection and the
scoring of every map row against the two text vectors. The text side is frozen: excluded.
"""

from __future__ import annotations

from fbclip_edge.methods.anomalyclip.config import AnomalyCLIPConfig
from fbclip_edge.methods.base import FlopCount


def _tokens(config: AnomalyCLIPConfig, image_size: int | None) -> tuple[int, int]:
    """(patches N, tokens T = N + 1) at this input size."""
    size = image_size or config.image_size
    patches = (size // config.backbone.patch_size) ** 2
    return patches, patches + 1


def _attention_core(tokens: int, width: int) -> int:
    """Scores q k^T and mixing A v over all heads: 2 * 2 * T^2 * Dv."""
    return 2 * 2 * tokens * tokens * width


def backbone_flops(config: AnomalyCLIPConfig, image_size: int | None = None) -> int:
    """Patch embedding plus every CLIP block (qkv, attention, out_proj, MLP)."""
    patches, tokens = _tokens(config, image_size)
    patch = config.backbone.patch_size
    width = config.backbone.vision_width
    mlp_width = int(width * float(config.backbone.vision.get("mlp_ratio", 4.0)))
    embed = 2 * patches * (3 * patch * patch) * width
    attention = (
        2 * tokens * width * 3 * width + _attention_core(tokens, width) + 2 * tokens * width * width
    )
    mlp = 2 * 2 * tokens * width * mlp_width
    return embed + config.backbone.vision_layers * (attention + mlp)


def vv_blocks(config: AnomalyCLIPConfig) -> int:
    """Dual-path blocks that run: vv_start .. the last selected feature layer."""
    return max(0, max(config.map_layers) - config.vv_start + 1)


def head_flops(config: AnomalyCLIPConfig, image_size: int | None = None) -> int:
    """V-V attentions, per-map ln_post + proj of the patches, global proj, scoring."""
    patches, tokens = _tokens(config, image_size)
    width = config.backbone.vision_width
    dim = config.backbone.embed_dim
    vv = vv_blocks(config) * (_attention_core(tokens, width) + 2 * tokens * width * width)
    projection = config.num_maps * 2 * patches * width * dim
    global_projection = 2 * width * dim
    scoring = config.num_maps * 2 * tokens * dim * 2
    return vv + projection + global_projection + scoring


def forward_flops(config: AnomalyCLIPConfig, image_size: int | None = None) -> FlopCount:
    """FLOPs per image at `image_size` (default: the config's)."""
    return FlopCount(backbone_flops(config, image_size), head_flops(config, image_size))
