"""CLIP backbone: build it from a config, and read intermediate vision tokens at any size.

The vision wrapper returns the residual stream after chosen blocks (CLS first, before
ln_post) and resizes the positional embedding bilinearly to the input's patch grid.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP

from fbclip_edge.clip.config import BackboneConfig
from fbclip_edge.errors import FBClipError

if TYPE_CHECKING:
    from open_clip.transformer import VisionTransformer  # untyped: its attributes are Any

# The architecture of ../shared/fixtures/fbclip-reference-tiny: ViT-L/14@336 geometry with
# tiny widths, so tests exercise the real token counts and positional interpolation.
TINY_BACKBONE = BackboneConfig(
    name="tiny",
    embed_dim=768,
    vision={"image_size": 336, "layers": 24, "width": 64, "patch_size": 14, "head_width": 64},
    text={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
    quick_gelu=True,
)

BUILTIN_BACKBONES: dict[str, BackboneConfig] = {"tiny": TINY_BACKBONE}


def backbone_config(name: str, quick_gelu: bool | None = None) -> BackboneConfig:
    """Config for a built-in tiny name or any open_clip ViT model name."""
    if name in BUILTIN_BACKBONES:
        return BUILTIN_BACKBONES[name]
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        known = (
            ", ".join(sorted(BUILTIN_BACKBONES)) + ", ViT-B-16, ViT-B-32, ViT-L-14, ViT-L-14-336"
        )
        raise FBClipError(f"unknown backbone '{name}'; use one of {known} (any open_clip ViT)")
    vision = dict(cfg["vision_cfg"])
    if "timm_model_name" in vision or not isinstance(vision.get("layers"), int):
        raise FBClipError(f"backbone '{name}' is not a plain ViT CLIP; FB-CLIP needs a ViT tower")
    gelu = bool(cfg.get("quick_gelu", False)) if quick_gelu is None else quick_gelu
    return BackboneConfig(
        name=name,
        embed_dim=int(cfg["embed_dim"]),
        vision=vision,
        text=dict(cfg["text_cfg"]),
        quick_gelu=gelu,
    )


def build_clip(config: BackboneConfig) -> CLIP:
    """Random-weight float32 open_clip CLIP of this architecture (weights are loaded after)."""
    model = CLIP(
        config.embed_dim,
        vision_cfg=copy.deepcopy(config.vision),
        text_cfg=copy.deepcopy(config.text),
        quick_gelu=config.quick_gelu,
    )
    return model.float().eval()


def config_from_openai_state_dict(state_dict: dict[str, torch.Tensor], name: str) -> BackboneConfig:
    """Infer a ViT CLIP architecture from tensor shapes in OpenAI's state-dict layout."""
    required = [
        "visual.conv1.weight",
        "visual.positional_embedding",
        "text_projection",
        "positional_embedding",
        "token_embedding.weight",
        "ln_final.weight",
        "visual.proj",
    ]
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise FBClipError(
            f"'{name}' is not a ViT CLIP state dict in OpenAI layout (missing {missing}); "
            "pass OpenAI's .pt file or a state dict with visual.* / transformer.* keys"
        )
    conv = state_dict["visual.conv1.weight"]
    width, patch = int(conv.shape[0]), int(conv.shape[-1])
    grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vision_layers = len(
        {k.split(".")[3] for k in state_dict if k.startswith("visual.transformer.resblocks.")}
    )
    text_width = int(state_dict["ln_final.weight"].shape[0])
    text_layers = len(
        {k.split(".")[2] for k in state_dict if k.startswith("transformer.resblocks.")}
    )
    head_width = 64 if width >= 64 else width
    return BackboneConfig(
        name=name,
        embed_dim=int(state_dict["text_projection"].shape[1]),
        vision={
            "image_size": grid * patch,
            "layers": vision_layers,
            "width": width,
            "patch_size": patch,
            "head_width": head_width,
        },
        text={
            "context_length": int(state_dict["positional_embedding"].shape[0]),
            "vocab_size": int(state_dict["token_embedding.weight"].shape[0]),
            "width": text_width,
            "heads": max(1, text_width // 64),
            "layers": text_layers,
        },
        quick_gelu=True,
    )


def resize_positional_embedding(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of the patch part to grid x grid; CLS kept."""
    old = round((int(pos.shape[0]) - 1) ** 0.5)  # int(): a constant when traced for ONNX
    if old == grid:
        return pos
    patch = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=(grid, grid), mode="bilinear", align_corners=False)
    return torch.cat([pos[:1], patch.permute(0, 2, 3, 1).reshape(grid * grid, -1)], dim=0)


def check_pixels(pixel_values: torch.Tensor, patch: int) -> None:
    """Refuse input the ViT would silently crop or misread, naming the fix."""
    if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        raise FBClipError(
            f"pixel_values must be (B, 3, S, S), got {tuple(pixel_values.shape)}; "
            "use fbclip_edge.preprocess(frames, image_size)"
        )
    if not pixel_values.is_floating_point():
        raise FBClipError(
            f"pixel_values must be normalized floats, got {pixel_values.dtype}; "
            "use fbclip_edge.preprocess(frames, image_size)"
        )
    height, width = int(pixel_values.shape[2]), int(pixel_values.shape[3])
    if height != width or height % patch:
        raise FBClipError(
            f"image {height}x{width} must be square with a side that is a multiple of the "
            f"patch size {patch}; use fbclip_edge.preprocess(frames, image_size)"
        )


def encode_layers(
    visual: VisionTransformer, pixel_values: torch.Tensor, layers: tuple[int, ...]
) -> list[torch.Tensor]:
    """Run open_clip's ViT; return the (B, T, Dv) residual stream after each chosen block.

    Blocks past the last chosen layer are skipped.
    """
    check_pixels(pixel_values, int(visual.conv1.kernel_size[0]))
    x = visual.conv1(pixel_values.to(visual.conv1.weight.dtype))
    batch, width, grid = x.shape[0], x.shape[1], x.shape[-1]
    x = x.reshape(batch, width, grid * grid).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).expand(batch, 1, width)
    x = torch.cat([cls, x], dim=1)
    x = x + resize_positional_embedding(visual.positional_embedding, grid).to(x.dtype)
    x = visual.patch_dropout(x)
    x = visual.ln_pre(x)
    batch_first = getattr(visual.transformer, "batch_first", True)
    outputs: list[torch.Tensor] = []
    x = x if batch_first else x.transpose(0, 1)
    for index, block in enumerate(visual.transformer.resblocks[: max(layers)], start=1):
        x = block(x)
        if index in layers:
            outputs.append(x if batch_first else x.transpose(0, 1))
    return outputs


def describe(config: BackboneConfig) -> dict[str, Any]:
    """Short human-readable summary used by the CLI."""
    return {
        "name": config.name,
        "vision_width": config.vision_width,
        "vision_layers": config.vision_layers,
        "patch_size": config.patch_size,
        "text_width": config.text_width,
        "embed_dim": config.embed_dim,
    }
