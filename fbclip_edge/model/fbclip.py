"""The FB-CLIP model: frozen CLIP + foreground/background heads, split for export.

Pieces: `encode_maps` (image -> M projected token maps, the vision graph), `score`
(maps -> image score and patch map, the fused kernels), and `encode_text` (run once,
frozen into the (2, D) `text_features` buffer when the model is put in eval mode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from open_clip.model import CLIP
from torch import nn

from fbclip_edge.kernels import score_maps
from fbclip_edge.model.backbone import build_clip, encode_layers
from fbclip_edge.model.config import FBCLIPConfig
from fbclip_edge.model.fb_attention import FBAttention
from fbclip_edge.model.text import PromptLearner, TextFusion, encode_text, prompt_tokens
from fbclip_edge.model.views import (
    background_prototype,
    foreground_mask,
    semantic_view,
    spatial_view,
    suppress_background,
)


@dataclass
class FBCLIPOutput:
    """Model outputs: image_score (B,) and patch_map (B, 1, g, g), abnormal probabilities."""

    image_score: torch.Tensor
    patch_map: torch.Tensor
    maps: torch.Tensor | None = None


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


class FBCLIP(nn.Module):
    """FB-CLIP on any open_clip ViT; CLIP stays frozen, the heads are learned."""

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
        self.fb_attention = FBAttention(
            config.backbone.vision_width, config.fb_heads, config.fb_dim_head
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

    @torch.no_grad()
    def freeze_text(self) -> torch.Tensor:
        """Compute the text features once and keep them as the deployment buffer."""
        self.text_features_frozen = self.encode_text().detach().float()
        self.text_frozen = True
        return self.text_features_frozen

    @property
    def text_features(self) -> torch.Tensor:
        """(2, D): frozen in eval mode, recomputed (with gradients) while training."""
        if self.training or not self.text_frozen:
            return self.encode_text()
        return self.text_features_frozen

    def train(self, mode: bool = True) -> FBCLIP:
        """Switching to eval freezes the text features from the current weights."""
        super().train(mode)
        self.clip.eval()  # frozen backbone: no dropout, even while the heads train
        if not mode:
            self.freeze_text()
        return self

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
        fg = foreground_mask(
            patches,
            cls,
            previous,
            cfg.mask_weights,
            cfg.mask_smooth,
            cfg.mask_threshold,
            cfg.mask_low,
        )
        # The first layer has no previous one: its change cue is zero (previous == itself).
        views = torch.stack(
            [
                patches,
                semantic_view(patches, cls, fg, cfg.sem_mix),
                spatial_view(patches, cls, fg, cfg.spa_kernel),
            ],
            dim=1,
        )
        views = torch.cat([cls[:, None, None].expand(-1, 3, 1, -1), views], dim=2)
        enhanced = self.fb_attention(views.reshape(batch * layers * 3, tokens, width))
        enhanced = enhanced.reshape(batch, layers * 3, tokens, width)
        return enhanced, fg.reshape(batch, layers, tokens - 1)

    def project(self, maps: torch.Tensor) -> torch.Tensor:
        """Dv -> D with CLIP's visual.proj (no ln_post, as the reference)."""
        return maps @ self.clip.visual.proj.to(maps.dtype)

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
        suppressed = suppress_background(enhanced, background, self.config.bs_mix)
        return layer_tokens, fg, enhanced, background, self.project(suppressed)

    def score(
        self, maps: torch.Tensor, text_features: torch.Tensor | None = None, impl: str = "auto"
    ) -> FBCLIPOutput:
        """Projected maps (B, M, T, D) -> image score (B,) and patch map (B, 1, g, g).

        impl picks the fused kernel ('auto': Triton on CUDA at inference, torch otherwise).
        """
        text = self.text_features if text_features is None else text_features
        image_score, patch_prob = score_maps(
            maps, text, self.map_weights(), self.config.temperature, impl=impl
        )
        side = round(int(patch_prob.shape[1]) ** 0.5)  # int(): a constant when traced for ONNX
        return FBCLIPOutput(image_score, patch_prob.reshape(-1, 1, side, side))

    def forward(self, pixel_values: torch.Tensor, return_maps: bool = False) -> FBCLIPOutput:
        """pixel_values (B, 3, S, S) normalized as `fbclip_edge.preprocess` makes them."""
        maps = self.encode_maps(pixel_values)
        output = self.score(maps)
        if return_maps:
            output.maps = maps
        return output

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
