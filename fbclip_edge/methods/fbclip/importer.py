"""Import the FB-CLIP authors' published checkpoints (spec section 8) into FBCLIP."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fbclip_edge.clip.weights import clip_from_file
from fbclip_edge.errors import FBClipError
from fbclip_edge.methods.fbclip.config import FBCLIPConfig
from fbclip_edge.methods.fbclip.fbclip import FBCLIP
from fbclip_edge.statedict import check_state_dict, read_checkpoint_file

# Entries of the published checkpoint that the reference defines but never uses.
_UNUSED_PROMPT_KEYS = (
    "token_prefix_",
    "token_suffix_",
    "tokenized_prompts_",
    "compound_prompts_text.",
    "compound_prompt_projections.",
)
_UNUSED_TRAINABLE_KEYS = ("layer_selector", "fusion_weights", "fusion_weight", "gate_network.")


def official_to_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rename the published keys to this package's; unknown keys are an error."""
    renamed: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in checkpoint["prompt_learner"].items():
        if key in ("ctx_pos", "ctx_neg"):
            renamed[f"prompt_learner.{key}"] = value
        elif not key.startswith(_UNUSED_PROMPT_KEYS):
            unknown.append(f"prompt_learner.{key}")
    for key, value in checkpoint["model_trainable_params"].items():
        if key.startswith("fb_Attention."):
            renamed["fb_attention." + key.removeprefix("fb_Attention.")] = value
        elif key.startswith(("token_selector.", "text_projection_mlp.")):
            renamed[f"text_fusion.{key}"] = value
        elif key == "scale_weights":
            renamed[key] = value
        elif not key.startswith(_UNUSED_TRAINABLE_KEYS):
            unknown.append(f"model_trainable_params.{key}")
    if unknown:
        raise FBClipError(
            f"checkpoint has keys this importer does not know: {unknown[:10]}; "
            "is it an FB-CLIP checkpoint?"
        )
    return {k: v.float() for k, v in renamed.items()}


def looks_like(checkpoint: Mapping[str, Any]) -> bool:
    """A published FB-CLIP checkpoint: prompt learner plus the heads' trainable params."""
    return {"prompt_learner", "model_trainable_params"} <= set(checkpoint)


def import_official(
    clip_weights: str | Path,
    checkpoint: str | Path,
    image_size: int = 518,
    feature_layers: tuple[int, ...] | None = None,
    **settings: Any,
) -> tuple[FBCLIP, dict[str, Any]]:
    """Published checkpoint + OpenAI CLIP weights -> FBCLIP (eval) and its source record.

    `settings` override FBCLIPConfig fields (e.g. class_name) for checkpoints trained
    with other prompts.
    """
    published = read_checkpoint_file(checkpoint)
    learned = official_to_state_dict(published)
    clip, backbone = clip_from_file(clip_weights)
    n_ctx = (
        int(learned["prompt_learner.ctx_pos"].shape[-2])
        if "prompt_learner.ctx_pos" in learned
        else 12
    )
    config = FBCLIPConfig(
        backbone=backbone,
        image_size=image_size,
        feature_layers=tuple(feature_layers or ()),
        n_ctx=n_ctx,
        **settings,
    )
    model = FBCLIP(config, clip)
    heads = {
        k: v
        for k, v in model.state_dict().items()
        if not k.startswith("clip.") and k != "text_features_frozen"
    }
    check_state_dict(heads, learned, f"checkpoint {checkpoint}")
    model.load_state_dict(learned, strict=False)
    _check_prompt_tokens(model, published["prompt_learner"], checkpoint)
    source = {
        "kind": "official",
        "checkpoint": str(checkpoint),
        "clip_weights": str(clip_weights),
        "epoch": published.get("epoch"),
        "source_domain": published.get("source_domain"),
    }
    return model.eval(), source


def _check_prompt_tokens(
    model: FBCLIP, prompt_state: Mapping[str, torch.Tensor], name: object
) -> None:
    """The stored tokenized prompts must equal ours, or the contexts sit in the wrong place."""
    for row, suffix in enumerate(("pos", "neg")):
        stored = prompt_state.get(f"tokenized_prompts_{suffix}")
        if stored is not None and not torch.equal(
            stored.reshape(-1).long(), model.prompt_learner.tokens[row].cpu()
        ):
            raise FBClipError(
                f"checkpoint {name} was trained with different prompt text than "
                f"'{model.config.class_name}' and the default templates; pass the matching "
                "class_name / normal_template / abnormal_template settings"
            )
