"""The method protocol: what every zero-shot method gives the rest of the toolkit.

Everything downstream of a method (train, eval, export, runtime, the line, bench) sees a
model only through `AnomalyModel` and the method's `MethodSpec`: the vision graph
(pixels -> M projected token maps), the frozen text features (2, D), per-map weights and
the scoring rule that the fused kernels apply. A method's internals stay in its package.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import nn

from fbclip_edge.clip.config import BackboneConfig
from fbclip_edge.errors import FBClipError

#: "logit_sum": weight and sum the per-map logits, then one 2-way softmax (FB-CLIP); the
#: image score is the CLS row of that. "prob_sum": a 2-way softmax per map, then the
#: weighted sum of the abnormal probabilities (AnomalyCLIP's per-layer maps); the image
#: score is the softmax of map 0's CLS row (where the method puts its global feature).
RuleKind = Literal["logit_sum", "prob_sum"]
RULE_KINDS: tuple[str, ...] = ("logit_sum", "prob_sum")


@dataclass(frozen=True)
class ScoringRule:
    """How projected maps and the two text vectors become an image score and a patch map."""

    kind: RuleKind
    temperature: float


@dataclass
class ModelOutput:
    """image_score (B,) and patch_map (B, 1, g, g): abnormal probabilities, float32."""

    image_score: torch.Tensor
    patch_map: torch.Tensor
    maps: torch.Tensor | None = None


class MethodConfig(Protocol):
    """What downstream code reads from any method's config."""

    backbone: BackboneConfig
    image_size: int
    feature_layers: tuple[int, ...]

    @property
    def grid_size(self) -> int: ...

    @property
    def num_maps(self) -> int: ...

    def to_dict(self) -> dict[str, Any]: ...


class TrainLoss(Protocol):
    """One batch's loss: the value to backpropagate and its named terms for logs."""

    @property
    def total(self) -> torch.Tensor: ...

    def as_floats(self) -> dict[str, float]: ...


class AnomalyModel(nn.Module, ABC):
    """A frozen CLIP plus a method's learned parts, split for export.

    Subclasses set `method` and `config` and implement the abstract methods; `score`,
    `forward` and `text_features` are shared, so every method scores through the same
    fused kernels.
    """

    method: ClassVar[str]
    config: Any  # the method's config dataclass (a MethodConfig)
    text_frozen: bool
    text_features_frozen: torch.Tensor

    @property
    @abstractmethod
    def scoring(self) -> ScoringRule:
        """The rule the fused kernels apply to this model's maps."""

    @abstractmethod
    def encode_text(self) -> torch.Tensor:
        """Text features (2, D) [normal, abnormal] from the learned parts (differentiable)."""

    @abstractmethod
    def encode_maps(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, S, S) -> projected token maps (B, M, T, D): the vision graph."""

    @abstractmethod
    def map_weights(self) -> torch.Tensor:
        """(M,) weight of each map in the scoring rule."""

    @abstractmethod
    def training_loss(
        self, pixels: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor
    ) -> TrainLoss:
        """The method's training loss on one batch (CLIP frozen, learned parts trainable)."""

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

    def train(self, mode: bool = True) -> AnomalyModel:
        """Switching to eval freezes the text features from the current weights."""
        super().train(mode)
        clip = getattr(self, "clip", None)
        if isinstance(clip, nn.Module):
            clip.eval()  # frozen backbone: no dropout, even while the learned parts train
        if not mode:
            self.freeze_text()
        return self

    def score(
        self, maps: torch.Tensor, text_features: torch.Tensor | None = None, impl: str = "auto"
    ) -> ModelOutput:
        """Projected maps (B, M, T, D) -> image score (B,) and patch map (B, 1, g, g).

        impl picks the fused kernel ('auto': Triton on CUDA at inference, torch otherwise).
        """
        from fbclip_edge.kernels import score_maps

        text = self.text_features if text_features is None else text_features
        rule = self.scoring
        image_score, patch_prob = score_maps(
            maps, text, self.map_weights(), rule.temperature, impl=impl, rule=rule.kind
        )
        side = round(int(patch_prob.shape[1]) ** 0.5)  # int(): a constant when traced for ONNX
        return ModelOutput(image_score, patch_prob.reshape(-1, 1, side, side))

    def forward(self, pixel_values: torch.Tensor, return_maps: bool = False) -> ModelOutput:
        """pixel_values (B, 3, S, S) normalized as `fbclip_edge.preprocess` makes them."""
        maps = self.encode_maps(pixel_values)
        output = self.score(maps)
        if return_maps:
            output.maps = maps
        return output


@dataclass(frozen=True)
class TrainRecipe:
    """A method's published training recipe: the defaults of `fbclip-edge train`."""

    lr: float
    betas: tuple[float, float]
    batch_size: int
    epochs: int
    seed: int
    image_size: int = 518


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one image's forward pass (text side excluded: it is frozen)."""

    backbone: int
    heads: int

    @property
    def total(self) -> int:
        """Backbone plus heads."""
        return self.backbone + self.heads


@dataclass(frozen=True)
class MethodSpec:
    """A method's entry in the registry: how to build, import, train and count it."""

    name: str
    title: str
    model_cls: type[AnomalyModel]
    config_from_dict: Callable[[dict[str, Any]], Any]
    new_config: Callable[..., Any]  # (backbone, image_size=..., feature_layers=..., **kw)
    import_official: Callable[..., tuple[AnomalyModel, dict[str, Any]]]  # (model, source)
    looks_like: Callable[[Mapping[str, Any]], bool]  # is this loaded checkpoint ours?
    flops: Callable[..., FlopCount]  # (config, image_size=None)
    recipe: TrainRecipe
    import_hint: str  # the import-official command line that fits this method's checkpoints
    extra: dict[str, Any] = field(default_factory=dict)

    def build(self, config: Any, clip: nn.Module | None = None) -> AnomalyModel:
        """A model from its config (CLIP random or given)."""
        return self.model_cls(config, clip)


def config_kwargs(cls: type, data: Mapping[str, Any], what: str = "") -> dict[str, Any]:
    """A method config's to_dict() output back to constructor arguments: the backbone
    rebuilt, lists as tuples; unknown keys are an error so typos do not pass silently."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise FBClipError(f"config.json has unknown {what}settings {unknown}; remove them")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    values["backbone"] = BackboneConfig(**data["backbone"])
    return values


def method_of_folder(config_json: Mapping[str, Any]) -> str:
    """The method a model folder's config.json names; folders from before methods: fbclip."""
    return str(config_json.get("method", "fbclip"))


PathLike = str | Path
