"""Training FB-CLIP on an auxiliary dataset (spec section 7): frozen CLIP, Adam, four losses,
one resumable checkpoint folder per epoch."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fbclip_edge.checkpoint import atomic_directory, load, save_model
from fbclip_edge.clip.backbone import BUILTIN_BACKBONES
from fbclip_edge.data import Sample, detect_layout, load_dataset, read_image, read_mask
from fbclip_edge.data.layouts import LayoutKind
from fbclip_edge.errors import FBClipError
from fbclip_edge.factory import create_model
from fbclip_edge.fileio import write_text_atomic
from fbclip_edge.methods import get_method
from fbclip_edge.methods.base import AnomalyModel, TrainLoss
from fbclip_edge.preprocess import preprocess

STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"
LAST_LINK = "last"
STATE_FORMAT = "fbclip-edge-train-state"
STATE_VERSION = 1
LOSS_NAMES = ("focal_image", "focal_pixel", "dice", "scr", "total")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RANDOM_WEIGHTS = "none"  # --pretrained none: random CLIP weights (smoke tests only)


@dataclass
class TrainConfig:
    """One training run; the defaults are the paper recipe (spec section 7).

    The zero-shot protocol trains on the auxiliary dataset's test split (it has anomalies and
    masks) and evaluates on another dataset. Architecture fields (backbone, weights,
    image_size, feature_layers) are ignored when resuming: the checkpoint fixes them.
    """

    data: Path
    out: Path
    method: str = "fbclip"
    dataset: LayoutKind = "auto"
    split: str = "test"
    categories: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    backbone: str = "ViT-L-14-336"
    pretrained: str | None = "openai"
    clip_weights: Path | None = None
    image_size: int = 518
    feature_layers: tuple[int, ...] | None = None
    epochs: int = 3
    batch_size: int = 4
    lr: float = 5e-5
    betas: tuple[float, float] = (0.5, 0.999)
    seed: int = 42
    device: str | None = None
    precision: str = "auto"
    num_workers: int = 0
    max_steps: int | None = None
    resume: Path | None = None
    progress: bool = True

    @classmethod
    def for_method(cls, method: str, **settings: Any) -> TrainConfig:
        """A run of `method` with its published recipe wherever a setting is None/absent."""
        recipe = get_method(method).recipe
        defaults = {
            "lr": recipe.lr,
            "betas": recipe.betas,
            "batch_size": recipe.batch_size,
            "epochs": recipe.epochs,
            "seed": recipe.seed,
            "image_size": recipe.image_size,
        }
        given = {k: v for k, v in settings.items() if v is not None or k not in defaults}
        return cls(method=get_method(method).name, **{**defaults, **given})

    def __post_init__(self) -> None:
        self.data, self.out = Path(self.data), Path(self.out)
        self.clip_weights = None if self.clip_weights is None else Path(self.clip_weights)
        self.resume = None if self.resume is None else Path(self.resume)
        if self.categories is not None:
            self.categories = tuple(self.categories)
        self.exclude = tuple(self.exclude)
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        self.validate()

    def validate(self) -> None:
        """Reject impossible settings before any data is read or weights are downloaded."""
        checks = (
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.num_workers >= 0, f"--num-workers must be >= 0, got {self.num_workers}"),
            (
                self.max_steps is None or self.max_steps >= 1,
                f"--max-steps must be at least 1, got {self.max_steps}",
            ),
            (
                self.precision in PRECISIONS,
                f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}",
            ),
        )
        for ok, message in checks:
            if not ok:
                raise FBClipError(message)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (paths as strings), stored with every checkpoint."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


@dataclass
class EpochLog:
    """Mean loss terms of one epoch, as written to history.json."""

    epoch: int
    steps: int
    images: int
    seconds: float
    losses: dict[str, float]


@dataclass
class TrainResult:
    """Where the run left its checkpoints, and what the losses did."""

    out: Path
    checkpoints: list[Path]
    last: Path
    history: list[EpochLog] = field(default_factory=list)
    global_step: int = 0
    seconds: float = 0.0


# --------------------------------------------------------------------------- data


class TrainingSet:
    """(pixels (3, S, S), mask (S, S), label) per sample; masks resized nearest to S x S,
    the size the training-time map is compared at (spec section 7)."""

    def __init__(self, samples: Sequence[Sample], image_size: int) -> None:
        self.samples = list(samples)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sample = self.samples[index]
        image = read_image(sample.image_path)
        mask = read_mask(sample.mask_path, image.shape[:2])
        pixels = preprocess(image, self.image_size)[0]
        side = self.image_size
        if mask.shape != (side, side):
            resized = Image.fromarray(mask.astype(np.uint8) * 255).resize(
                (side, side), Image.Resampling.NEAREST
            )
            mask = (np.asarray(resized) > 127).astype(np.float32)
        return pixels, torch.from_numpy(mask), torch.tensor(float(sample.label))


def training_samples(config: TrainConfig) -> list[Sample]:
    """The auxiliary split, with categories kept or held out; masks are required."""
    return load_dataset(
        config.data,
        kind=config.dataset,
        split=config.split,
        categories=config.categories,
        exclude=config.exclude,
        require_masks=True,
    )


def _loader(
    dataset: TrainingSet, config: TrainConfig, epoch: int, device: torch.device
) -> DataLoader:
    """Shuffled with a generator seeded by (seed, epoch), so a resumed run sees the same
    order as an uninterrupted one without storing the generator."""
    generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
    return DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=config.batch_size,
        shuffle=True,
        generator=generator,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
    )


# --------------------------------------------------------------------------- model and state


def seed_everything(seed: int) -> None:
    """Python, numpy and torch (all devices) RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """All RNG states, as tensors and plain values so torch.load(weights_only=True) reads them."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def trainable_parameters(model: AnomalyModel) -> list[tuple[str, torch.nn.Parameter]]:
    """The learned parts (prompt contexts, token selector, text MLP, FB attention, scale
    weights); CLIP parameters have requires_grad False and never reach the optimizer."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    leaked = [n for n, _ in params if n.startswith("clip.")]
    if leaked:
        raise FBClipError(f"CLIP parameters would be trained ({leaked[:3]}); CLIP must be frozen")
    return params


