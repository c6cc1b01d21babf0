"""Training FiLo (docs/filo-spec.md section 9): two stages on an auxiliary dataset's test split,
CLIP frozen, one resumable model folder per epoch.

Stage 1 trains the heads and both prompt learners on the map losses (no adapter, no position
word); stage 2 trains the adapter alone on the cross-entropy of s / 0.07. Where this differs
from the published train.py, on purpose:
- shuffling and the MVTec mosaic are seeded (the reference sets no seed): the order comes from
  (seed, stage, epoch) and each item's mosaic draw from (seed, stage, epoch, index), so a run
  resumed from any epoch folder continues exactly like an uninterrupted one;
- a checkpoint is written after every epoch of both stages (the reference writes only after
  stage-2 epochs, and as published crashes on that line, spec 9 [ref quirk]).
Kept from the reference: batch 1, AdamW (betas 0.5/0.999, weight decay 0.01), per-image losses,
the mosaic's quirks (defect folder drawn first, then a file; the item keeps its own label) and
the class-word sharing of the prompt descriptions (spec 4.1), which `share_class_words=False`
turns off.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from open_clip.model import CLIP
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from fbclip_edge.checkpoint import atomic_directory
from fbclip_edge.clip.backbone import BUILTIN_BACKBONES, backbone_config, build_clip
from fbclip_edge.clip.config import BackboneConfig
from fbclip_edge.data import Sample, detect_layout, load_dataset, read_image, read_mask
from fbclip_edge.data.layouts import LayoutKind
from fbclip_edge.errors import FBClipError
from fbclip_edge.fileio import write_text_atomic
from fbclip_edge.methods.filo import METHOD_INFO, FiLo, FiLoConfig
from fbclip_edge.methods.filo.descriptions import (
    CategoryData,
    category_data,
    load_descriptions,
    share_by_class_word,
)
from fbclip_edge.methods.filo.losses import AdapterLossTerms, MapLossTerms
from fbclip_edge.methods.filo.model import clip_backbone
from fbclip_edge.preprocess import preprocess
from fbclip_edge.train import (
    HISTORY_FILE,
    LAST_LINK,
    RANDOM_WEIGHTS,
    STATE_FILE,
    _point_last,
    _Progress,
    _rng_state,
    _set_rng_state,
    seed_everything,
)

if TYPE_CHECKING:  # folder.py and grounding.py are imported where used (transformers)
    from fbclip_edge.methods.filo.folder import FiLoFolder
    from fbclip_edge.methods.filo.grounding import GroundingDetector

STATE_FORMAT = "fbclip-edge-filo-train-state"
STATE_VERSION = 1
#: Spec 9: on MVTec AD an item becomes a 2 x 2 mosaic with this probability.
MOSAIC_PROBABILITY = 0.2
#: Learned parts per optimizer group (spec 9, 11); CLIP is in none of them.
HEADS = ("decoder_linear.", "decoder_cov.")
PROMPT_LEARNERS = ("normal_prompt_learner.", "abnormal_prompt_learner.")
ADAPTER = ("adapter.",)
Stage = Literal[1, 2]

_STAGE1 = METHOD_INFO.stage1
_STAGE2 = METHOD_INFO.stage2


@dataclass
class FiLoTrainConfig:
    """One FiLo run; the defaults are the published recipe (spec 9, `METHOD_INFO`).

    epochs counts stage 1 and adapter_epochs stage 2 (either may be 0, not both). The
    architecture fields (backbone, pretrained, clip_weights, image_size, feature_layers) build
    a fresh model; `init` (an official {"filo": ...} checkpoint or a FiLo folder) and `resume`
    fix the architecture instead.
    """

    data: Path
    out: Path
    descriptions: Path
    dataset: LayoutKind = "auto"
    split: str = "test"
    categories: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    init: Path | None = None
    backbone: str = "ViT-L-14-336"  # open_clip name, "tiny" or a BackboneConfig JSON file
    pretrained: str | None = "openai"
    clip_weights: Path | None = None
    image_size: int | None = None  # fresh model: the recipe's 518; init: the checkpoint's
    feature_layers: tuple[int, ...] | None = None
    epochs: int = _STAGE1.epochs
    adapter_epochs: int = _STAGE2.epochs
    batch_size: int = _STAGE1.batch_size
    lr: float = _STAGE1.lr  # stage 1: linear and MMCI heads
    prompt_lr: float = METHOD_INFO.stage1_prompt_lr  # stage 1: both prompt learners
    adapter_lr: float = _STAGE2.lr  # stage 2
    betas: tuple[float, float] = _STAGE1.betas
    weight_decay: float = 0.01  # torch's AdamW default, which the reference keeps
    mosaic: bool = True  # MVTec-layout data only (spec 9)
    share_class_words: bool = True  # spec 4.1 quirk: shared class words take the last list
    seed: int = _STAGE1.seed
    device: str | None = None
    num_workers: int = 0
    max_steps: int | None = None
    resume: Path | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.data, self.out, self.descriptions = (
            Path(self.data),
            Path(self.out),
            Path(self.descriptions),
        )
        for name in ("init", "clip_weights", "resume"):
            value = getattr(self, name)
            setattr(self, name, None if value is None else Path(value))
        if self.categories is not None:
            self.categories = tuple(self.categories)
        self.exclude = tuple(self.exclude)
        if self.feature_layers is not None:
            self.feature_layers = tuple(int(k) for k in self.feature_layers)
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        self.validate()

    def validate(self) -> None:
        """Reject impossible settings before any data is read or weights are loaded."""
        checks = (
            (self.epochs >= 0, f"--epochs must be >= 0, got {self.epochs}"),
            (self.adapter_epochs >= 0, f"--adapter-epochs must be >= 0, got {self.adapter_epochs}"),
            (
                self.epochs + self.adapter_epochs >= 1,
                "--epochs and --adapter-epochs are both 0: nothing to train",
            ),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (
                min(self.lr, self.prompt_lr, self.adapter_lr) > 0,
                f"learning rates must be positive, got --lr {self.lr}, --prompt-lr "
                f"{self.prompt_lr}, --adapter-lr {self.adapter_lr}",
            ),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (self.seed >= 0, f"--seed must be >= 0, got {self.seed}"),
            (self.num_workers >= 0, f"--num-workers must be >= 0, got {self.num_workers}"),
            (
                self.max_steps is None or self.max_steps >= 1,
                f"--max-steps must be at least 1, got {self.max_steps}",
            ),
            (
                self.init is None or self.resume is None,
                "--init and --resume both given: a resumed run keeps its own weights; drop --init",
            ),
        )
        for ok, message in checks:
            if not ok:
                raise FBClipError(message)

    def stage_epochs(self, stage: Stage) -> int:
        """Epochs of a stage."""
        return self.epochs if stage == 1 else self.adapter_epochs

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (paths as strings), stored with every checkpoint."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


@dataclass
class StepLog:
    """One optimizer step as history.json lists it."""

    stage: int
    epoch: int
    step: int  # within the epoch, from 0
    global_step: int  # over the whole run, from 0, before this step's update
    images: list[str]
    mosaic: list[bool]
    losses: dict[str, float]


@dataclass
class FiLoEpochLog:
    """Mean loss terms of one epoch of one stage."""

    stage: int
    epoch: int
    steps: int
    images: int
    seconds: float
    losses: dict[str, float]


@dataclass
class FiLoTrainResult:
    """Where the run left its checkpoints, and what the losses did."""

    out: Path
    checkpoints: list[Path]
    last: Path
    history: list[FiLoEpochLog] = field(default_factory=list)
    steps: list[StepLog] = field(default_factory=list)
    global_step: int = 0
    seconds: float = 0.0


# --------------------------------------------------------------------------- data


def mosaic(
    images: Sequence[np.ndarray], masks: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Four images (H, W, 3) uint8 and masks (H, W) -> a 2 x 2 mosaic (2H, 2W) of each.

    Tile i goes to row i // 2, column i % 2 (the reference's paste order). Tiles are pasted
    at the first one's size; one of another size is resized to it first (the reference pastes
    it as is, which overlaps or leaves gaps; MVTec AD's images of a category share a size).
    """
    if len(images) != 4 or len(masks) != 4:
        raise FBClipError(f"a mosaic takes 4 images and 4 masks, got {len(images)}, {len(masks)}")
    height, width = int(images[0].shape[0]), int(images[0].shape[1])
    canvas = np.zeros((2 * height, 2 * width, 3), dtype=np.uint8)
    target = np.zeros((2 * height, 2 * width), dtype=np.float32)
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        if image.shape[:2] != (height, width):
            image = np.asarray(
                Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC)
            )
        if mask.shape != (height, width):
            mask = _resize_binary(mask, (width, height), Image.Resampling.NEAREST)
        row, col = divmod(i, 2)
        canvas[row * height : (row + 1) * height, col * width : (col + 1) * width] = image
        target[row * height : (row + 1) * height, col * width : (col + 1) * width] = mask > 0.5
    return canvas, target


