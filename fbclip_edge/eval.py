"""Zero-shot evaluation through any `Backend` (torch, onnxruntime, TensorRT) or FiLo's
`FrameBackend`: per-category and mean image/pixel metrics at ground-truth resolution, as a
rich table, JSON and Markdown."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fbclip_edge.data import Sample, load_dataset, read_image, read_mask
from fbclip_edge.data.layouts import LayoutKind
from fbclip_edge.errors import FBClipError
from fbclip_edge.fileio import write_text_atomic
from fbclip_edge.methods.base import method_of_folder
from fbclip_edge.metrics import METRIC_KEYS, evaluate
from fbclip_edge.modelformat import CONFIG_FILE
from fbclip_edge.postprocess import anomaly_map
from fbclip_edge.preprocess import preprocess
from fbclip_edge.runtime.base import Backend, BackendInfo, FrameBackend, TorchBackend

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

BACKENDS = ("torch", "onnxruntime", "tensorrt", "openvino", "auto")
METRIC_LABELS = {
    "image_auroc": "I-AUROC",
    "image_ap": "I-AP",
    "image_f1_max": "I-F1max",
    "pixel_auroc": "P-AUROC",
    "pixel_ap": "P-AP",
    "pixel_f1_max": "P-F1max",
    "pixel_aupro": "AU-PRO (official)",
    "pixel_aupro_200": "AU-PRO (200 thr.)",
}
METRIC_NOTES = {
    "pixel_aupro": "AU-PRO as MVTec AD defines it: the exact PRO curve over 8-connected "
    "defect regions, integrated up to FPR 0.3 and divided by 0.3",
    "pixel_aupro_200": "AU-PRO as the zero-shot code bases compute it (AnomalyCLIP / AdaCLIP "
    "cal_pro_score): 200 thresholds, steps with FPR < 0.3 kept, their FPR min-max normalised "
    "before integrating; not comparable with the official value",
}
# Short column names for the terminal table (the caption names the two AU-PRO variants).
TABLE_LABELS = {**METRIC_LABELS, "pixel_aupro": "AU-PRO", "pixel_aupro_200": "AU-PRO-200"}


@dataclass
class EvalConfig:
    """What `run_eval` evaluates and through which backend.

    `model` (a model folder) runs the PyTorch model; `artifacts` (an export folder) goes
    through `fbclip_edge.runtime.open`, so onnxruntime and TensorRT share this loop. FiLo
    folders and artifacts run through a `FrameBackend` (`open_frame_backend`), each image
    with its dataset category.
    """

    data: Path
    model: Path | None = None
    artifacts: Path | None = None
    backend: str = "torch"
    dataset: LayoutKind = "auto"
    split: str = "test"
    categories: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    device: str | None = None
    precision: str | None = None
    provider: str | None = None
    batch_size: int = 8
    sigma: float = 4.0
    progress: bool = True

    def __post_init__(self) -> None:
        self.data = Path(self.data)
        self.model = None if self.model is None else Path(self.model)
        self.artifacts = None if self.artifacts is None else Path(self.artifacts)
        if self.categories is not None:
            self.categories = tuple(self.categories)
        self.exclude = tuple(self.exclude)
        if self.backend not in BACKENDS:
            raise FBClipError(f"--backend must be one of {', '.join(BACKENDS)}, not {self.backend}")
        if (self.model is None) == (self.artifacts is None):
            raise FBClipError("pass exactly one of --model DIR and --artifacts DIR")
        if self.batch_size < 1:
            raise FBClipError(f"--batch-size must be at least 1, got {self.batch_size}")


@dataclass
class CategoryResult:
    """Metrics (fractions) of one category plus what they were computed on."""

    metrics: dict[str, float]
    images: int
    anomalous: int
    resolution: list[int]
    resized_from: list[list[int]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class EvalReport:
    """Per-category results, the mean over categories, backend and timing.

    Means skip a category whose metric is NaN (e.g. no anomalous images: no AUROC);
    `nan_categories` lists them per metric so a mean never hides a missing category.
    """

    categories: dict[str, CategoryResult]
    mean: dict[str, float]
    nan_categories: dict[str, list[str]]
    backend: dict[str, Any]
    timing: dict[str, float]
    sigma: float
    notes: list[str] = field(default_factory=list)
    dataset: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    method: str = "fbclip"
    # How the maps were made when not the patch map + Gaussian sigma (FiLo's own S x S map).
    map_info: dict[str, Any] | None = None

    @property
    def title(self) -> str:
        """The method's name as papers cite it, e.g. "FiLo (ACM MM 2024)"."""
        return method_title(self.method)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: fractions in [0, 1]; NaN becomes null so the file is strict JSON."""
        data = {
            "method": self.method,
            "metrics": {key: METRIC_LABELS[key] for key in METRIC_KEYS},
            "metric_notes": METRIC_NOTES,
            "mean": self.mean,
            "categories": {name: asdict(result) for name, result in self.categories.items()},
            "nan_categories": self.nan_categories,
            "backend": self.backend,
            "timing": self.timing,
            "anomaly_map": self.map_info or {"sigma": self.sigma, "resolution": "ground truth"},
            "notes": self.notes,
            "dataset": self.dataset,
            "model": self.model,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        return _nan_to_none(data)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value


def method_title(name: str) -> str:
    """A method's title from its registry entry (FiLo's METHOD_INFO); unknown names as is."""
    if name == "filo":
        from fbclip_edge.methods.filo import METHOD_INFO

        return METHOD_INFO.title
    from fbclip_edge.methods import METHODS

    spec = METHODS.get(name)
    return name if spec is None else spec.title


# --------------------------------------------------------------------------- the loop


def _by_category(samples: Sequence[Sample]) -> dict[str, list[Sample]]:
    grouped: dict[str, list[Sample]] = {}
    for sample in samples:
        grouped.setdefault(sample.category, []).append(sample)
    return dict(sorted(grouped.items()))


def _chunks(items: Sequence[Sample], size: int) -> Iterator[Sequence[Sample]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass
class _Collected:
    """Scores, maps and masks of one category, each map at its own ground-truth size."""

    labels: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    maps: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    inference_seconds: float = 0.0


def _run_category(
    backend: Backend,
    samples: Sequence[Sample],
    batch_size: int,
    sigma: float,
    advance: Callable[[int, str], None],
) -> _Collected:
    """Read at original resolution, preprocess, infer in batches, map at mask resolution."""
    collected = _Collected()
    for batch in _chunks(samples, batch_size):
        images = [read_image(s.image_path) for s in batch]
        pixels = preprocess(images, backend.image_size)
        started = time.perf_counter()
        scores, patch_maps = backend.run(pixels)
        scores = scores.detach().float().cpu()
        patch_maps = patch_maps.detach().float().cpu()
        collected.inference_seconds += time.perf_counter() - started
        for index, (sample, image) in enumerate(zip(batch, images, strict=True)):
            height, width = image.shape[:2]
            mask = read_mask(sample.mask_path, (height, width))
            amap = anomaly_map(patch_maps[index : index + 1], (height, width), sigma)[0]
            collected.labels.append(int(sample.label))
            collected.scores.append(float(scores[index]))
            collected.maps.append(amap.numpy())
            collected.masks.append(mask > 0.5)
        advance(len(batch), batch[0].category)
    return collected


def _frame_map(amap: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """A FrameBackend's (S, S) map at the ground truth's (H, W): bilinear, align_corners
    False, the upsampling FB-CLIP's patch map gets (no extra blur: FiLo's map is blurred),
    and untouched when the frame is S x S, so the map's values stay the method's own."""
    amap = amap.detach().float().cpu()
    if tuple(amap.shape) != size:
        amap = F.interpolate(amap[None, None], size=size, mode="bilinear", align_corners=False)
        amap = amap[0, 0]
    return amap.numpy()


def _run_frame_category(
    backend: FrameBackend,
    samples: Sequence[Sample],
    batch_size: int,
    advance: Callable[[int, str], None],
) -> _Collected:
    """As `_run_category` for backends that take frames and categories (FiLo): each image's
    dataset category selects its text; no sigma (the method blurs its own map)."""
    collected = _Collected()
    for batch in _chunks(samples, batch_size):
        images = [read_image(s.image_path) for s in batch]
        started = time.perf_counter()
        results = backend.run_frames(images, [s.category for s in batch])
        collected.inference_seconds += time.perf_counter() - started
        for sample, image, result in zip(batch, images, results, strict=True):
            height, width = image.shape[:2]
            mask = read_mask(sample.mask_path, (height, width))
            collected.labels.append(int(sample.label))
            collected.scores.append(float(result.image_score))
            collected.maps.append(_frame_map(result.anomaly_map, (height, width)))
            collected.masks.append(mask > 0.5)
        advance(len(batch), batch[0].category)
    return collected


def check_frame_categories(backend: FrameBackend, samples: Sequence[Sample], fix: str) -> None:
    """Every dataset category must be in the backend's descriptions: checked for all of them
    before scoring, so one run names everything to add instead of failing per category."""
    missing = sorted({s.category for s in samples} - set(backend.categories))
    if missing:
        raise FBClipError(
            f"categories {', '.join(missing)} are not in the descriptions (known: "
            f"{', '.join(backend.categories) or 'none'}); {fix}"
        )


def _resize_mask(mask: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour with PIL, the same sampling read_mask uses."""
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(image.resize((size[1], size[0]), Image.Resampling.NEAREST)) > 127


