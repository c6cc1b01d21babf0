"""The FiLo model (docs/filo-spec.md): frozen CLIP, learned prompts, adapter and heads.

FiLo's text features depend on the image (the conditioning vector and the position word from
Grounding DINO) and on the category's descriptions, so unlike the methods behind
`AnomalyModel` it has no frozen (2, D) text. The stages are explicit so that a deployment layer
can export them separately (spec 13):

    encode_image(pixels)            -> FiLoVision: token entries, image tokens, head features
    conditioning(image_tokens)      -> c (B, D)
    text_features(categories, c, positions) -> T (B, 2, D)
    similarity(c, T)                -> s (B, 2)
    maps(head_features, T)          -> map logits (B, M, N, 2)
    anomaly_map(map_logits)         -> A (B, S, S);  image_score(s, A) -> (B,)
    forward(pixels, categories, boxes_info) -> FiLoOutput (box step applied)

The reference runs one image per call; every stage here gives each image of a batch what a
one-image call gives it (the text side loops over images).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from open_clip.model import CLIP
from torch import nn

from fbclip_edge.clip.backbone import build_clip
from fbclip_edge.clip.config import BackboneConfig
from fbclip_edge.errors import FBClipError
from fbclip_edge.methods.filo import maps as map_ops
from fbclip_edge.methods.filo.boxes import BoxResult, apply_boxes
from fbclip_edge.methods.filo.config import FiLoConfig
from fbclip_edge.methods.filo.descriptions import CategoryData
from fbclip_edge.methods.filo.heads import Adapter, LinearHeads, MMCIHeads, conditioning
from fbclip_edge.methods.filo.losses import (
    AdapterLossTerms,
    MapLossTerms,
    adapter_loss,
    map_losses,
)
from fbclip_edge.methods.filo.text import (
    CategoryPrompts,
    PromptLearner,
    aggregate,
    build_category_prompts,
    check_context_length,
    encode_text,
)
from fbclip_edge.methods.filo.vision import (
    TowerTokens,
    check_vision_blocks,
    project_tokens,
    run_tower,
)

Category = CategoryData | CategoryPrompts


@dataclass
class FiLoVision:
    """The vision graph's outputs for a batch."""

    entries: list[torch.Tensor]  # E0..E6 (B, T, Dv), config.entry_layers order, CLS first
    image_tokens: torch.Tensor  # Z (B, T, D): ln_post + proj of the last block, all tokens
    linear_features: torch.Tensor  # (B, num_linear, N, D) head outputs, not normalised
    mmci_features: torch.Tensor  # (B, num_mmci, N, D)

    @property
    def image_embedding(self) -> torch.Tensor:
        """(B, D): the CLS row of Z, before the adapter."""
        return self.image_tokens[:, 0]

    @property
    def head_features(self) -> torch.Tensor:
        """(B, M, N, D): the linear heads' outputs, then the MMCI heads'."""
        return torch.cat([self.linear_features, self.mmci_features], dim=1)


@dataclass
class FiLoText:
    """Text stages per image: raw prompt features (before normalisation) and T."""

    text: torch.Tensor  # (B, 2, D), rows normal / abnormal, each of norm 1/sqrt(2)
    normal_features: list[torch.Tensor]  # per image (7, D)
    abnormal_features: list[torch.Tensor]  # per image (R_i, D): the encoded abnormal prompts
    abnormal_rows: list[list[int]]  # per image: prompt indices of abnormal_features


@dataclass
class FiLoOutput:
    """Test-time outputs; anomaly_map is the pixel output after the box step."""

    image_score: torch.Tensor  # (B,)
    anomaly_map: torch.Tensor  # (B, S, S)
    anomaly_map_before_boxes: torch.Tensor  # (B, S, S): A
    similarity: torch.Tensor  # (B, 2): s = c . T^T
    map_logits: torch.Tensor  # (B, M, N, 2)
    text_features: torch.Tensor  # (B, 2, D)
    conditioning: torch.Tensor  # (B, D)
    vision: FiLoVision  # the vision graph's outputs (token entries, image tokens, heads)


def clip_backbone(config: FiLoConfig) -> BackboneConfig:
    """The CLIP that FiLo runs: the backbone at image_size (its positional embedding is the
    resized one) with the config's GELU (exact, as the reference)."""
    vision = {**config.backbone.vision, "image_size": config.image_size}
    return dataclasses.replace(config.backbone, vision=vision, quick_gelu=config.quick_gelu)


