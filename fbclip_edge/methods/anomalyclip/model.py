"""The AnomalyCLIP model: frozen CLIP with the V-V side stream, learned text prompts.

Pieces: `encode_maps` (image -> one projected token map per selected layer, the global
feature in every map's CLS row: the vision graph), `score` (the shared fused kernels with
the 'prob_sum' rule), and `encode_text` (run once, frozen into `text_features` in eval).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import VisionTransformer

from fbclip_edge.clip.backbone import build_clip
from fbclip_edge.methods.anomalyclip.config import AnomalyCLIPConfig
from fbclip_edge.methods.anomalyclip.dual_path import (
    VisionStreams,
    check_vision_blocks,
    run_streams,
)
from fbclip_edge.methods.anomalyclip.losses import LossTerms, anomalyclip_losses
from fbclip_edge.methods.anomalyclip.text import (
    PromptLearner,
    TextStages,
    encode_prompts,
    prompt_tokens,
)
from fbclip_edge.methods.base import AnomalyModel, ModelOutput, ScoringRule


@dataclass
class AnomalyCLIPIntermediates:
    """Every stage of one forward pass, named as the reference fixture's tensors.

    K = len(feature_layers) (all of them, whatever feature_map_start); M = the maps.
    """

    text_tokens: torch.Tensor  # (2, Lt, context, Dt) text block outputs
    text_embeddings: torch.Tensor  # (2, D) before normalization
    text_features: torch.Tensor  # (2, D) unit
    tokens_branch: torch.Tensor  # (B, T, Dv) h_{s-1}, where the V-V path starts
    tokens_vv: torch.Tensor  # (B, K, T, Dv) V-V path after each feature layer
    tokens_plain: torch.Tensor  # (B, K, T, Dv) plain path after each feature layer
    patch_features: torch.Tensor  # (B, K, T, D) ln_post + proj of tokens_vv, unit
    global_feature: torch.Tensor  # (B, D) plain CLS after the last block @ proj, no ln_post
    image_logits: torch.Tensor  # (B, 2) unit global feature . text / temperature
    image_score: torch.Tensor  # (B,) softmax(image_logits)[:, 1]
    similarity: torch.Tensor  # (B, K, T, 2) per-token softmax, CLS row included
    patch_map: torch.Tensor  # (B, 1, g, g) sum over the selected layers of p_abnormal
    maps: torch.Tensor  # (B, M, T, D) what encode_maps returns
    output: ModelOutput  # the scored maps (kernel path)


def project_tokens(visual: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """ln_post then visual.proj, on every token given: (..., Dv) -> (..., D)."""
    return visual.ln_post(tokens) @ visual.proj.to(tokens.dtype)


class AnomalyCLIP(AnomalyModel):
    """AnomalyCLIP on any plain open_clip ViT; CLIP frozen, only the prompts are learned."""

    method: ClassVar[str] = "anomalyclip"

    def __init__(self, config: AnomalyCLIPConfig, clip: CLIP | None = None) -> None:
        super().__init__()
        self.config = config
        self.clip = clip if clip is not None else build_clip(config.backbone)
        self.clip.requires_grad_(False)
        check_vision_blocks(self.clip.visual)
        tokens = prompt_tokens(
            config.n_ctx,
            config.class_name,
            config.templates,
            int(config.backbone.text["context_length"]),
        )
        self.prompt_learner = PromptLearner(
            tokens, config.n_ctx, config.depth, config.t_n_ctx, config.backbone.text_width
        )
        # Frozen text features; filled by eval() / freeze_text(), saved with the model.
        self.register_buffer("text_features_frozen", torch.zeros(2, config.backbone.embed_dim))
        self.text_frozen = False

    # ----- text side -----
    def text_stages(self) -> TextStages:
        """Text tower stages (block outputs, embeddings, unit features), differentiable."""
        return encode_prompts(self.clip, self.prompt_learner)

    def encode_text(self) -> torch.Tensor:
        """Unit text features (2, D) [normal, abnormal] from the learned prompts."""
        return self.text_stages().features

    @property
    def scoring(self) -> ScoringRule:
        """A softmax per layer map, abnormal probabilities summed (spec section 6)."""
        return ScoringRule("prob_sum", self.config.temperature)

    def map_weights(self) -> torch.Tensor:
        """(M,) ones: the layer maps are summed, not averaged (map values in [0, M])."""
        return torch.ones(self.config.num_maps, device=self.text_features_frozen.device)

    def training_loss(
        self, pixels: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor
    ) -> LossTerms:
        """Spec section 8; image features without gradients, text encoded once."""
        text = self.encode_text()
        with torch.no_grad():
            maps = self.encode_maps(pixels)
        return anomalyclip_losses(maps, text, masks, labels, self.config.temperature)

    # ----- vision side -----
    def streams(self, pixel_values: torch.Tensor, layers: tuple[int, ...]) -> VisionStreams:
        """The plain and V-V tokens after `layers`, and the last plain tokens."""
        return run_streams(self.clip.visual, pixel_values, layers, self.config.vv_start)

    def global_feature(self, last: torch.Tensor) -> torch.Tensor:
        """Plain CLS after the last block @ proj, without ln_post (reference quirk): (B, D)."""
        return last[:, 0] @ self.clip.visual.proj.to(last.dtype)

    def assemble_maps(self, patch_tokens: torch.Tensor, gvec: torch.Tensor) -> torch.Tensor:
        """(B, M, N, D) projected patch tokens + (B, D) global -> (B, M, 1 + N, D)."""
        cls = gvec[:, None, None].expand(-1, patch_tokens.shape[1], 1, -1)
        return torch.cat([cls, patch_tokens], dim=2)

    def encode_maps(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, S, S) -> (B, M, T, D): rows 1.. ln_post(z_L) @ proj of each selected
        layer, row 0 the global feature (the 'prob_sum' kernel scores map 0's row 0)."""
        streams = self.streams(pixel_values, self.config.map_layers)
        tokens = torch.stack(streams.vv, dim=1)[:, :, 1:]
        patches = project_tokens(self.clip.visual, tokens)
        return self.assemble_maps(patches, self.global_feature(streams.last))

    def forward_intermediates(self, pixel_values: torch.Tensor) -> AnomalyCLIPIntermediates:
        """Forward pass that also returns every stage (the fixture's names and shapes)."""
        cfg = self.config
        text = self.text_stages()
        streams = self.streams(pixel_values, cfg.feature_layers)
        tokens_vv = torch.stack(streams.vv, dim=1)
        projected = project_tokens(self.clip.visual, tokens_vv)
        patch_features = projected / projected.norm(dim=-1, keepdim=True)
        gvec = self.global_feature(streams.last)
        unit = gvec / gvec.norm(dim=-1, keepdim=True)
        features = text.features
        image_logits = unit @ features.t() / cfg.temperature
        similarity = (patch_features @ features.t() / cfg.temperature).softmax(dim=-1)
        selected = similarity[:, cfg.feature_map_start :, 1:]
        side = round(int(selected.shape[2]) ** 0.5)
        patch_map = ((selected[..., 1] + 1 - selected[..., 0]) / 2).sum(dim=1)
        maps = self.assemble_maps(projected[:, cfg.feature_map_start :, 1:], gvec)
        output = self.score(maps, features)
        output.maps = maps
        return AnomalyCLIPIntermediates(
            text_tokens=text.tokens,
            text_embeddings=text.embeddings,
            text_features=features,
            tokens_branch=streams.branch,
            tokens_vv=tokens_vv,
            tokens_plain=torch.stack(streams.plain, dim=1),
            patch_features=patch_features,
            global_feature=gvec,
            image_logits=image_logits,
            image_score=F.softmax(image_logits, dim=-1)[:, 1],
            similarity=similarity,
            patch_map=patch_map.reshape(-1, 1, side, side),
            maps=maps,
            output=output,
        )