def _common_size(
    maps: list[np.ndarray], masks: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, list[int], list[list[int]]]:
    """Stack maps and masks; where sizes differ, resize to the most common size (bilinear
    maps, nearest masks), since the pixel metrics need one (N, H, W) array."""
    shapes = Counter(m.shape for m in maps)
    target = shapes.most_common(1)[0][0]
    others = sorted({m.shape for m in maps} - {target})
    if not others:
        return np.stack(maps), np.stack(masks), list(target), []
    resized_maps, resized_masks = [], []
    for amap, mask in zip(maps, masks, strict=True):
        if amap.shape != target:
            amap = F.interpolate(
                torch.from_numpy(amap)[None, None],
                size=target,
                mode="bilinear",
                align_corners=False,
            )[0, 0].numpy()
            mask = _resize_mask(mask, target)
        resized_maps.append(amap)
        resized_masks.append(mask)
    return np.stack(resized_maps), np.stack(resized_masks), list(target), [list(s) for s in others]


def _mean(results: dict[str, CategoryResult]) -> tuple[dict[str, float], dict[str, list[str]]]:
    """NaN-aware mean per metric and, per metric, the categories that were skipped."""
    mean: dict[str, float] = {}
    skipped: dict[str, list[str]] = {}
    for key in METRIC_KEYS:
        values = {name: r.metrics[key] for name, r in results.items()}
        finite = [v for v in values.values() if not math.isnan(v)]
        mean[key] = float(np.mean(finite)) if finite else float("nan")
        missing = [name for name, v in values.items() if math.isnan(v)]
        if missing:
            skipped[key] = missing
    return mean, skipped