class FiLo(nn.Module):
    """FiLo's CLIP side on any plain open_clip ViT; CLIP frozen."""

    method: ClassVar[str] = "filo"

    def __init__(self, config: FiLoConfig, clip: CLIP | None = None) -> None:
        super().__init__()
        self.config = config
        self.clip = clip if clip is not None else build_clip(clip_backbone(config))
        self.clip.requires_grad_(False)
        check_vision_blocks(self.clip.visual)
        text_width, dim = config.text_width, config.embed_dim
        self.normal_prompt_learner = PromptLearner(
            config.n_ctx, text_width, dim, config.meta_reduction
        )
        self.abnormal_prompt_learner = PromptLearner(
            config.n_ctx, text_width, dim, config.meta_reduction
        )
        self.adapter = Adapter(dim, config.adapter_reduction)
        self.decoder_linear = LinearHeads(config.vision_width, dim, config.num_linear)
        self.decoder_cov = MMCIHeads(config.vision_width, dim, config.num_mmci)
        self._prompts: dict[CategoryData, CategoryPrompts] = {}

    def train(self, mode: bool = True) -> FiLo:
        """The frozen CLIP stays in eval mode while the learned parts train."""
        super().train(mode)
        self.clip.eval()
        return self

    # ----- per category -----
    def category_prompts(self, category: Category) -> CategoryPrompts:
        """Prompt strings and token ids of a category (built once, then cached)."""
        if isinstance(category, CategoryPrompts):
            check_context_length(self.clip, category.normal_ids)
            return category
        if category not in self._prompts:
            context = int(self.clip.positional_embedding.shape[0])
            self._prompts[category] = build_category_prompts(category, self.config.n_ctx, context)
        return self._prompts[category]

    # ----- vision -----
    def tower(self, pixel_values: torch.Tensor) -> TowerTokens:
        """The frozen tower with the V-V path: the token entries and X_L (no gradients)."""
        cfg = self.config
        with torch.no_grad():
            return run_tower(self.clip.visual, pixel_values, cfg.entry_layers, cfg.vv_start)

    def encode_image(self, pixel_values: torch.Tensor) -> FiLoVision:
        """Image (B, 3, S, S) normalised as spec 1.1 -> FiLoVision (heads differentiable)."""
        if int(pixel_values.shape[-1]) != self.config.image_size:
            raise FBClipError(
                f"image side {int(pixel_values.shape[-1])} != the model's image_size "
                f"{self.config.image_size}; resize to it (spec 1.1)"
            )
        tokens = self.tower(pixel_values)
        with torch.no_grad():
            image_tokens = project_tokens(self.clip.visual, tokens.last)
        linear = self.decoder_linear(tokens.entries[0::2])
        mmci = self.decoder_cov(tokens.entries[1::2])
        return FiLoVision(
            entries=tokens.entries,
            image_tokens=image_tokens,
            linear_features=torch.stack(linear, dim=1),
            mmci_features=_stack_or_empty(mmci, linear[0]),
        )

    def conditioning(self, image_tokens: torch.Tensor, with_adapter: bool = True) -> torch.Tensor:
        """c (B, D) from Z (B, T, D) or its CLS rows (B, D); without the adapter in stage 1."""
        return conditioning(image_tokens, self.adapter if with_adapter else None)

    # ----- text -----
    def prompt_features(
        self, prompts: CategoryPrompts, c: torch.Tensor, rows: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One image: raw features of the 7 normal prompts and of the abnormal prompts `rows`.

        c is that image's conditioning (1, D).
        """
        embedding = self.clip.token_embedding
        ids = prompts.normal_ids.to(c.device)
        normal = encode_text(self.clip, self.normal_prompt_learner(embedding(ids), c), ids)
        ids = prompts.abnormal_ids[rows].to(c.device)
        abnormal = encode_text(self.clip, self.abnormal_prompt_learner(embedding(ids), c), ids)
        return normal, abnormal

    def text_stages(
        self,
        categories: Sequence[Category],
        conditioning: torch.Tensor,
        positions: Sequence[str | None] | None = None,
        encode_all: bool = False,
    ) -> FiLoText:
        """T per image (spec 4), with the raw prompt features.

        positions[i]: image i's position word or None (all positions averaged). Only the
        prompts that enter the average are encoded unless encode_all (the reference encodes
        all n_s * 9; each prompt is encoded independently, so T is the same).
        """
        count = int(conditioning.shape[0])
        words = list(positions) if positions is not None else [None] * count
        if len(categories) != count or len(words) != count:
            raise FBClipError(
                f"{count} images but {len(categories)} categories and {len(words)} position "
                "entries; give one per image"
            )
        texts, normals, abnormals, all_rows = [], [], [], []
        for i in range(count):
            prompts = self.category_prompts(categories[i])
            used = prompts.abnormal_rows(words[i])
            rows = list(range(len(prompts.abnormal))) if encode_all else used
            normal, abnormal = self.prompt_features(prompts, conditioning[i : i + 1], rows)
            selected = abnormal if rows == used else abnormal[used]
            texts.append(aggregate(normal, selected))
            normals.append(normal)
            abnormals.append(abnormal)
            all_rows.append(rows)
        return FiLoText(torch.stack(texts), normals, abnormals, all_rows)

    def text_features(
        self,
        categories: Sequence[Category],
        conditioning: torch.Tensor,
        positions: Sequence[str | None] | None = None,
    ) -> torch.Tensor:
        """T (B, 2, D): rows normal / abnormal, conditioned on c and the position words."""
        return self.text_stages(categories, conditioning, positions).text

    # ----- maps and scores -----
    @staticmethod
    def similarity(conditioning: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """s = c . T^T (B, 2)."""
        return map_ops.global_similarity(conditioning, text)

    def maps(self, head_features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Head outputs (B, M, N, D), T (B, 2, D) -> 100 * normalize(f_m) @ T^T (B, M, N, 2)."""
        scale = self.config.logit_scale
        logits = [
            map_ops.similarity_logits(head_features[:, m], text, scale)
            for m in range(int(head_features.shape[1]))
        ]
        return torch.stack(logits, dim=1)

    def probability_maps(self, map_logits: torch.Tensor) -> list[torch.Tensor]:
        """M maps P_m (B, 2, S, S): upsampled, softmaxed (no blur; the training maps)."""
        return map_ops.probability_maps(map_logits, self.config.image_size)

    def anomaly_map(self, map_logits: torch.Tensor) -> torch.Tensor:
        """A (B, S, S): the mean of the seven blurred abnormality maps (spec 7.2)."""
        return map_ops.anomaly_map(map_logits, self.config.image_size, self.config.blur_sigma)

    @staticmethod
    def image_score(similarity: torch.Tensor, amap: torch.Tensor) -> torch.Tensor:
        """(s_abnormal + max A) / 2 (B,)."""
        return map_ops.image_score(similarity, amap)

    def apply_boxes(self, amap: torch.Tensor, boxes_info: Sequence[BoxResult]) -> torch.Tensor:
        """Spec 8.6 per image: A damped by outside_box_factor outside the boxes."""
        if len(boxes_info) != int(amap.shape[0]):
            raise FBClipError(
                f"{int(amap.shape[0])} images but {len(boxes_info)} box results; give one per image"
            )
        factor = self.config.outside_box_factor
        return torch.stack(
            [apply_boxes(amap[i], found.boxes_final, factor) for i, found in enumerate(boxes_info)]
        )

    def forward(
        self,
        pixel_values: torch.Tensor,
        categories: Sequence[Category],
        boxes_info: Sequence[BoxResult] | None,
    ) -> FiLoOutput:
        """The test-time path (spec 0) for a batch, one category and one BoxResult (from
        boxes.locate on the image's Grounding DINO outputs) per image.

        boxes_info None skips Grounding DINO: no position word and no box step (not the
        reference's output; for use without a detector).
        """
        vision = self.encode_image(pixel_values)
        c = self.conditioning(vision.image_tokens)
        positions = [found.position for found in boxes_info] if boxes_info is not None else None
        text = self.text_features(categories, c, positions)
        similarity = self.similarity(c, text)
        map_logits = self.maps(vision.head_features, text)
        amap = self.anomaly_map(map_logits)
        final = self.apply_boxes(amap, boxes_info) if boxes_info is not None else amap
        return FiLoOutput(
            image_score=self.image_score(similarity, amap),
            anomaly_map=final,
            anomaly_map_before_boxes=amap,
            similarity=similarity,
            map_logits=map_logits,
            text_features=text,
            conditioning=c,
            vision=vision,
        )

    # ----- training (spec 9) -----
    def stage1_terms(
        self, vision: FiLoVision, masks: torch.Tensor, categories: Sequence[Category]
    ) -> MapLossTerms:
        """Stage 1 from a vision pass: no adapter, no position word, maps without blur."""
        c = self.conditioning(vision.image_tokens, with_adapter=False)
        text = self.text_features(categories, c)
        probs = self.probability_maps(self.maps(vision.head_features, text))
        return map_losses(probs, masks)

    def stage1_loss(
        self, pixel_values: torch.Tensor, masks: torch.Tensor, categories: Sequence[Category]
    ) -> MapLossTerms:
        """Heads and prompt learners (spec 9, stage 1) on a batch."""
        return self.stage1_terms(self.encode_image(pixel_values), masks, categories)

    def stage2_terms(
        self, image_tokens: torch.Tensor, labels: torch.Tensor, categories: Sequence[Category]
    ) -> AdapterLossTerms:
        """Stage 2 from Z (B, T, D): s / 0.07 against the label; T without gradient but
        conditioned on the adapted c, no position word."""
        c = self.conditioning(image_tokens)
        with torch.no_grad():
            text = self.text_features(categories, c.detach())
        return adapter_loss(self.similarity(c, text), labels, self.config.adapter_temperature)

    def stage2_loss(
        self, pixel_values: torch.Tensor, labels: torch.Tensor, categories: Sequence[Category]
    ) -> AdapterLossTerms:
        """Adapter only (spec 9, stage 2) on a batch; the heads do not run."""
        with torch.no_grad():
            image_tokens = project_tokens(self.clip.visual, self.tower(pixel_values).last)
        return self.stage2_terms(image_tokens, labels, categories)


def _stack_or_empty(features: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Stack head outputs on dim 1; (B, 0, N, D) when a layer list gives no MMCI head."""
    if features:
        return torch.stack(features, dim=1)
    return like.new_zeros(like.shape[0], 0, *like.shape[1:])
