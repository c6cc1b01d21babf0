"""The FB-CLIP model: frozen CLIP + foreground/background heads, split for export.

Pieces: `encode_maps` (image -> M projected token maps, the vision graph), `score`
(maps -> image score and patch map, the fused kernels), and `encode_text` (run once,
frozen into the (2, D) `text_features` buffer when the model is put in eval mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from open_clip.model import CLIP
from torch import nn

from fbclip_edge.clip.backbone import build_clip, encode_layers
from fbclip_edge.methods.base import AnomalyModel, ModelOutput, ScoringRule
from fbclip_edge.methods.fbclip.config import FBCLIPConfig
from fbclip_edge.methods.fbclip.fb_attention import FBAttention
from fbclip_edge.methods.fbclip.losses import LossTerms, fbclip_losses
from fbclip_edge.methods.fbclip.text import PromptLearner, TextFusion, encode_text, prompt_tokens
from fbclip_edge.methods.fbclip.views import (
    background_prototype,
    cls_similarity,
    foreground_mask,
    semantic_view,
    spatial_view,
    suppress_and_project,
)

FBCLIPOutput = ModelOutput  # the name the first releases exported


@dataclass
class FBCLIPIntermediates:
    """Every stage of one forward pass, for parity checks, losses and debugging."""

    layer_tokens: torch.Tensor  # (B, K, T, Dv)
    fg_masks: torch.Tensor  # (B, K, N)
    enhanced_maps: torch.Tensor  # (B, M, T, Dv)
    background: torch.Tensor  # (B, Dv)
    maps: torch.Tensor  # (B, M, T, D) projected
    map_logits: torch.Tensor  # (B, M, T, 2) unweighted
    text_features: torch.Tensor  # (2, D)
    output: FBCLIPOutput


class FBCLIP(AnomalyModel):
    """FB-CLIP on any open_clip ViT; CLIP stays frozen, the heads are learned."""

    method: ClassVar[str] = "fbclip"

    def __init__(self, config: FBCLIPConfig, clip: CLIP | None = None) -> None:
        super().__init__()
        self.config = config
        self.clip = clip if clip is not None else build_clip(config.backbone)
        self.clip.requires_grad_(False)
        text_width = config.backbone.text_width
        tokens = prompt_tokens(
            config.n_ctx,
            config.class_name,
            (config.normal_template, config.abnormal_template),
            config.backbone.text["context_length"],
        )
        self.prompt_learner = PromptLearner(tokens, config.n_ctx, text_width)
        self.text_fusion = TextFusion(text_width, config.backbone.embed_dim)
        # An exported graph's FB attention holds no more scores per call than a CLIP block.
        clip_heads = int(self.clip.visual.transformer.resblocks[0].attn.num_heads)
        self.fb_attention = FBAttention(
            config.backbone.vision_width,
            config.fb_heads,
            config.fb_dim_head,
            maps_per_call=max(1, clip_heads // config.fb_heads),
        )
        self.scale_weights = nn.Parameter(
            torch.full((config.n_scale_weights,), 1.0 / config.n_scale_weights)
        )
        # Frozen text features; filled by eval() / freeze_text(), saved with the model.
        self.register_buffer("text_features_frozen", torch.zeros(2, config.backbone.embed_dim))
        self.text_frozen = False

    # ----- text side -----
    def encode_text(self) -> torch.Tensor:
        """Text features (2, D) from the current prompt contexts (differentiable)."""
        return encode_text(
            self.clip, self.prompt_learner, self.text_fusion, self.config.text_fusion
        )

    @property
    def scoring(self) -> ScoringRule:
        """Weighted per-map logits, one softmax (spec section 6)."""
        return ScoringRule("logit_sum", self.config.temperature)

    def training_loss(
        self, pixels: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor
    ) -> LossTerms:
        """The paper's four terms (spec section 7); text encoded once from the prompts."""
        text = self.encode_text()
        maps = self.encode_maps(pixels)
        output = self.score(maps, text)
        return fbclip_losses(
            output.image_score,
            output.patch_map,
            maps[:, -1],
            text,
            labels,
            masks,
            temperature=self.config.temperature,
        )

    # ----- vision side -----
    def map_weights(self) -> torch.Tensor:
        """(M,) softmaxed scale weights, one per map: map i uses w[i // 3]."""
        weights = self.scale_weights.float().softmax(dim=0)
        index = torch.arange(self.config.num_maps, device=weights.device) // 3
        return weights[index]

    def enhance(self, layer_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, T, Dv) layer tokens -> enhanced maps (B, 3K, T, Dv) and fg masks (B, K, N)."""
        cfg = self.config
        batch, layers, tokens, width = layer_tokens.shape
        flat = layer_tokens.reshape(batch * layers, tokens, width)
        cls, patches = flat[:, 0], flat[:, 1:]
        previous = torch.cat([layer_tokens[:, :1], layer_tokens[:, :-1]], dim=1)[:, :, 1:]
        previous = previous.reshape(batch * layers, tokens - 1, width)
        similarity = cls_similarity(patches, cls)
        fg = foreground_mask(
            patches,
            similarity,
            previous,
            cfg.mask_weights,
            cfg.mask_smooth,
            cfg.mask_threshold,
            cfg.mask_low,
        )
        # The first layer has no previous one: its change cue is zero (previous == itself).
        # Views in spec order, CLS first in each: ID is the layer's tokens as they are.
        sem = semantic_view(patches, similarity, fg, cfg.sem_mix, cfg.mask_low)
        spa = spatial_view(patches, similarity, fg, cfg.spa_kernel)
        views = torch.stack(
            [flat, torch.cat([cls[:, None], sem], dim=1), torch.cat([cls[:, None], spa], dim=1)],
            dim=1,
        )
        enhanced = self.fb_attention(views.reshape(batch, layers * 3, tokens, width))
        return enhanced, fg.reshape(batch, layers, tokens - 1)

    def encode_maps(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, S, S) -> projected token maps (B, M, T, D): the vision graph."""
        return self._encode(pixel_values)[-1]

    def _encode(
        self, pixel_values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        layer_tokens = torch.stack(
            encode_layers(self.clip.visual, pixel_values, self.config.feature_layers), dim=1
        )
        enhanced, fg = self.enhance(layer_tokens)
        background = background_prototype(enhanced, self.config.bs_mean_weight)
        # visual.proj without ln_post, as the reference.
        maps = suppress_and_project(enhanced, background, self.clip.visual.proj, self.config.bs_mix)
        return layer_tokens, fg, enhanced, background, maps

    def forward_intermediates(self, pixel_values: torch.Tensor) -> FBCLIPIntermediates:
        """Forward pass that also returns every stage (spec order and shapes)."""
        layer_tokens, fg, enhanced, background, maps = self._encode(pixel_values)
        text = self.text_features
        unit = torch.nn.functional.normalize(maps.float(), dim=-1)
        map_logits = unit @ text.float().t() / self.config.temperature
        output = self.score(maps, text)
        output.maps = maps
        return FBCLIPIntermediates(
            layer_tokens, fg, enhanced, background, maps, map_logits, text, output
        )