def evaluate_backend(
    backend: Backend | FrameBackend,
    samples: Sequence[Sample],
    batch_size: int = 8,
    sigma: float = 4.0,
    progress: bool = False,
    method: str | None = None,
) -> EvalReport:
    """Metrics per category and their mean for any Backend (the export parity uses this).

    Maps follow spec section 6: patch map bilinearly upsampled to each image's ground-truth
    size, then Gaussian sigma; the backend only supplies image scores and patch maps. A
    FrameBackend (FiLo) gets each image's dataset category and supplies (S, S) maps, which
    are upsampled the same way and not blurred again.
    """
    if not samples:
        raise FBClipError("no samples to evaluate; check the dataset path and category filters")
    if isinstance(backend, FrameBackend):
        check_frame_categories(
            backend, samples, "add them to the descriptions file and re-import (and re-export)"
        )
    grouped = _by_category(samples)
    results: dict[str, CategoryResult] = {}
    notes: list[str] = []
    inference = 0.0
    started = time.perf_counter()
    with _EvalProgress(progress, len(samples)) as advance:
        for name, members in grouped.items():
            category_start = time.perf_counter()
            if isinstance(backend, FrameBackend):
                collected = _run_frame_category(backend, members, batch_size, advance)
            else:
                collected = _run_category(backend, members, batch_size, sigma, advance)
            inference += collected.inference_seconds
            maps, masks, resolution, resized = _common_size(collected.maps, collected.masks)
            if resized:
                notes.append(
                    f"{name}: images of sizes {resized} were resized to {resolution} for the "
                    "pixel metrics (maps bilinear, masks nearest)"
                )
            metrics = evaluate(
                np.asarray(collected.labels), np.asarray(collected.scores), masks, maps
            )
            results[name] = CategoryResult(
                metrics=metrics,
                images=len(members),
                anomalous=int(sum(collected.labels)),
                resolution=resolution,
                resized_from=resized,
                seconds=round(time.perf_counter() - category_start, 3),
            )
    mean, skipped = _mean(results)
    total = time.perf_counter() - started
    info = backend.info
    frames = isinstance(backend, FrameBackend)
    return EvalReport(
        categories=results,
        mean=mean,
        nan_categories=skipped,
        backend={
            "name": info.name,
            "device": info.device,
            "precision": info.precision,
            "image_size": info.image_size,
            **{k: v for k, v in info.details.items() if _jsonable(v)},
        },
        timing={
            "images": len(samples),
            "seconds_total": round(total, 3),
            "seconds_inference": round(inference, 3),
            "ms_per_image_inference": round(1000 * inference / len(samples), 3),
        },
        sigma=sigma,
        notes=notes + ([FRAME_MAP_NOTE] if frames else []),
        method=method or _backend_method(backend),
        map_info=FRAME_MAP_INFO if frames else None,
    )


