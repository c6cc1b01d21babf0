"""Import the AnomalyCLIP authors' published checkpoints (spec section 9), and write them back.

The published file is `{"prompt_learner": state_dict}`: ctx_pos / ctx_neg, the compound
prompts, their unused projections, and buffers derived from CLIP's token embedding and the
tokenizer. n_ctx, depth and t_n_ctx are read from the tensor shapes; the buffers are checked
against the CLIP weights given, so weights that do not fit are refused instead of giving
silently wrong scores.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from open_clip.model import CLIP

from fbclip_edge.clip.weights import clip_from_file
from fbclip_edge.errors import FBClipError
from fbclip_edge.methods.anomalyclip.config import AnomalyCLIPConfig, default_settings
from fbclip_edge.methods.anomalyclip.model import AnomalyCLIP
from fbclip_edge.statedict import check_state_dict, read_checkpoint_file

_LEARNED = ("ctx_pos", "ctx_neg", "compound_prompts_text.", "compound_prompt_projections.")
_DERIVED = ("token_prefix_", "token_suffix_", "tokenized_prompts_")
_CLIP_HINT = "the published AnomalyCLIP checkpoints need ViT-L-14-336px.pt"


def looks_like(checkpoint: Mapping[str, Any]) -> bool:
    """The published layout: only a prompt learner, with contexts and compound prompts.

    FB-CLIP's files also hold `model_trainable_params`; they are not ours.
    """
    prompts = checkpoint.get("prompt_learner")
    if not isinstance(prompts, Mapping) or "model_trainable_params" in checkpoint:
        return False
    return {"ctx_pos", "ctx_neg"} <= set(prompts) and any(
        str(key).startswith("compound_prompts_text.") for key in prompts
    )


def prompt_shapes(prompts: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """n_ctx, depth, t_n_ctx and the text width Dt, from the tensor shapes."""
    ctx = prompts["ctx_pos"]
    compound = sorted(
        (key for key in prompts if key.startswith("compound_prompts_text.")),
        key=lambda key: int(key.rsplit(".", 1)[1]),
    )
    shapes = {"n_ctx": int(ctx.shape[-2]), "depth": len(compound) + 1, "width": int(ctx.shape[-1])}
    if compound:
        shapes["t_n_ctx"] = int(prompts[compound[0]].shape[0])
    return shapes


def official_to_state_dict(prompts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The learned tensors under this package's names; unknown keys are an error."""
    renamed: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in prompts.items():
        if key.startswith(_LEARNED):
            renamed[f"prompt_learner.{key}"] = value.float()
        elif not key.startswith(_DERIVED):
            unknown.append(key)
    if unknown:
        raise FBClipError(
            f"checkpoint has keys this importer does not know: {unknown[:10]}; "
            "is it an AnomalyCLIP checkpoint?"
        )
    return renamed


def export_official(model: AnomalyCLIP) -> dict[str, Any]:
    """The published layout again ({"prompt_learner": ...}), buffers recomputed from CLIP."""
    learner = model.prompt_learner
    state: dict[str, torch.Tensor] = {
        key: value.detach().clone()
        for key, value in learner.state_dict().items()
        if key.startswith(_LEARNED)
    }
    with torch.no_grad():
        state.update(learner.prompt_embedding_rows(model.clip.token_embedding))
    for row, suffix in enumerate(("pos", "neg")):
        state[f"tokenized_prompts_{suffix}"] = learner.tokens[row, None, None].to(torch.int32)
    return {"prompt_learner": state}


def _check_settings(derived: Mapping[str, int], settings: Mapping[str, Any], name: str) -> None:
    for key, value in derived.items():
        if key in settings and settings[key] != value:
            raise FBClipError(
                f"checkpoint {name} has {key} {value} (from its tensor shapes), not "
                f"{settings[key]}; drop the {key} setting"
            )