def _resize_binary(
    mask: np.ndarray, size: tuple[int, int], resample: Image.Resampling
) -> np.ndarray:
    """A {0, 1} mask as 0/255, resized to size (w, h), /255 and cut at 0.5 (spec 1.1)."""
    image = Image.fromarray((mask > 0.5).astype(np.uint8) * 255)
    resized = np.asarray(image.resize(size, resample), dtype=np.float32) / 255.0
    return (resized > 0.5).astype(np.float32)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Spec 1.1: the 0/255 mask resized to S x S with PIL bilinear, /255, then > 0.5."""
    if mask.shape == (size, size):
        return (mask > 0.5).astype(np.float32)
    return _resize_binary(mask, (size, size), Image.Resampling.BILINEAR)


def item_rng(seed: int, stage: int, epoch: int, index: int) -> np.random.Generator:
    """The mosaic draw of one item: independent of workers, order and earlier epochs."""
    return np.random.default_rng([seed, stage, epoch, index])


class FiLoTrainingSet:
    """(pixels (3, S, S), mask (S, S), label, index, mosaic flag) per sample.

    With `mosaic_probability` > 0 an item is replaced, with that probability, by a 2 x 2
    mosaic of four random test images of its category: each tile draws a defect folder
    ("good" included), then an image in it, as the reference does. The label stays the
    original item's [ref quirk].
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int,
        mosaic_probability: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.samples = list(samples)
        self.image_size = image_size
        self.mosaic_probability = mosaic_probability
        self.seed = seed
        self.stage, self.epoch = 1, 1
        self.pools: dict[str, dict[str, list[Sample]]] = {}
        for sample in sorted(self.samples, key=lambda s: str(s.image_path)):
            by_defect = self.pools.setdefault(sample.category, {})
            by_defect.setdefault(sample.defect_type, []).append(sample)

    def set_epoch(self, stage: int, epoch: int) -> None:
        """Which epoch the next pass is (the mosaic draws depend on it)."""
        self.stage, self.epoch = stage, epoch

    def __len__(self) -> int:
        return len(self.samples)

    def tiles(self, category: str, rng: np.random.Generator) -> list[Sample]:
        """Four samples of a category: a defect folder uniformly, then a file in it."""
        pool = self.pools[category]
        defects = sorted(pool)
        chosen = []
        for _ in range(4):
            files = pool[defects[int(rng.integers(len(defects)))]]
            chosen.append(files[int(rng.integers(len(files)))])
        return chosen

    def _read(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        image = read_image(sample.image_path)
        return image, read_mask(sample.mask_path, image.shape[:2])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, float, int, bool]:
        sample = self.samples[index]
        rng = item_rng(self.seed, self.stage, self.epoch, index)
        combined = self.mosaic_probability > 0 and rng.random() < self.mosaic_probability
        if combined:
            parts = [self._read(tile) for tile in self.tiles(sample.category, rng)]
            image, mask = mosaic([p[0] for p in parts], [p[1] for p in parts])
        else:
            image, mask = self._read(sample)
        pixels = preprocess(image, self.image_size)[0]
        target = torch.from_numpy(resize_mask(mask, self.image_size))
        return pixels, target, float(sample.label), index, combined


