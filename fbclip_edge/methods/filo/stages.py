"""FiLo's four networks on the model itself (`pipeline.FiLoStages` in torch), and the
modules the exporter traces: each wraps exactly the computation one exported graph holds."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from fbclip_edge.errors import FBClipError
from fbclip_edge.methods.filo.boxes import BertVocab
from fbclip_edge.methods.filo.descriptions import CategoryData
from fbclip_edge.methods.filo.model import FiLo
from fbclip_edge.methods.filo.pipeline import (
    FiLoHost,
    FiLoPipeline,
    HostSettings,
    score_maps,
)
from fbclip_edge.methods.filo.text import encode_text_at

if TYPE_CHECKING:
    from fbclip_edge.methods.filo.grounding import GroundingDetector


class VisionStage(nn.Module):
    """pixels (B, 3, S, S) -> c (B, D) and head features (B, M, N, D): tower, V-V path,
    ln_post/proj, adapter on all tokens (the reference's rounding), heads."""

    def __init__(self, model: FiLo) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vision = self.model.encode_image(pixels)
        return self.model.conditioning(vision.image_tokens), vision.head_features


class TextStage(nn.Module):
    """Prompt embeddings (P, L, Dt), end positions (P,) -> CLIP text features (P, D)."""

    def __init__(self, model: FiLo) -> None:
        super().__init__()
        self.clip = model.clip

    def forward(self, prompts: torch.Tensor, end_index: torch.Tensor) -> torch.Tensor:
        return encode_text_at(self.clip, prompts, end_index)


class ScoreStage(nn.Module):
    """Head features, T, c -> image score (B,) and A (B, S, S): a fixed small graph."""

    def __init__(self, model: FiLo) -> None:
        super().__init__()
        config = model.config
        self.image_size = config.image_size
        self.logit_scale = float(config.logit_scale)
        self.blur_sigma = float(config.blur_sigma)

    def forward(
        self, head_features: torch.Tensor, text: torch.Tensor, conditioning: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return score_maps(
            head_features, text, conditioning, self.image_size, self.logit_scale, self.blur_sigma
        )


class TorchStages:
    """The FiLo model (and the Grounding DINO port) as `FiLoStages`."""

    def __init__(self, model: FiLo, detector: GroundingDetector | None = None) -> None:
        self.model = model.eval()
        self.detector = detector
        self.device = next(model.parameters()).device
        self._vision = VisionStage(model)
        self._text = TextStage(model)
        self._score = ScoreStage(model)

    def grounding(
        self, gd_pixels: torch.Tensor, input_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.detector is None:
            raise FBClipError("this FiLo model has no Grounding DINO; import it with one")
        device = self.detector.device
        ids = input_ids.to(device)
        output = self.detector.model(
            pixel_values=gd_pixels.to(device).float(),
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            token_type_ids=torch.zeros_like(ids),
        )
        length = int(ids.shape[1])
        return output.logits[0, :, :length].float().cpu(), output.pred_boxes[0].float().cpu()

    def vision(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._vision(pixels.to(self.device))

    def text(self, prompts: torch.Tensor, end_index: torch.Tensor) -> torch.Tensor:
        return self._text(prompts.to(self.device), end_index.to(self.device))

    def score(
        self, head_features: torch.Tensor, text: torch.Tensor, conditioning: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._score(head_features, text, conditioning)


def torch_host(model: FiLo, table: Mapping[str, CategoryData], vocab: BertVocab | None) -> FiLoHost:
    """The host side on the model's own prompt learners and full token embedding."""
    context = int(model.clip.positional_embedding.shape[0])
    settings = HostSettings.from_config(model.config, context)
    return FiLoHost(
        settings,
        model.normal_prompt_learner,
        model.abnormal_prompt_learner,
        model.clip.token_embedding,
        table,
        vocab,
    )


def torch_pipeline(
    model: FiLo,
    table: Mapping[str, CategoryData],
    detector: GroundingDetector | None = None,
) -> FiLoPipeline:
    """FiLo end to end in torch: Grounding DINO when a detector is given, else no boxes."""
    vocab = detector.vocab if detector is not None else None
    host = torch_host(model, table, vocab)
    return FiLoPipeline(TorchStages(model, detector), host, use_boxes=detector is not None)