def _pretrained_tag(config: TrainConfig) -> str | None:
    """The tag actually used: none for a weights file, the tiny built-in or 'none'."""
    if config.clip_weights is not None or config.backbone in BUILTIN_BACKBONES:
        return None
    if config.pretrained in (None, "", RANDOM_WEIGHTS):
        return None
    return config.pretrained


def _new_model(config: TrainConfig) -> AnomalyModel:
    """Fresh heads on the requested CLIP weights, initialised from the run's seed."""
    return create_model(
        config.backbone,
        pretrained=_pretrained_tag(config),
        clip_weights=config.clip_weights,
        image_size=config.image_size,
        feature_layers=config.feature_layers,
        seed=config.seed,
        method=config.method,
    )


def read_train_state(folder: Path) -> dict[str, Any]:
    """A checkpoint folder's train_state.pt, with one-line errors."""
    path = folder / STATE_FILE
    if not path.is_file():
        raise FBClipError(
            f"{folder} has no {STATE_FILE}; resume from an epoch folder written by "
            "`fbclip-edge train` (e.g. OUT/last)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise FBClipError(
            f"cannot read {path} ({type(error).__name__}); it is truncated: resume from an "
            "earlier epoch folder"
        ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise FBClipError(f"{path} is not an fbclip-edge training state")
    if state.get("format_version") != STATE_VERSION:
        raise FBClipError(
            f"{path} is training-state v{state.get('format_version')}; this fbclip-edge "
            f"resumes v{STATE_VERSION}: train again"
        )
    return state


def _precision(config: TrainConfig, device: torch.device) -> torch.dtype:
    """bf16 where the GPU has it, else fp16 with a GradScaler; the CPU trains in fp32."""
    if device.type != "cuda":
        if config.precision in ("bf16", "fp16"):
            raise FBClipError(
                f"--precision {config.precision} needs a CUDA GPU; use fp32 (or auto) on CPU"
            )
        return torch.float32
    if config.precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[config.precision]


# --------------------------------------------------------------------------- the loop


def training_step(
    model: AnomalyModel,
    pixels: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> TrainLoss:
    """Forward and the method's losses for one batch (no backward); the networks run under
    autocast when dtype is reduced, the loss terms cast their inputs to float32."""
    with torch.autocast(pixels.device.type, dtype=dtype, enabled=dtype != torch.float32):
        return model.training_loss(pixels, masks, labels)


class _Progress:
    """A rich progress bar showing the running loss terms; silent when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.task: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[losses]}"),
            )
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def start(self, epoch: int, epochs: int, steps: int) -> None:
        if self.bar is not None:
            self.task = self.bar.add_task(f"epoch {epoch}/{epochs}", total=steps, losses="")

    def advance(self, losses: dict[str, float]) -> None:
        if self.bar is not None:
            text = " ".join(f"{k} {v:.4f}" for k, v in losses.items())
            self.bar.update(self.task, advance=1, losses=text)


def _batches(loader: DataLoader, max_steps: int | None) -> Iterator[Any]:
    for step, batch in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            return
        yield batch


@dataclass
class _Run:
    """Mutable state of a run: what a checkpoint must capture to continue exactly."""

    model: AnomalyModel
    optimizer: torch.optim.Adam
    scaler: torch.amp.GradScaler
    names: list[str]
    epoch: int = 0
    global_step: int = 0
    history: list[EpochLog] = field(default_factory=list)
    origin: dict[str, Any] = field(default_factory=dict)


def _build_run(config: TrainConfig, device: torch.device, dtype: torch.dtype) -> _Run:
    """A new run, or one restored from config.resume (model, optimizer, scaler, RNG, epoch)."""
    state = None
    if config.resume is not None:
        state = read_train_state(config.resume)
        model = load(config.resume)
    else:
        model = _new_model(config)
    model.to(device).train()
    params = trainable_parameters(model)
    optimizer = torch.optim.Adam(
        [p for _, p in params], lr=config.lr, betas=config.betas, weight_decay=0.0
    )
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    names = [n for n, _ in params]
    run = _Run(model, optimizer, scaler, names, origin=_origin(config))
    if state is not None:
        _restore(run, state, config)
    return run


def _origin(config: TrainConfig) -> dict[str, Any]:
    """Where the CLIP weights came from, recorded in every checkpoint's source."""
    if config.clip_weights is not None:
        return {"clip_weights": str(config.clip_weights)}
    return {"backbone": config.backbone, "pretrained": _pretrained_tag(config)}


def _restore(run: _Run, state: dict[str, Any], config: TrainConfig) -> None:
    if state["parameter_names"] != run.names:
        raise FBClipError(
            f"{config.resume} was trained with other learned parameters; start a new run"
        )
    run.optimizer.load_state_dict(state["optimizer"])
    for group in run.optimizer.param_groups:  # the current recipe wins over the stored one
        group["lr"], group["betas"] = config.lr, config.betas
    if state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.epoch = int(state["epoch"])
    run.global_step = int(state["global_step"])
    run.history = [EpochLog(**entry) for entry in state["history"]]
    run.origin = dict(state.get("origin", run.origin))
    _set_rng_state(state["rng"])
    if run.epoch >= config.epochs:
        raise FBClipError(
            f"{config.resume} already finished epoch {run.epoch} of --epochs {config.epochs}; "
            "raise --epochs to train further"
        )


def _train_epoch(
    run: _Run,
    dataset: TrainingSet,
    config: TrainConfig,
    device: torch.device,
    dtype: torch.dtype,
    progress: _Progress,
) -> EpochLog:
    """One pass over the data (or max_steps batches); returns the mean loss terms."""
    epoch = run.epoch + 1
    loader = _loader(dataset, config, epoch, device)
    steps = len(loader) if config.max_steps is None else min(len(loader), config.max_steps)
    progress.start(epoch, config.epochs, steps)
    sums: dict[str, float] = {}
    images = 0
    started = time.perf_counter()
    run.model.train()
    for pixels, masks, labels in _batches(loader, config.max_steps):
        pixels = pixels.to(device, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        terms = training_step(run.model, pixels, masks, labels, dtype)
        loss = terms.total
        if not torch.isfinite(loss):
            raise FBClipError(
                f"loss became {float(loss)} at step {run.global_step + 1}; lower --lr or use "
                "--precision fp32"
            )
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.global_step += 1
        values = terms.as_floats()
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value * len(labels)
        images += len(labels)
        progress.advance(values)
    means = {k: v / max(images, 1) for k, v in sums.items()}
    return EpochLog(epoch, steps, images, round(time.perf_counter() - started, 3), means)


def epoch_folder(out: Path, epoch: int) -> Path:
    """OUT/epoch-001, OUT/epoch-002, ..."""
    return out / f"epoch-{epoch:03d}"


def _save_checkpoint(
    run: _Run, config: TrainConfig, samples: Sequence[Sample], layout: str
) -> Path:
    """Model folder + train_state.pt for the epoch just finished, written atomically."""
    folder = epoch_folder(config.out, run.epoch)
    categories = sorted({s.category for s in samples})
    source = {
        "kind": "trained",
        "data": str(config.data),
        "dataset": layout,
        "split": config.split,
        "epoch": run.epoch,
        "global_step": run.global_step,
        "categories": categories,
        "excluded": list(config.exclude),
        "recipe": {
            "lr": config.lr,
            "betas": list(config.betas),
            "batch_size": config.batch_size,
            "seed": config.seed,
            "epochs": config.epochs,
            "max_steps": config.max_steps,
        },
        **run.origin,
    }
    state = {
        "format": STATE_FORMAT,
        "format_version": STATE_VERSION,
        "epoch": run.epoch,
        "global_step": run.global_step,
        "parameter_names": run.names,
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else {},
        "rng": _rng_state(),
        "history": [asdict(entry) for entry in run.history],
        "origin": run.origin,
        "config": config.to_dict(),
    }
    run.model.eval()  # freezes the text features from the trained prompts for the folder
    try:
        with atomic_directory(folder) as staging:
            save_model(run.model, staging, source)
            torch.save(state, staging / STATE_FILE)
    finally:
        run.model.train()
    return folder


def _point_last(out: Path, folder: Path) -> Path:
    """OUT/last -> the newest epoch folder: a relative symlink swapped atomically, or a copy
    where the filesystem has no symlinks."""
    link = out / LAST_LINK
    temporary = out / f".{LAST_LINK}.{os.getpid()}"
    try:
        if temporary.is_symlink() or temporary.exists():
            temporary.unlink()
        temporary.symlink_to(folder.name, target_is_directory=True)
        if link.is_dir() and not link.is_symlink():
            shutil.rmtree(link)
        os.replace(temporary, link)
    except OSError:
        with atomic_directory(link) as staging:
            shutil.copytree(folder, staging, dirs_exist_ok=True)
    return link


def _write_history(out: Path, history: list[EpochLog], config: TrainConfig) -> None:
    """history.json: the config and the per-epoch mean losses, replaced atomically."""
    payload = {"config": config.to_dict(), "epochs": [asdict(entry) for entry in history]}
    write_text_atomic(out / HISTORY_FILE, json.dumps(payload, indent=2) + "\n")


def train(config: TrainConfig) -> TrainResult:
    """Train (or resume) and write OUT/epoch-NNN/ per epoch, OUT/last and OUT/history.json.

    Each epoch folder is a model folder (`fbclip_edge.load` reads it) plus train_state.pt
    (optimizer, scaler, RNG, epoch), so `resume=OUT/epoch-NNN` continues exactly there.
    """
    started = time.perf_counter()
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _precision(config, device)
    samples = training_samples(config)
    layout = detect_layout(config.data) if config.dataset == "auto" else config.dataset
    seed_everything(config.seed)
    run = _build_run(config, device, dtype)
    dataset = TrainingSet(samples, run.model.config.image_size)
    config.out.mkdir(parents=True, exist_ok=True)
    checkpoints: list[Path] = []
    with _Progress(config.progress) as progress:
        while run.epoch < config.epochs:
            log = _train_epoch(run, dataset, config, device, dtype, progress)
            run.epoch = log.epoch
            run.history.append(log)
            checkpoints.append(_save_checkpoint(run, config, samples, layout))
            _point_last(config.out, checkpoints[-1])
            _write_history(config.out, run.history, config)
    return TrainResult(
        out=config.out,
        checkpoints=checkpoints,
        last=config.out / LAST_LINK,
        history=run.history,
        global_step=run.global_step,
        seconds=round(time.perf_counter() - started, 3),
    )


def resume_config(folder: str | Path, **overrides: Any) -> TrainConfig:
    """The TrainConfig a checkpoint was written with, set to resume from it; overrides
    (e.g. epochs=5, out=...) replace fields."""
    state = read_train_state(Path(folder))
    stored = dict(state["config"])
    stored["betas"] = tuple(stored["betas"])
    for key in ("categories", "exclude", "feature_layers"):
        if stored.get(key) is not None:
            stored[key] = tuple(stored[key])
    stored.update(resume=Path(folder))
    return replace(TrainConfig(**stored), **overrides)