def training_samples(config: FiLoTrainConfig) -> list[Sample]:
    """The auxiliary split (all categories unless filtered); masks are required."""
    return load_dataset(
        config.data,
        kind=config.dataset,
        split=config.split,
        categories=config.categories,
        exclude=config.exclude,
        require_masks=True,
    )


def category_table(config: FiLoTrainConfig, names: Sequence[str]) -> dict[str, CategoryData]:
    """Each training category's entry from the descriptions file; a missing one is a
    one-line error naming it and the file. Sharing follows the file's order (spec 4.1)."""
    table = load_descriptions(config.descriptions)
    if config.share_class_words:
        table = share_by_class_word(table)
    return {name: category_data(table, name, str(config.descriptions)) for name in names}


def _order_seed(seed: int, stage: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, stage, epoch]).generate_state(1)[0])


def _loader(
    dataset: FiLoTrainingSet, config: FiLoTrainConfig, stage: int, epoch: int
) -> DataLoader:
    """Shuffled by a generator seeded from (seed, stage, epoch)."""
    dataset.set_epoch(stage, epoch)
    return DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=config.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(_order_seed(config.seed, stage, epoch)),
        num_workers=config.num_workers,
        drop_last=False,
    )


# --------------------------------------------------------------------------- model


def _is_json(backbone: str) -> bool:
    return backbone.endswith(".json")


