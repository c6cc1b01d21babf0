"""Analytic forward-pass FLOPs per image, split into backbone and FB-CLIP heads.

Counted as 2 FLOPs per multiply-accumulate of every matrix product (convolutions,
linear layers, attention scores and mixing, the SEM view's group sums, background
suppression, projection, scoring), the convention of torch.utils.flop_counter; elementwise
work (norms, softmax, the SPA view's pooling) is memory-bound and left out. The benchmark
uses this for achieved TFLOP/s.
"""

from __future__ import annotations

from fbclip_edge.methods.base import FlopCount
from fbclip_edge.methods.fbclip.config import FBCLIPConfig


def _attention_flops(tokens: int, width: int, inner: int, qkv_width: int) -> int:
    """q/k/v projections, scores, mixing and output projection of one attention layer."""
    projections = 2 * tokens * width * 3 * qkv_width
    scores_and_mix = 2 * 2 * tokens * tokens * inner
    output = 2 * tokens * inner * width
    return projections + scores_and_mix + output


def backbone_flops(config: FBCLIPConfig, image_size: int | None = None) -> int:
    """Patch embedding plus the transformer blocks up to the last feature layer."""
    size = image_size or config.image_size
    patch = config.backbone.patch_size
    width = config.backbone.vision_width
    mlp_ratio = float(config.backbone.vision.get("mlp_ratio", 4.0))
    patches = (size // patch) ** 2
    tokens = patches + 1
    embed = 2 * patches * (3 * patch * patch) * width
    block = _attention_flops(tokens, width, width, width) + 2 * 2 * tokens * width * int(
        width * mlp_ratio
    )
    return embed + max(config.feature_layers) * block


def head_flops(config: FBCLIPConfig, image_size: int | None = None) -> int:
    """SEM view, the shared FB attention on every view, suppression, projection, scoring."""
    size = image_size or config.image_size
    width = config.backbone.vision_width
    embed = config.backbone.embed_dim
    patches = (size // config.backbone.patch_size) ** 2
    tokens = patches + 1
    layers = len(config.feature_layers)
    inner = config.fb_heads * config.fb_dim_head
    # Two group sums (2 x N by N x Dv) and their mix into every token (N x 2 by 2 x Dv).
    sem = layers * 2 * (2 * 2 * patches * width)
    gate = 2 * tokens * width * (width // 2) + 2 * tokens * (width // 2)
    fb_block = gate + 2 * _attention_flops(tokens, width, inner, inner)
    similarity = 2 * tokens * width  # every token against the unit background prototype
    projection = 2 * tokens * width * embed
    scoring = 2 * tokens * embed * 2
    prototype = 2 * width * embed  # the background prototype, projected once
    return sem + prototype + config.num_maps * (fb_block + similarity + projection + scoring)


def forward_flops(config: FBCLIPConfig, image_size: int | None = None) -> FlopCount:
    """FLOPs per image at `image_size` (default: the config's)."""
    return FlopCount(backbone_flops(config, image_size), head_flops(config, image_size))
