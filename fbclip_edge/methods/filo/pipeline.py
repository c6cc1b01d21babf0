"""FiLo at test time as four networks with host steps between them (spec 0 and 13).

FiLo's text features depend on the image, so they cannot be frozen into the vision graph as
FB-CLIP's are. Deployment runs four networks, each on whatever runtime the artifacts name:

    grounding(gd_pixels, caption ids)   -> raw logits (Q, L), boxes (Q, 4)     one image
    vision(pixels)                      -> c (B, D), head features (B, M, N, D)
    text(prompt embeddings, end index)  -> prompt features (P, D)              one image
    score(head features, T, c)          -> image score (B,), A (B, S, S)

and the host does what is cheap and data-dependent: the caption's BERT ids, the box filter,
phrases and position word (boxes.locate), the prompt embeddings [E0, ctx + meta_net(c),
E13..] from the category's token embeddings, the aggregation into T, and the box step.
`TorchStages` runs the networks on the FiLo model itself; `runtime.filo` runs exported
graphs. `FiLoPipeline.run` is the same host code for both, so an exported deployment can
only differ from the model by what its graphs compute.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn

from fbclip_edge.errors import FBClipError
from fbclip_edge.methods.filo import maps as map_ops
from fbclip_edge.methods.filo.boxes import BertVocab, BoxResult, apply_boxes, grounding_caption
from fbclip_edge.methods.filo.boxes import locate as locate_boxes
from fbclip_edge.methods.filo.config import FiLoConfig
from fbclip_edge.methods.filo.descriptions import CategoryData
from fbclip_edge.methods.filo.text import CategoryPrompts, PromptLearner, aggregate
from fbclip_edge.methods.filo.text import build_category_prompts as _build_prompts

#: Stage names, in the order they run (bench rows time each apart).
STAGES = ("grounding", "vision", "text", "score", "host")


class FiLoStages(Protocol):
    """FiLo's four networks on one runtime (torch, onnxruntime, ...)."""

    def grounding(
        self, gd_pixels: torch.Tensor, input_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One image (1, 3, h, w) and its caption's ids (1, L) -> logits (Q, L), boxes (Q, 4)."""
        ...

    def vision(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> conditioning c (B, D), adapter applied, and head features
        (B, M, N, D)."""
        ...

    def text(self, prompts: torch.Tensor, end_index: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings (P, L, Dt) and each prompt's end-token position (P,) -> (P, D)."""
        ...

    def score(
        self, head_features: torch.Tensor, text: torch.Tensor, conditioning: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Head features (B, M, N, D), T (B, 2, D), c (B, D) -> score (B,), A (B, S, S)."""
        ...


@dataclass
class CategoryText:
    """What is constant per category (spec 11): token embeddings of every prompt, the
    end-token positions, and the Grounding DINO caption's BERT ids."""

    data: CategoryData
    normal: torch.Tensor  # (7, L, Dt) token embeddings E
    abnormal: torch.Tensor  # (n_s * 9, L, Dt), state-major
    normal_end: torch.Tensor  # (7,) int64: argmax of the token ids
    abnormal_end: torch.Tensor  # (n_s * 9,)
    prompts: CategoryPrompts
    caption_ids: list[int] = field(default_factory=list)  # [CLS] ... [SEP]; [] without a vocab


class TokenTable:
    """CLIP token embeddings for the ids the categories use: a sub-table of the model's
    (vocab, Dt) matrix, so exported artifacts need not carry all 49408 rows."""

    def __init__(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        self.ids = ids.long()
        self.rows = rows.float()
        self._index = {int(i): n for n, i in enumerate(self.ids.tolist())}

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, token_ids: torch.Tensor) -> TokenTable:
        """The rows of `embedding` for every distinct id in token_ids."""
        ids = torch.unique(token_ids.long())
        with torch.no_grad():
            return cls(ids, embedding.weight[ids].detach().float().cpu())

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(P, L) ids -> (P, L, Dt) embeddings; an id outside the table is an error."""
        try:
            index = torch.tensor(
                [self._index[int(i)] for i in token_ids.flatten().tolist()], dtype=torch.long
            )
        except KeyError as missing:
            raise FBClipError(
                f"token id {missing} is not in the exported token table; re-export the "
                "artifacts with this descriptions file"
            ) from None
        return self.rows[index].view(*token_ids.shape, -1)


@dataclass
class StageTimes:
    """Seconds spent per stage (summed over calls); bench reports them apart."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start

    def reset(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)


@dataclass
class FiLoResult:
    """One image: the score, the final map (after the box step) and what produced it."""

    image_score: float
    anomaly_map: torch.Tensor  # (S, S) float32, after the box step
    anomaly_map_before_boxes: torch.Tensor  # (S, S): A
    boxes: BoxResult | None  # None when the deployment has no Grounding DINO
    category: str

    @property
    def position(self) -> str | None:
        """The position word that selected the abnormal prompts, or None."""
        return None if self.boxes is None else self.boxes.position


@dataclass
class HostSettings:
    """FiLo's host-side constants (from the model config and spec 8.3)."""

    image_size: int
    n_ctx: int
    context_length: int
    outside_box_factor: float = 0.7
    box_threshold: float = 0.25
    text_threshold: float = 0.25
    area_threshold: float = 0.7

    @classmethod
    def from_config(cls, config: FiLoConfig, context_length: int) -> HostSettings:
        return cls(
            image_size=config.image_size,
            n_ctx=config.n_ctx,
            context_length=context_length,
            outside_box_factor=config.outside_box_factor,
        )


class FiLoHost:
    """The host side: prompt learners, per-category token embeddings, boxes."""

    def __init__(
        self,
        settings: HostSettings,
        normal_learner: PromptLearner,
        abnormal_learner: PromptLearner,
        tokens: TokenTable | nn.Embedding,
        table: Mapping[str, CategoryData],
        vocab: BertVocab | None,
    ) -> None:
        self.settings = settings
        self.normal_learner = normal_learner.eval()
        self.abnormal_learner = abnormal_learner.eval()
        self.tokens = tokens
        self.table = dict(table)
        self.vocab = vocab
        self._cache: dict[str, CategoryText] = {}

    def category(self, name: str) -> CategoryText:
        """The category's constant text, built once; unknown names list the known ones."""
        if name not in self._cache:
            data = self.table.get(name)
            if data is None:
                known = ", ".join(sorted(self.table)) or "none"
                raise FBClipError(
                    f"category {name!r} is not in the descriptions file (known: {known}); "
                    "add it to the file and re-export, or pass one of the known categories"
                )
            self._cache[name] = self._build(data)
        return self._cache[name]

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if isinstance(self.tokens, nn.Embedding):
                return self.tokens(ids.to(self.tokens.weight.device)).float().cpu()
            return self.tokens(ids)

    def _build(self, data: CategoryData) -> CategoryText:
        settings = self.settings
        prompts = _build_prompts(data, settings.n_ctx, settings.context_length)
        caption = grounding_caption(data.grounding_descriptions)
        return CategoryText(
            data=data,
            normal=self._embed(prompts.normal_ids),
            abnormal=self._embed(prompts.abnormal_ids),
            normal_end=prompts.normal_ids.argmax(dim=-1),
            abnormal_end=prompts.abnormal_ids.argmax(dim=-1),
            prompts=prompts,
            caption_ids=self.vocab.encode(caption) if self.vocab is not None else [],
        )

    @torch.no_grad()
    def prompt_batch(
        self, text: CategoryText, conditioning: torch.Tensor, position: str | None
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One image: the prompt embeddings of the 7 normal prompts and the abnormal ones
        that enter the average (spec 4.5), their end positions, and the normal count."""
        c = conditioning.reshape(1, -1).float().cpu()
        rows = text.prompts.abnormal_rows(position)
        normal = self.normal_learner(text.normal, c)
        abnormal = self.abnormal_learner(text.abnormal[rows], c)
        ends = torch.cat([text.normal_end, text.abnormal_end[rows]])
        return torch.cat([normal, abnormal]), ends, int(normal.shape[0])

    def locate(self, text: CategoryText, logits: torch.Tensor, boxes: torch.Tensor) -> BoxResult:
        """Spec 8.3-8.5 on one image's raw Grounding DINO outputs."""
        if self.vocab is None:
            raise FBClipError("this deployment has no BERT vocabulary for Grounding DINO")
        s = self.settings
        return locate_boxes(
            logits,
            boxes,
            text.caption_ids,
            self.vocab,
            text.data.grounding_descriptions,
            image_size=s.image_size,
            box_threshold=s.box_threshold,
            text_threshold=s.text_threshold,
            area_threshold=s.area_threshold,
        )


class FiLoPipeline:
    """Stages + host: frames' CLIP pixels, Grounding DINO pixels and categories -> results."""

    def __init__(self, stages: FiLoStages, host: FiLoHost, use_boxes: bool = True) -> None:
        self.stages = stages
        self.host = host
        self.use_boxes = use_boxes
        self.times = StageTimes()

    @property
    def image_size(self) -> int:
        return self.host.settings.image_size

    def _boxes(
        self, gd_pixels: Sequence[torch.Tensor] | None, texts: list[CategoryText]
    ) -> list[BoxResult] | None:
        if not self.use_boxes:
            return None
        if gd_pixels is None or len(gd_pixels) != len(texts):
            raise FBClipError(
                "FiLo with Grounding DINO needs one Grounding DINO input per image "
                "(methods.filo.grounding.gd_preprocess of the original frame)"
            )
        found = []
        for pixels, text in zip(gd_pixels, texts, strict=True):
            ids = torch.tensor([text.caption_ids], dtype=torch.long)
            with self.times.timed("grounding"):
                logits, boxes = self.stages.grounding(pixels.reshape(1, *pixels.shape[-3:]), ids)
            with self.times.timed("host"):
                found.append(self.host.locate(text, logits, boxes))
        return found

    def _text(
        self, texts: list[CategoryText], c: torch.Tensor, positions: list[str | None]
    ) -> torch.Tensor:
        rows = []
        for i, text in enumerate(texts):
            with self.times.timed("host"):
                prompts, ends, count = self.host.prompt_batch(text, c[i], positions[i])
            with self.times.timed("text"):
                features = self.stages.text(prompts, ends).float().cpu()
            with self.times.timed("host"):
                rows.append(aggregate(features[:count], features[count:]))
        return torch.stack(rows)

    @torch.no_grad()
    def run(
        self,
        pixels: torch.Tensor,
        categories: Sequence[str],
        gd_pixels: Sequence[torch.Tensor] | None = None,
    ) -> list[FiLoResult]:
        """pixels (B, 3, S, S) as fbclip_edge.preprocess makes them, one category name per
        image and (with boxes) each image's Grounding DINO input (1, 3, h, w)."""
        count = int(pixels.shape[0])
        if len(categories) != count:
            raise FBClipError(f"{count} images but {len(categories)} categories; give one each")
        texts = [self.host.category(name) for name in categories]
        found = self._boxes(gd_pixels, texts)
        with self.times.timed("vision"):
            c, heads = self.stages.vision(pixels)
        c = c.float().cpu()
        positions: list[str | None] = [None] * count
        if found is not None:
            positions = [b.position for b in found]
        text = self._text(texts, c, positions)
        with self.times.timed("score"):
            score, amap = self.stages.score(heads, text.to(heads.device), c.to(heads.device))
        score, amap = score.float().cpu(), amap.float().cpu()
        results = []
        factor = self.host.settings.outside_box_factor
        with self.times.timed("host"):
            for i in range(count):
                final = amap[i]
                if found is not None:
                    final = apply_boxes(amap[i], found[i].boxes_final, factor)
                results.append(
                    FiLoResult(
                        image_score=float(score[i]),
                        anomaly_map=final,
                        anomaly_map_before_boxes=amap[i],
                        boxes=found[i] if found is not None else None,
                        category=categories[i],
                    )
                )
        return results


    def run_frames(
        self, frames: Sequence[np.ndarray], categories: Sequence[str]
    ) -> list[FiLoResult]:
        """RGB uint8 frames (H, W, 3) -> results: CLIP input by spec 1.1 (PIL bicubic to
        S x S), Grounding DINO input by spec 1.2 from the same frame, one call per frame."""
        from fbclip_edge.preprocess import preprocess

        with self.times.timed("host"):
            pixels = preprocess(list(frames), self.image_size)
            gd_pixels = None
            if self.use_boxes:
                from fbclip_edge.methods.filo.grounding import gd_preprocess

                gd_pixels = [gd_preprocess(frame) for frame in frames]
        return self.run(pixels, categories, gd_pixels)


def score_maps(
    head_features: torch.Tensor,
    text: torch.Tensor,
    conditioning: torch.Tensor,
    image_size: int,
    logit_scale: float,
    blur_sigma: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The score stage as plain torch (spec 5, 7): image score (B,) and A (B, S, S); also the
    body of the exported score graph."""
    similarity = map_ops.global_similarity(conditioning, text)
    logits = torch.stack(
        [
            map_ops.similarity_logits(head_features[:, m], text, logit_scale)
            for m in range(int(head_features.shape[1]))
        ],
        dim=1,
    )
    amap = map_ops.anomaly_map(logits, image_size, blur_sigma)
    return map_ops.image_score(similarity, amap), amap