def resolve_backbone(backbone: str) -> BackboneConfig:
    """An open_clip ViT name, a built-in ('tiny') or a JSON file of BackboneConfig fields
    (for architectures whose head count the weights do not show, as `import-official`)."""
    if not _is_json(backbone):
        return backbone_config(backbone)
    path = Path(backbone)
    try:
        return BackboneConfig(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as error:
        raise FBClipError(
            f"--backbone {path}: not a readable BackboneConfig JSON ({error}); write "
            '{"name": ..., "embed_dim": ..., "vision": {...}, "text": {...}}'
        ) from None


def _pretrained_tag(config: FiLoTrainConfig) -> str | None:
    """The open_clip tag actually used: none for a weights file, a built-in, a JSON
    architecture or 'none'."""
    if config.clip_weights is not None or config.backbone in BUILTIN_BACKBONES:
        return None
    if _is_json(config.backbone):
        return None
    if config.pretrained in (None, "", RANDOM_WEIGHTS):
        return None
    return config.pretrained


def new_filo(config: FiLoTrainConfig) -> FiLo:
    """A fresh FiLo (learned parts initialised from the seed) on the requested CLIP weights.

    FiLo's CLIP is rebuilt with the exact GELU and the positional embedding resized
    bicubically to the image size (spec 2.1); without weights ('none', 'tiny') it is random.
    """
    image_size = config.image_size or _STAGE1.image_size
    tag = _pretrained_tag(config)
    if config.clip_weights is None and tag is None:
        filo_config = FiLoConfig(
            backbone=resolve_backbone(config.backbone),
            image_size=image_size,
            feature_layers=config.feature_layers or (),
        )
        torch.manual_seed(config.seed)
        return FiLo(filo_config)
    from fbclip_edge.clip.weights import load_clip

    loaded, arch = load_clip(config.backbone, tag, config.clip_weights)
    filo_config = FiLoConfig(
        backbone=arch, image_size=image_size, feature_layers=config.feature_layers or ()
    )
    clip = _filo_clip(filo_config, loaded.state_dict())
    del loaded
    torch.manual_seed(config.seed)
    return FiLo(filo_config, clip)


def _filo_clip(config: FiLoConfig, weights: Mapping[str, torch.Tensor]) -> CLIP:
    """FiLo's CLIP (exact GELU, image_size) holding `weights`, every tensor from them."""
    from fbclip_edge.checkpoint import skip_weight_init
    from fbclip_edge.methods.filo.importer import resize_positional_embedding

    state = {k: v.detach().float() for k, v in weights.items()}
    pos = state["visual.positional_embedding"]
    state["visual.positional_embedding"] = resize_positional_embedding(pos, config.grid_size)
    with skip_weight_init():  # every parameter comes from the weights (checked below)
        clip = build_clip(clip_backbone(config))
    result = clip.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise FBClipError(
            f"CLIP weights do not fit FiLo's CLIP: missing {result.missing_keys[:6]}, "
            f"unexpected {result.unexpected_keys[:6]}; pass OpenAI-layout ViT weights"
        )
    return clip


@dataclass
class StartModel:
    """The model a run starts from, and what to record about where it came from."""

    model: FiLo
    origin: dict[str, Any]
    grounding: GroundingDetector | None = None  # an init folder's, kept in every checkpoint
    bert_dir: Path | None = None


def start_model(config: FiLoTrainConfig) -> StartModel:
    """--init (a FiLo folder or an official checkpoint) or a fresh model."""
    from fbclip_edge.methods.filo.folder import is_filo_folder, load_filo
    from fbclip_edge.methods.filo.importer import import_official

    init = config.init
    if init is None:
        origin: dict[str, Any] = (
            {"clip_weights": str(config.clip_weights)}
            if config.clip_weights is not None
            else {"backbone": config.backbone, "pretrained": _pretrained_tag(config)}
        )
        return StartModel(new_filo(config), origin)
    if is_filo_folder(init):
        loaded = load_filo(init)
        return StartModel(loaded.model, {"init": str(init)}, *_grounding_of(loaded))
    if init.is_dir():
        raise FBClipError(
            f"--init {init} is a folder but not a FiLo model folder; pass a FiLo folder or an "
            "official {'filo': ...} checkpoint file"
        )
    if not init.is_file():
        raise FBClipError(f"--init {init} not found; check the path")
    model, _ = import_official(
        init,
        clip_weights=config.clip_weights,
        image_size=config.image_size,
        feature_layers=config.feature_layers,
        backbone=resolve_backbone(config.backbone),
    )
    return StartModel(model, {"init": str(init)})


def _grounding_of(loaded: FiLoFolder) -> tuple[GroundingDetector | None, Path | None]:
    """The detector of a loaded FiLo folder and its BERT folder, carried into every
    checkpoint so the trained folder keeps the box prior."""
    from fbclip_edge.methods.filo.folder import BERT_DIR

    if loaded.detector is None:
        return None, None
    return loaded.detector, loaded.path / BERT_DIR


def stage_parameters(model: nn.Module, stage: Stage) -> list[list[tuple[str, nn.Parameter]]]:
    """Optimizer groups: stage 1 heads, then prompt learners; stage 2 the adapter."""
    prefixes = [HEADS, PROMPT_LEARNERS] if stage == 1 else [ADAPTER]
    named = list(model.named_parameters())
    groups = [[(n, p) for n, p in named if n.startswith(group)] for group in prefixes]
    for group, names in zip(groups, prefixes, strict=True):
        if not group:
            raise FBClipError(f"the model has no parameters under {names}; is it a FiLo?")
        frozen = [n for n, p in group if not p.requires_grad]
        if frozen:
            raise FBClipError(f"learned FiLo parameters are frozen: {frozen[:3]}")
    if any(n.startswith("clip.") for group in groups for n, _ in group):
        raise FBClipError("CLIP parameters would be trained; CLIP must stay frozen")
    return groups


def stage_optimizer(
    model: nn.Module, stage: Stage, config: FiLoTrainConfig
) -> tuple[torch.optim.AdamW, list[str]]:
    """AdamW of a stage (spec 9) and the names of its parameters, group by group."""
    groups = stage_parameters(model, stage)
    rates = [config.lr, config.prompt_lr] if stage == 1 else [config.adapter_lr]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for _, p in group], "lr": rate}
            for group, rate in zip(groups, rates, strict=True)
        ],
        betas=config.betas,
        weight_decay=config.weight_decay,
        eps=1e-8,
    )
    return optimizer, [n for group in groups for n, _ in group]


