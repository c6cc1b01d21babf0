"""Import the FiLo authors' checkpoints (spec 10.1), and write them back.

The file is `{"filo": state_dict}` of the reference's whole module: a full CLIP copy
(`clip_model.*`, positional embedding already resized; blocks 7..L with their attention under
the renamed `attn.qkv.*` / `attn.proj.*`, plus a stray `clip_model.visual.attn.*`), the text
encoder's duplicates (`text_encoder.*`) and the learned tensors. The CLIP copy makes OpenAI's
weights optional; when they are given they must agree with it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fbclip_edge.clip.backbone import backbone_config, config_from_openai_state_dict
from fbclip_edge.clip.config import BackboneConfig
from fbclip_edge.clip.weights import read_state_dict_file
from fbclip_edge.errors import FBClipError
from fbclip_edge.methods.filo.config import REFERENCE_VV_START, FiLoConfig
from fbclip_edge.methods.filo.model import FiLo
from fbclip_edge.statedict import check_state_dict, read_checkpoint_file

_LEARNED = (
    "normal_prompt_learner.",
    "abnormal_prompt_learner.",
    "adapter.",
    "decoder_linear.",
    "decoder_cov.",
)
_CLIP = "clip_model."
_TEXT_DUPLICATE = "text_encoder."
_STRAY_ATTENTION = "clip_model.visual.attn."
#: Attention parameter names: the reference's surgery module -> nn.MultiheadAttention.
_ATTENTION_NAMES = {
    "qkv.weight": "in_proj_weight",
    "qkv.bias": "in_proj_bias",
    "proj.weight": "out_proj.weight",
    "proj.bias": "out_proj.bias",
}
_SURGERY_KEY = re.compile(r"(visual\.transformer\.resblocks\.\d+\.attn\.)(qkv|proj)\.(weight|bias)")
_TEXT_KEYS = ("transformer.", "positional_embedding", "ln_final.", "text_projection")


def looks_like(checkpoint: Mapping[str, Any]) -> bool:
    """The published layout: {"filo": state_dict} with both prompt learners and the heads."""
    state = checkpoint.get("filo")
    if not isinstance(state, Mapping):
        return False
    keys = set(state)
    return {"normal_prompt_learner.ctx", "abnormal_prompt_learner.ctx"} <= keys and any(
        str(key).startswith("decoder_linear.") for key in keys
    )


def _other_method(checkpoint: Mapping[str, Any]) -> str:
    """' (it looks like a <method> checkpoint; ...)' when another registered method claims it."""
    from fbclip_edge.methods import identify_checkpoint  # lazy: the registry may import us

    method = identify_checkpoint(checkpoint)
    if method is None:
        return ""
    return f" (it is a {method} checkpoint: import it with --method {method})"


def split_checkpoint(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(CLIP in OpenAI layout, learned tensors under this package's names).

    Renamed V-V blocks go back to in_proj / out_proj; the stray visual.attn copy and the
    text_encoder duplicates are dropped; any other key is an error.
    """
    clip: dict[str, torch.Tensor] = {}
    learned: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        if key.startswith(_LEARNED):
            learned[key] = value.float()
        elif key.startswith(_STRAY_ATTENTION) or key.startswith(_TEXT_DUPLICATE):
            continue
        elif key.startswith(_CLIP):
            name = key.removeprefix(_CLIP)
            found = _SURGERY_KEY.fullmatch(name)
            if found:
                name = found.group(1) + _ATTENTION_NAMES[f"{found.group(2)}.{found.group(3)}"]
            clip[name] = value.float() if value.is_floating_point() else value
        else:
            unknown.append(key)
    if unknown:
        raise FBClipError(
            f"FiLo checkpoint has keys this importer does not know: {unknown[:8]}; "
            "is it a FiLo checkpoint ({'filo': state_dict} from train.py)?"
        )
    return clip, learned