FRAME_MAP_NOTE = (
    "maps: the method's own S x S anomaly map (blurred and box-weighted by the method), "
    "bilinearly upsampled to each ground-truth mask (unchanged for S x S images); --sigma "
    "is not applied"
)
FRAME_MAP_INFO: dict[str, Any] = {
    "source": "the method's S x S anomaly map (FiLo: spec 7.2 blur and 8.6 box step)",
    "resize": "bilinear, align_corners false, to the ground-truth size (none when equal)",
    "sigma": None,
    "resolution": "ground truth",
}


def _backend_method(backend: Backend | FrameBackend) -> str:
    """The method a backend runs: its model's, else what its info records, else FB-CLIP."""
    model_method = getattr(getattr(backend, "model", None), "method", None)
    if isinstance(model_method, str):
        return model_method
    recorded = backend.info.details.get("method")
    if isinstance(recorded, str):
        return recorded
    return "filo" if isinstance(backend, FrameBackend) else "fbclip"


class _EvalProgress:
    """A rich progress bar over images that yields an `advance(n, category)` callback."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total
        self.bar: Progress | None = None
        self.task: TaskID | None = None

    def __enter__(self) -> Any:
        if not self.enabled:
            return lambda n, name: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self.bar = bar = Progress(
            "{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
        )
        bar.__enter__()
        self.task = task = bar.add_task("evaluating", total=self.total)

        def advance(n: int, name: str) -> None:
            bar.update(task, advance=n, description=f"evaluating {name}")

        return advance

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.bar is not None:
            self.bar.__exit__(exc_type, exc, traceback)


# --------------------------------------------------------------------------- backends


def open_backend(config: EvalConfig) -> Backend:
    """TorchBackend from a model folder, or the export runtime for an artifacts folder."""
    if config.model is not None:
        if config.backend not in ("torch", "auto"):
            raise FBClipError(
                f"--backend {config.backend} runs exported artifacts: export the model with "
                "`fbclip-edge export` and pass --artifacts DIR instead of --model"
            )
        from fbclip_edge.checkpoint import load

        precision = config.precision or "fp32"
        if precision not in ("fp32", "fp16"):
            raise FBClipError(f"--precision {precision} is not fp32 or fp16 for the torch backend")
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return TorchBackend(load(config.model, device), device, precision)
    from fbclip_edge.runtime import open as open_artifacts

    assert config.artifacts is not None  # EvalConfig holds exactly one of model and artifacts
    return open_artifacts(
        config.artifacts,
        backend=config.backend,
        provider=config.provider,
        device=config.device,
        precision=config.precision,
    )


def open_frame_backend(config: EvalConfig) -> FrameBackend:
    """FiLo: its model folder on the torch pipeline (with the folder's Grounding DINO), or
    its artifacts through `runtime.open_frames` (torch, onnxruntime or auto)."""
    if config.artifacts is not None:
        from fbclip_edge.runtime import open_frames

        return open_frames(
            config.artifacts,
            backend=config.backend,
            provider=config.provider,
            device=config.device,
            precision=config.precision,
        )
    assert config.model is not None  # EvalConfig holds exactly one of model and artifacts
    given = {
        f"--backend {config.backend}": config.backend not in ("torch", "auto"),
        f"--precision {config.precision}": config.precision not in (None, "fp32"),
        "--provider": config.provider is not None,
    }
    wrong = [name for name, present in given.items() if present]
    if wrong:
        raise FBClipError(
            f"{', '.join(wrong)}: a FiLo model folder runs on torch in fp32; export it with "
            "`fbclip-edge export` and pass --artifacts DIR for onnxruntime"
        )
    from fbclip_edge.methods.filo import load_filo
    from fbclip_edge.methods.filo.stages import torch_pipeline
    from fbclip_edge.runtime.filo import FiLoBackend

    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_filo(config.model, device=device)
    pipeline = torch_pipeline(loaded.model, loaded.table, loaded.detector)
    info = BackendInfo("torch", device, "fp32", loaded.model.config.image_size)
    boxes = "Grounding DINO" if loaded.detector is not None else "none (no Grounding DINO)"
    info.details.update(method="filo", model=str(config.model), boxes=boxes)
    return FiLoBackend(pipeline, info)


def _method_of(config: EvalConfig) -> str:
    """The method the model folder or manifest names; unreadable ones count as FB-CLIP so
    the usual loader reports what is wrong with them."""
    if config.model is not None:
        try:
            meta = json.loads((config.model / CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "fbclip"
        return method_of_folder(meta) if isinstance(meta, dict) else "fbclip"
    from fbclip_edge.artifacts.manifest import read_manifest

    assert config.artifacts is not None
    try:
        return read_manifest(config.artifacts).method
    except FBClipError:
        return "fbclip"


def _descriptions_fix(config: EvalConfig) -> str:
    """Where a FiLo deployment's categories come from, and how to add one."""
    from fbclip_edge.methods.filo.folder import DESCRIPTIONS_FILE

    reimport = "re-import with `fbclip-edge import-official --method filo --descriptions FILE`"
    if config.model is not None:
        where = config.model / DESCRIPTIONS_FILE
        return f"add them to a copy of {where} (FILE) and {reimport}"
    assert config.artifacts is not None
    where = config.artifacts / DESCRIPTIONS_FILE
    return f"add them to a copy of {where} (FILE), {reimport} and re-export"


def run_eval(config: EvalConfig) -> EvalReport:
    """Load the data and the backend, evaluate, and record where both came from."""
    samples = load_dataset(
        config.data,
        kind=config.dataset,
        split=config.split,
        categories=config.categories,
        exclude=config.exclude,
        require_masks=True,
    )
    method = _method_of(config)
    backend: Backend | FrameBackend
    if method == "filo":
        backend = open_frame_backend(config)
        check_frame_categories(backend, samples, _descriptions_fix(config))
    else:
        backend = open_backend(config)
    report = evaluate_backend(
        backend, samples, config.batch_size, config.sigma, config.progress, method
    )
    report.dataset = {
        "root": str(config.data),
        "kind": config.dataset,
        "split": config.split,
        "categories": list(report.categories),
    }
    report.model = {"model": str(config.model or ""), "artifacts": str(config.artifacts or "")}
    if config.model is not None:
        report.model["source"] = _model_source(config.model)
    return report


def _model_source(folder: Path) -> dict[str, Any]:
    from fbclip_edge.checkpoint import read_config
    from fbclip_edge.methods.filo import is_filo_folder

    if is_filo_folder(folder):  # read_config refuses FiLo folders (not an AnomalyModel)
        meta = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    else:
        _, meta = read_config(folder)
    return dict(meta.get("source") or {})


# --------------------------------------------------------------------------- output


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}"