# --------------------------------------------------------------------------- the loop


def training_step(
    model: FiLo,
    stage: Stage,
    pixels: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
    categories: Sequence[CategoryData],
) -> MapLossTerms | AdapterLossTerms:
    """One batch's loss terms of a stage (no backward)."""
    if stage == 1:
        return model.stage1_loss(pixels, masks, categories)
    return model.stage2_loss(pixels, labels, categories)


@dataclass
class _Run:
    """Mutable state of a run: what a checkpoint must capture to continue exactly.

    (stage, epoch) is the last finished epoch; (1, 0) before the first.
    """

    model: FiLo
    table: dict[str, CategoryData]
    origin: dict[str, Any]
    stage: Stage = 1
    epoch: int = 0
    global_step: int = 0
    optimizer: torch.optim.AdamW | None = None
    names: list[str] = field(default_factory=list)
    history: list[FiLoEpochLog] = field(default_factory=list)
    steps: list[StepLog] = field(default_factory=list)
    grounding: GroundingDetector | None = None
    bert_dir: Path | None = None

    def next_epoch(self, config: FiLoTrainConfig) -> tuple[Stage, int] | None:
        """The (stage, epoch) to train next, or None when the run is complete."""
        if self.stage == 1 and self.epoch < config.epochs:
            return 1, self.epoch + 1
        if config.adapter_epochs == 0:
            return None
        if self.stage == 1:
            return 2, 1
        return (2, self.epoch + 1) if self.epoch < config.adapter_epochs else None