def learned_settings(learned: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """n_ctx and the reductions, from the tensor shapes."""
    try:
        ctx = learned["normal_prompt_learner.ctx"]
        hidden, dim = learned["normal_prompt_learner.meta_net.linear1.weight"].shape
        bottleneck = learned["adapter.fc.0.weight"].shape[0]
    except KeyError as missing:
        raise FBClipError(f"FiLo checkpoint lacks {missing}; it is incomplete") from None
    return {
        "n_ctx": int(ctx.shape[0]),
        "meta_reduction": int(dim) // int(hidden),
        "adapter_reduction": int(dim) // int(bottleneck),
    }


def resize_positional_embedding(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Spec 2.1: the patch part resized to grid x grid, bicubic (a = -0.75, align_corners
    False, no antialias); the CLS row kept."""
    old = round((int(pos.shape[0]) - 1) ** 0.5)
    if old == grid:
        return pos
    patch = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], patch.permute(0, 2, 3, 1).reshape(grid * grid, -1)], dim=0)


def _backbone(
    clip_state: Mapping[str, torch.Tensor], backbone: BackboneConfig | str | None
) -> BackboneConfig:
    """The architecture: given, by open_clip name, or inferred from shapes (64-wide heads as
    OpenAI's models); widths and depths are checked against the weights."""
    inferred = config_from_openai_state_dict(dict(clip_state), "filo-checkpoint")
    if backbone is None:
        return dataclasses.replace(inferred, quick_gelu=False)  # FiLo runs the exact GELU
    chosen = backbone_config(backbone) if isinstance(backbone, str) else backbone
    for name in ("vision_width", "vision_layers", "patch_size", "text_width", "embed_dim"):
        if getattr(chosen, name) != getattr(inferred, name):
            raise FBClipError(
                f"backbone {chosen.name} has {name} {getattr(chosen, name)} but the weights have "
                f"{getattr(inferred, name)}; pass the backbone the checkpoint was trained with"
            )
    return chosen


def _clip_state(
    copy: dict[str, torch.Tensor], openai: dict[str, torch.Tensor] | None, grid: int, name: str
) -> dict[str, torch.Tensor]:
    """The checkpoint's CLIP copy, or OpenAI's weights resized to the grid; when both are
    there they must agree (the reference loads OpenAI's, then the copy over it)."""
    if openai is None:
        return copy
    openai = {k: v.float() if v.is_floating_point() else v for k, v in openai.items()}
    if "visual.positional_embedding" in openai:
        pos = openai["visual.positional_embedding"]
        openai["visual.positional_embedding"] = resize_positional_embedding(pos, grid)
    for key, value in copy.items():
        other = openai.get(key)
        if other is None or other.shape != value.shape or not torch.allclose(other, value):
            raise FBClipError(
                f"CLIP weights {name} do not match the checkpoint's CLIP copy (first "
                f"difference: {key}); pass the CLIP the checkpoint was trained with, or leave "
                "--clip-weights out to use the copy"
            )
    return {**openai, **copy}


def _image_size(copy: Mapping[str, torch.Tensor], patch: int, image_size: int | None) -> int:
    """The checkpoint's CLIP copy fixes the image size (its resized positional embedding)."""
    if "visual.positional_embedding" not in copy:
        return image_size or 518
    made_for = round((int(copy["visual.positional_embedding"].shape[0]) - 1) ** 0.5) * patch
    if image_size is not None and image_size != made_for:
        raise FBClipError(
            f"the checkpoint's CLIP copy was resized for {made_for} px images, not {image_size}; "
            f"use image_size {made_for}"
        )
    return made_for


def import_official(
    checkpoint: str | Path,
    clip_weights: str | Path | None = None,
    image_size: int | None = None,
    feature_layers: tuple[int, ...] | None = None,
    backbone: BackboneConfig | str | None = None,
    **settings: Any,
) -> tuple[FiLo, dict[str, Any]]:
    """Published {"filo": ...} checkpoint (+ optional OpenAI CLIP weights) -> FiLo (eval).

    image_size defaults to the one the checkpoint's CLIP copy was resized to. backbone names
    the architecture where shapes cannot tell it (the number of attention heads; default:
    OpenAI's 64-wide heads); `settings` override FiLoConfig fields.
    """
    published = read_checkpoint_file(checkpoint)
    if not looks_like(published):
        raise FBClipError(
            f"{checkpoint} is not a FiLo checkpoint (expected {{'filo': state_dict}} with "
            f"prompt learners and heads){_other_method(published)}"
        )
    copy, learned = split_checkpoint(published["filo"])
    openai = read_state_dict_file(clip_weights) if clip_weights is not None else None
    if openai is None and not copy:
        raise FBClipError(
            f"checkpoint {Path(checkpoint).name} has no CLIP copy (clip_model.*); pass "
            "--clip-weights ViT-L-14-336px.pt"
        )
    arch = _backbone(openai if openai is not None else copy, backbone)
    size = _image_size(copy, arch.patch_size, image_size)
    clip_state = _clip_state(copy, openai, size // arch.patch_size, Path(str(clip_weights)).name)
    values = {**learned_settings(learned), **settings}
    config = FiLoConfig(
        backbone=arch, image_size=size, feature_layers=tuple(feature_layers or ()), **values
    )
    model = FiLo(config)
    _load_clip(model, clip_state, checkpoint)
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("clip.")}
    check_state_dict(expected, learned, f"checkpoint {checkpoint}")
    model.load_state_dict(learned, strict=False)
    source = {
        "kind": "official",
        "method": "filo",
        "checkpoint": str(checkpoint),
        "clip_weights": str(clip_weights) if clip_weights is not None else None,
    }
    return model.eval(), source


def _load_clip(model: FiLo, state: Mapping[str, torch.Tensor], name: object) -> None:
    result = model.clip.load_state_dict(dict(state), strict=False)
    problems = list(result.missing_keys) + list(result.unexpected_keys)
    if problems:
        raise FBClipError(
            f"CLIP weights for {name} do not fit the architecture: missing "
            f"{result.missing_keys[:6]}, unexpected {result.unexpected_keys[:6]}; pass the "
            "backbone the checkpoint was trained with"
        )


def export_official(model: FiLo) -> dict[str, Any]:
    """The reference's layout again, in its key order: {"filo": state_dict} with the renamed
    V-V blocks, the stray visual.attn copy (block 7's: the last one the reference's surgery
    loop assigns, registered after ln_post), the heads, the text_encoder duplicates, the
    prompt learners and the adapter."""
    clip = {k: v.detach().clone() for k, v in model.clip.state_dict().items()}
    to_surgery = {new: old for old, new in _ATTENTION_NAMES.items()}
    stray_block = min(REFERENCE_VV_START, model.config.backbone.vision_layers) - 1
    last_visual = [key for key in clip if key.startswith("visual.")][-1]
    stray: dict[str, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    for key, value in clip.items():
        found = re.fullmatch(r"visual\.transformer\.resblocks\.(\d+)\.attn\.(.+)", key)
        if found and found.group(2) in to_surgery:
            block, name = int(found.group(1)), to_surgery[found.group(2)]
            if block + 1 >= model.config.vv_start:
                key = f"visual.transformer.resblocks.{block}.attn.{name}"
            if block == stray_block:
                stray[_STRAY_ATTENTION + name] = value
        state[_CLIP + key] = value
        if key == last_visual:
            state.update(stray)
    learned = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for prefix in ("decoder_cov.", "decoder_linear."):
        state.update({k: v for k, v in learned.items() if k.startswith(prefix)})
    state.update({_TEXT_DUPLICATE + k: v for k, v in clip.items() if k.startswith(_TEXT_KEYS)})
    for prefix in ("normal_prompt_learner.", "abnormal_prompt_learner.", "adapter."):
        state.update({k: v for k, v in learned.items() if k.startswith(prefix)})
    return {"filo": state}