def import_official(
    clip_weights: str | Path,
    checkpoint: str | Path,
    image_size: int = 518,
    feature_layers: tuple[int, ...] | None = None,
    **settings: Any,
) -> tuple[AnomalyCLIP, dict[str, Any]]:
    """Published checkpoint + OpenAI CLIP weights -> AnomalyCLIP (eval) and its source record.

    `settings` override AnomalyCLIPConfig fields (e.g. feature_map_start, class_name).
    """
    published = read_checkpoint_file(checkpoint)
    if not looks_like(published):
        raise FBClipError(
            f"{checkpoint} is not a published AnomalyCLIP checkpoint (expected "
            "{'prompt_learner': {ctx_pos, ctx_neg, compound_prompts_text.*}})"
        )
    prompts = published["prompt_learner"]
    learned = official_to_state_dict(prompts)
    shapes = prompt_shapes(prompts)
    width = shapes.pop("width")
    clip, backbone = clip_from_file(clip_weights)
    if backbone.text_width != width:
        raise FBClipError(
            f"CLIP weights {Path(clip_weights).name} have text width {backbone.text_width} but "
            f"checkpoint {Path(checkpoint).name} was trained on text width {width}: the CLIP "
            f"weights do not fit it; {_CLIP_HINT}"
        )
    _check_clip_fits(clip, prompts, shapes["n_ctx"], checkpoint, clip_weights)
    _check_settings(shapes, settings, str(checkpoint))
    values = {**default_settings(backbone), **settings, **shapes}
    config = AnomalyCLIPConfig(
        backbone=backbone,
        image_size=image_size,
        feature_layers=tuple(feature_layers or ()),
        **values,
    )
    model = AnomalyCLIP(config, clip)
    expected = {f"prompt_learner.{k}": v for k, v in model.prompt_learner.state_dict().items()}
    check_state_dict(expected, learned, f"checkpoint {checkpoint}")
    model.load_state_dict(learned, strict=False)
    _check_prompt_tokens(model, prompts, checkpoint)
    source = {
        "kind": "official",
        "checkpoint": str(checkpoint),
        "clip_weights": str(clip_weights),
    }
    return model.eval(), source


def _check_prompt_tokens(
    model: AnomalyCLIP, prompts: Mapping[str, torch.Tensor], name: object
) -> None:
    """The stored tokenized prompts must equal ours, or the contexts sit in the wrong place."""
    for row, suffix in enumerate(("pos", "neg")):
        stored = prompts.get(f"tokenized_prompts_{suffix}")
        if stored is not None and not torch.equal(
            stored.reshape(-1).long(), model.prompt_learner.tokens[row].cpu()
        ):
            raise FBClipError(
                f"checkpoint {name} was trained with other prompt text than "
                f"'{model.config.class_name}' in the default templates; pass the matching "
                "class_name / normal_template / abnormal_template settings"
            )


def _same_rows(stored: torch.Tensor | None, ours: torch.Tensor) -> bool:
    """Stored buffer rows equal ours (float32 copies of the same values; absent: no check)."""
    if stored is None:
        return True
    if stored.numel() != ours.numel():
        return False
    return torch.allclose(stored.float().reshape(ours.shape), ours, rtol=1e-3, atol=1e-6)


def _check_clip_fits(
    clip: CLIP,
    prompts: Mapping[str, torch.Tensor],
    n_ctx: int,
    name: str | Path,
    clip_weights: str | Path,
) -> None:
    """The stored prefix / suffix rows are the token embeddings of the stored prompt ids in
    the CLIP the checkpoint was trained with: other CLIP weights give other rows."""
    for suffix in ("pos", "neg"):
        ids = prompts.get(f"tokenized_prompts_{suffix}")
        if ids is None:
            continue
        with torch.no_grad():
            rows = clip.token_embedding(ids.reshape(-1).long())
        derived = {"token_prefix": rows[:1], "token_suffix": rows[1 + n_ctx :]}
        for key, ours in derived.items():
            if not _same_rows(prompts.get(f"{key}_{suffix}"), ours):
                raise FBClipError(
                    f"checkpoint {Path(name).name} was trained on other CLIP weights than "
                    f"{Path(clip_weights).name} (its {key}_{suffix} is not their token "
                    f"embedding): the CLIP weights do not fit it; {_CLIP_HINT}"
                )
