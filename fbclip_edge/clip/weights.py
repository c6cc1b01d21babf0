"""The one place that knows how CLIP weights arrive.

Three ways: an open_clip name + pretrained tag (needs the internet), a local OpenAI `.pt`
file (TorchScript archive or plain state dict), or a state dict in OpenAI layout.
Weights are kept in float32 (open_clip's OpenAI loader would cast them to float16).
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import torch
from open_clip.model import CLIP
from open_clip.transformer import QuickGELU

from fbclip_edge.clip.backbone import backbone_config, build_clip, config_from_openai_state_dict
from fbclip_edge.clip.config import BackboneConfig
from fbclip_edge.errors import FBClipError

# Keys in OpenAI's TorchScript state dict that are not parameters.
_NON_PARAMETER_KEYS = ("input_resolution", "context_length", "vocab_size")


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives (OpenAI's released .pt files) carry a code/ folder."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in f"/{name}" for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a TorchScript archive or a torch.save'd state dict, with one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise FBClipError(f"CLIP weights file not found: {path}; check the path")
    try:
        if _is_torchscript(path):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obj: object = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise FBClipError(
            f"cannot read {path} as a TorchScript archive or a state dict "
            f"({type(error).__name__}); the file is truncated or corrupt: download it again"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FBClipError(f"{path} does not hold a state dict of tensors; pass CLIP weights")
    return {k: v for k, v in obj.items() if k not in _NON_PARAMETER_KEYS}


def clip_from_state_dict(
    state_dict: dict[str, torch.Tensor], name: str = "openai-state-dict"
) -> tuple[CLIP, BackboneConfig]:
    """Build a float32 CLIP whose architecture is inferred from the state dict's shapes."""
    config = config_from_openai_state_dict(state_dict, name)
    model = build_clip(config)
    floats = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    result = model.load_state_dict(floats, strict=False)
    problems = list(result.missing_keys) + list(result.unexpected_keys)
    if problems:
        raise FBClipError(
            f"CLIP state dict '{name}' does not match a ViT CLIP: "
            f"missing {result.missing_keys[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}; pass weights in OpenAI layout"
        )
    return model.eval(), config


def clip_from_file(path: str | Path) -> tuple[CLIP, BackboneConfig]:
    """A local OpenAI `.pt` (TorchScript or state dict), e.g. ViT-L-14-336px.pt."""
    return clip_from_state_dict(read_state_dict_file(path), Path(path).stem)


def clip_from_pretrained(name: str, tag: str) -> tuple[CLIP, BackboneConfig]:
    """open_clip model name + pretrained tag; downloads, so it fails offline."""
    import open_clip

    try:
        model = open_clip.create_model(name, pretrained=tag, precision="fp32", device="cpu")
    except Exception as error:
        raise FBClipError(
            f"could not get pretrained weights '{tag}' for {name} ({type(error).__name__}; "
            "offline, or an unknown tag?); use --clip-weights FILE with a local OpenAI .pt "
            "file or a state dict in OpenAI layout instead"
        ) from None
    if not isinstance(model, CLIP):
        raise FBClipError(f"{name} is not a plain ViT CLIP; FB-CLIP needs open_clip's CLIP class")
    quick = isinstance(model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    config = backbone_config(name, quick_gelu=quick)
    return model.float().eval(), config


def load_clip(
    backbone: str | None = None,
    pretrained: str | None = None,
    clip_weights: str | Path | None = None,
) -> tuple[CLIP, BackboneConfig]:
    """Pick the weight source: a file wins, then name + tag, then random weights by name."""
    if clip_weights is not None:
        return clip_from_file(clip_weights)
    if backbone is None:
        raise FBClipError("name a backbone (e.g. ViT-L-14-336) or pass --clip-weights FILE")
    if pretrained:
        return clip_from_pretrained(backbone, pretrained)
    config = backbone_config(backbone)
    return build_clip(config), config