def _rows(report: EvalReport) -> list[list[str]]:
    rows = [
        [name, str(r.images)] + [_percent(r.metrics[k]) for k in METRIC_KEYS]
        for name, r in report.categories.items()
    ]
    total = sum(r.images for r in report.categories.values())
    rows.append(["mean", str(total)] + [_percent(report.mean[k]) for k in METRIC_KEYS])
    return rows


def _header(labels: dict[str, str] = METRIC_LABELS) -> list[str]:
    return ["category", "images"] + [labels[k] for k in METRIC_KEYS]


def _backend_line(report: EvalReport) -> str:
    b, t = report.backend, report.timing
    return (
        f"backend {b['name']} on {b['device']} ({b['precision']}, {b['image_size']} px): "
        f"{t['images']} images, {t['ms_per_image_inference']:.1f} ms/image inference, "
        f"{t['seconds_total']:.1f} s total"
    )


def report_table(report: EvalReport) -> Any:
    """A rich Table: categories and the mean as rows, metrics in percent (1 decimal)."""
    from rich.table import Table

    caption = (
        f"{_backend_line(report)}\nAU-PRO: official MVTec AD definition; AU-PRO-200: the "
        "200-threshold code-base variant (see the Markdown report)"
    )
    table = Table(title=f"{report.title} zero-shot evaluation (%)", caption=caption)
    for index, name in enumerate(_header(TABLE_LABELS)):
        table.add_column(name, justify="left" if index == 0 else "right", no_wrap=index == 0)
    rows = _rows(report)
    for index, row in enumerate(rows[:-1]):
        table.add_row(*row, end_section=index == len(rows) - 2)
    table.add_row(*rows[-1], style="bold")
    return table


def report_markdown(report: EvalReport) -> str:
    """The same table as Markdown, with the backend, the metric notes and any caveats."""
    header = _header()
    lines = [
        f"# {report.title} zero-shot evaluation",
        "",
        _backend_line(report),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for row in _rows(report):
        if row[0] == "mean":
            row = [f"**{cell}**" for cell in row]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Values in percent; the JSON report keeps fractions.", ""]
    lines += [f"- {METRIC_LABELS[k]}: {note}" for k, note in METRIC_NOTES.items()]
    for key, names in report.nan_categories.items():
        lines.append(f"- {METRIC_LABELS[key]} undefined for {', '.join(names)} (left out of mean)")
    lines += [f"- {note}" for note in report.notes]
    return "\n".join(lines) + "\n"


def write_report(
    report: EvalReport, json_path: str | Path, md_path: str | Path | None = None
) -> tuple[Path, Path]:
    """Write JSON and Markdown (default: the JSON path with .md), each replaced atomically."""
    json_path = Path(json_path)
    md_path = json_path.with_suffix(".md") if md_path is None else Path(md_path)
    write_text_atomic(json_path, json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
    write_text_atomic(md_path, report_markdown(report))
    return json_path, md_path