def read_filo_state(folder: Path) -> dict[str, Any]:
    """A FiLo epoch folder's train_state.pt, with one-line errors."""
    path = folder / STATE_FILE
    if not path.is_file():
        raise FBClipError(
            f"{folder} has no {STATE_FILE}; resume from an epoch folder written by "
            "`fbclip-edge train --method filo` (e.g. OUT/last)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise FBClipError(
            f"cannot read {path} ({type(error).__name__}); it is truncated: resume from an "
            "earlier epoch folder"
        ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise FBClipError(
            f"{path} is not a FiLo training state; resume FB-CLIP/AnomalyCLIP runs without "
            "--method filo"
        )
    if state.get("format_version") != STATE_VERSION:
        raise FBClipError(
            f"{path} is FiLo training-state v{state.get('format_version')}; this fbclip-edge "
            f"resumes v{STATE_VERSION}: train again"
        )
    return state


def _build_run(config: FiLoTrainConfig, categories: Sequence[str]) -> _Run:
    """A new run, or one restored from config.resume (model, optimizer, RNG, stage, epoch)."""
    table = category_table(config, categories)
    if config.resume is None:
        start = start_model(config)
        run = _Run(start.model, table, start.origin, grounding=start.grounding)
        run.bert_dir = start.bert_dir
        return run
    from fbclip_edge.methods.filo.folder import load_filo

    state = read_filo_state(config.resume)
    loaded = load_filo(config.resume)
    detector, bert = _grounding_of(loaded)
    run = _Run(loaded.model, table, dict(state["origin"]), grounding=detector, bert_dir=bert)
    run.stage, run.epoch = state["stage"], int(state["epoch"])
    run.global_step = int(state["global_step"])
    run.history = [FiLoEpochLog(**entry) for entry in state["history"]]
    run.steps = [StepLog(**entry) for entry in state["steps"]]
    _set_rng_state(state["rng"])
    following = run.next_epoch(config)
    if following is None:
        raise FBClipError(
            f"{config.resume} already finished stage {run.stage} epoch {run.epoch} of "
            f"--epochs {config.epochs} / --adapter-epochs {config.adapter_epochs}; raise them "
            "to train further"
        )
    if following[0] == run.stage:  # mid-stage: continue with the stored optimizer state
        run.optimizer, run.names = stage_optimizer(run.model, run.stage, config)
        if state["parameter_names"] != run.names:
            raise FBClipError(
                f"{config.resume} was trained with other learned parameters; start a new run"
            )
        rates = [g["lr"] for g in run.optimizer.param_groups]
        run.optimizer.load_state_dict(state["optimizer"])
        for group, rate in zip(run.optimizer.param_groups, rates, strict=True):
            group["lr"], group["betas"] = rate, config.betas  # the current recipe wins
            group["weight_decay"] = config.weight_decay
    return run


def _step_categories(run: _Run, dataset: FiLoTrainingSet, indices: list[int]) -> list:
    return [run.table[dataset.samples[i].category] for i in indices]


def _batches(loader: DataLoader, max_steps: int | None) -> Iterator[Any]:
    for step, batch in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            return
        yield batch


def _train_epoch(
    run: _Run,
    dataset: FiLoTrainingSet,
    config: FiLoTrainConfig,
    device: torch.device,
    progress: _Progress,
) -> FiLoEpochLog:
    """One pass of run.stage over the data (or max_steps batches); returns the mean terms."""
    stage, epoch = run.stage, run.epoch + 1
    assert run.optimizer is not None
    loader = _loader(dataset, config, stage, epoch)
    steps = len(loader) if config.max_steps is None else min(len(loader), config.max_steps)
    _start(progress, f"stage {stage} epoch {epoch}/{config.stage_epochs(stage)}", steps)
    sums: dict[str, float] = {}
    images = 0
    started = time.perf_counter()
    run.model.train()
    for step, (pixels, masks, labels, indices, mosaics) in enumerate(
        _batches(loader, config.max_steps)
    ):
        chosen = [int(i) for i in indices]
        terms = training_step(
            run.model,
            stage,
            pixels.to(device),
            masks.to(device),
            labels.to(device),
            _step_categories(run, dataset, chosen),
        )
        loss = terms.total
        if not torch.isfinite(loss):
            raise FBClipError(
                f"loss became {float(loss)} at stage {stage} step {run.global_step + 1}; "
                "lower the learning rates"
            )
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        values = terms.as_floats()
        run.steps.append(
            StepLog(
                stage,
                epoch,
                step,
                run.global_step,
                [str(dataset.samples[i].image_path) for i in chosen],
                [bool(m) for m in mosaics],
                values,
            )
        )
        run.global_step += 1
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value * len(chosen)
        images += len(chosen)
        progress.advance(values)
    means = {k: v / max(images, 1) for k, v in sums.items()}
    return FiLoEpochLog(stage, epoch, steps, images, round(time.perf_counter() - started, 3), means)


def _start(progress: _Progress, label: str, steps: int) -> None:
    """A progress task labelled with the stage (train.py's bar labels epochs only)."""
    if progress.bar is not None:
        progress.task = progress.bar.add_task(label, total=steps, losses="")


def epoch_folder(out: Path, stage: int, epoch: int) -> Path:
    """OUT/stage1-epoch-001, ..., OUT/stage2-epoch-001, ..."""
    return out / f"stage{stage}-epoch-{epoch:03d}"


def _source(run: _Run, config: FiLoTrainConfig, categories: Sequence[str], layout: str) -> dict:
    return {
        "kind": "trained",
        "method": "filo",
        "data": str(config.data),
        "dataset": layout,
        "split": config.split,
        "stage": run.stage,
        "epoch": run.epoch,
        "global_step": run.global_step,
        "categories": list(categories),
        "excluded": list(config.exclude),
        "recipe": {
            "epochs": config.epochs,
            "adapter_epochs": config.adapter_epochs,
            "lr": config.lr,
            "prompt_lr": config.prompt_lr,
            "adapter_lr": config.adapter_lr,
            "betas": list(config.betas),
            "weight_decay": config.weight_decay,
            "batch_size": config.batch_size,
            "seed": config.seed,
            "mosaic": config.mosaic,
            "share_class_words": config.share_class_words,
            "max_steps": config.max_steps,
        },
        **run.origin,
    }


def _save_checkpoint(
    run: _Run, config: FiLoTrainConfig, categories: Sequence[str], layout: str
) -> Path:
    """FiLo model folder + train_state.pt for the epoch just finished, written atomically."""
    from fbclip_edge.methods.filo.folder import save_filo

    assert run.optimizer is not None
    folder = epoch_folder(config.out, run.stage, run.epoch)
    state = {
        "format": STATE_FORMAT,
        "format_version": STATE_VERSION,
        "stage": run.stage,
        "epoch": run.epoch,
        "global_step": run.global_step,
        "parameter_names": run.names,
        "optimizer": run.optimizer.state_dict(),
        "rng": _rng_state(),
        "history": [asdict(entry) for entry in run.history],
        "steps": [asdict(entry) for entry in run.steps],
        "origin": run.origin,
        "config": config.to_dict(),
    }
    with atomic_directory(folder) as staging:
        save_filo(
            staging,
            run.model,
            config.descriptions,
            grounding=run.grounding,
            bert_dir=run.bert_dir,
            source=_source(run, config, categories, layout),
        )
        torch.save(state, staging / STATE_FILE)
    return folder


def _write_history(out: Path, run: _Run, config: FiLoTrainConfig) -> None:
    """history.json: the config, per-epoch means and per-step terms, replaced atomically."""
    payload = {
        "config": config.to_dict(),
        "epochs": [asdict(entry) for entry in run.history],
        "steps": [asdict(entry) for entry in run.steps],
    }
    write_text_atomic(out / HISTORY_FILE, json.dumps(payload, indent=2) + "\n")


def _check_prompts(model: FiLo, table: Mapping[str, CategoryData]) -> None:
    """Build every category's prompts now, so a too-long description fails before training."""
    for data in table.values():
        model.category_prompts(data)


def train_filo(config: FiLoTrainConfig) -> FiLoTrainResult:
    """Train (or resume) FiLo: OUT/stage{1,2}-epoch-NNN/ per epoch, OUT/last, OUT/history.json.

    Each epoch folder is a FiLo model folder (`load_filo` reads it) plus train_state.pt
    (optimizer, RNG, stage, epoch, logs), so `resume=OUT/<folder>` continues exactly there,
    within a stage or across the stage boundary.
    """
    started = time.perf_counter()
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    samples = training_samples(config)
    layout = detect_layout(config.data) if config.dataset == "auto" else config.dataset
    categories = sorted({s.category for s in samples})
    seed_everything(config.seed)
    run = _build_run(config, categories)
    run.model.to(device)
    _check_prompts(run.model, run.table)
    rate = MOSAIC_PROBABILITY if config.mosaic and layout == "mvtec" else 0.0
    dataset = FiLoTrainingSet(samples, run.model.config.image_size, rate, config.seed)
    config.out.mkdir(parents=True, exist_ok=True)
    checkpoints: list[Path] = []
    with _Progress(config.progress) as progress:
        while (following := run.next_epoch(config)) is not None:
            stage, epoch = following
            if run.optimizer is None or stage != run.stage:
                run.optimizer, run.names = stage_optimizer(run.model, stage, config)
            run.stage, run.epoch = stage, epoch - 1
            log = _train_epoch(run, dataset, config, device, progress)
            run.epoch = log.epoch
            run.history.append(log)
            checkpoints.append(_save_checkpoint(run, config, categories, layout))
            _point_last(config.out, checkpoints[-1])
            _write_history(config.out, run, config)
    return FiLoTrainResult(
        out=config.out,
        checkpoints=checkpoints,
        last=config.out / LAST_LINK,
        history=run.history,
        steps=run.steps,
        global_step=run.global_step,
        seconds=round(time.perf_counter() - started, 3),
    )
