"""Parity of every exported target with the float32 PyTorch model, on a handful of images.

Per target: max abs difference of the image score and of the full-resolution anomaly map,
relative L2 of the logits (log-odds of every score), and image AUROC next to the model's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table

from fbclip_edge.artifacts.options import BatchProfile, Tolerance
from fbclip_edge.errors import FBClipError
from fbclip_edge.kernels import anomaly_map
from fbclip_edge.methods import AnomalyModel
from fbclip_edge.preprocess import preprocess
from fbclip_edge.runtime.base import Backend


@dataclass
class ParityRow:
    """One target against the reference; `passed` compares with its precision's tolerance."""

    target: str
    backend: str
    precision: str
    score_max_abs: float
    map_max_abs: float
    logit_rel_l2: float
    auroc: float | None
    reference_auroc: float | None
    tolerance: Tolerance
    details: dict[str, Any] = field(default_factory=dict)
    # Best time per image over the batches after the first (warm-up), None with one batch.
    ms_per_image: float | None = None

    @property
    def passed(self) -> bool:
        """Both max-abs differences within tolerance (NaN fails)."""
        return bool(
            self.score_max_abs <= self.tolerance.score and self.map_max_abs <= self.tolerance.map
        )


@dataclass
class ParityReport:
    """All rows plus what they were measured on."""

    rows: list[ParityRow]
    images: int
    synthetic: bool
    image_size: int
    reference: str

    @property
    def passed(self) -> bool:
        """Every target within tolerance."""
        return all(row.passed for row in self.rows)

    def failures(self) -> list[str]:
        """One phrase per failing target, for the error message."""
        return [
            f"{r.target}: score {r.score_max_abs:.1e} (tol {r.tolerance.score:.0e}), "
            f"map {r.map_max_abs:.1e} (tol {r.tolerance.map:.0e})"
            for r in self.rows
            if not r.passed
        ]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; NaN becomes null so parity.json is strict JSON."""
        data = asdict(self)
        for row, source in zip(data["rows"], self.rows, strict=True):
            row["passed"] = source.passed
            for key, value in row.items():
                if isinstance(value, float) and not math.isfinite(value):
                    row[key] = None
        data["passed"] = self.passed
        return data


class ParityError(FBClipError):
    """Export produced targets outside tolerance; carries the report so it can be shown."""

    def __init__(self, report: ParityReport) -> None:
        super().__init__(
            "parity check failed, artifacts not written: "
            + "; ".join(report.failures())
            + ". Try --precision fp32, or report the model and table above"
        )
        self.report = report


def synthetic_frames(count: int, size: int) -> tuple[list[np.ndarray], list[int]]:
    """Plain plates and scratched plates, alternating (labels 0, 1), each pair reseeded."""
    from fbclip_edge.data.synthetic import demo_frames

    frames: list[np.ndarray] = []
    for pair in range((count + 1) // 2):
        frames.extend(demo_frames(2, size, seed=pair))
    return frames[:count], [index % 2 for index in range(count)]


@contextmanager
def strict_fp32() -> Any:
    """No TF32 in the reference: cuDNN convolutions use it by default and miss 1e-4."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def run_batched(
    run: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    pixels: torch.Tensor,
    profile: BatchProfile,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batches of 2 (or the profile's nearest size: batch > 1 is exercised, memory stays
    small), a short tail padded by repetition; outputs on the CPU."""
    size = min(max(2, profile.min), profile.max)
    scores, maps = [], []
    for start in range(0, pixels.shape[0], size):
        chunk = pixels[start : start + size]
        count = chunk.shape[0]
        if count < profile.min:
            chunk = chunk[torch.arange(profile.min) % count]
        score, patch = run(chunk)
        scores.append(score[:count].float().cpu())
        maps.append(patch[:count].float().cpu())
    return torch.cat(scores), torch.cat(maps)


def _log_odds(values: torch.Tensor) -> torch.Tensor:
    p = values.double().clamp(1e-7, 1 - 1e-7)
    return torch.log(p) - torch.log1p(-p)


def _auroc(labels: Sequence[int] | None, scores: torch.Tensor) -> float | None:
    if labels is None or len(set(labels)) < 2:
        return None
    from fbclip_edge.metrics import auroc

    return float(auroc(np.asarray(labels), scores.double().numpy()))


@dataclass(frozen=True)
class Reference:
    """The float32 model's outputs that every target is compared with."""

    image_score: torch.Tensor
    patch_map: torch.Tensor
    anomaly_map: torch.Tensor
    auroc: float | None
    description: str


def reference_outputs(
    model: AnomalyModel,
    pixels: torch.Tensor,
    labels: Sequence[int] | None,
    profile: BatchProfile,
    device: torch.device,
) -> Reference:
    """Run the PyTorch model in strict float32 (the torch scoring ops, no TF32)."""
    model = model.to(device).eval()

    @torch.no_grad()
    def run(chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = model.score(model.encode_maps(chunk.to(device)), impl="torch")
        return output.image_score, output.patch_map

    with strict_fp32():
        score, patch = run_batched(run, pixels, profile)
    size = model.config.image_size
    full = anomaly_map(patch, (size, size))
    return Reference(score, patch, full, _auroc(labels, score), f"torch fp32 on {device}")


def compare(
    target: str,
    backend: Backend,
    pixels: torch.Tensor,
    reference: Reference,
    labels: Sequence[int] | None,
    profile: BatchProfile,
    tolerance: Tolerance,
) -> ParityRow:
    """One row: run the backend on the same pixels, measure the differences and time it."""
    seconds: list[float] = []

    def timed(chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = time.perf_counter()
        outputs = backend.run(chunk)
        seconds.append((time.perf_counter() - start) / chunk.shape[0])
        return outputs

    score, patch = run_batched(timed, pixels, profile)
    size = backend.image_size
    full = anomaly_map(patch, (size, size))
    ref_logits = torch.cat(
        [_log_odds(reference.image_score), _log_odds(reference.patch_map).flatten()]
    )
    logits = torch.cat([_log_odds(score), _log_odds(patch).flatten()])
    rel_l2 = float((logits - ref_logits).norm() / ref_logits.norm().clamp_min(1e-12))
    details = {  # what ran; the staging folder's path would be stale once moved into place
        k: v
        for k, v in backend.info.details.items()
        if isinstance(v, (str, int, float)) and k not in ("artifacts", "selected")
    }
    return ParityRow(
        target=target,
        backend=f"{backend.info.name} on {backend.info.device}",
        precision=backend.info.precision,
        score_max_abs=float((score - reference.image_score).abs().max()),
        map_max_abs=float((full - reference.anomaly_map).abs().max()),
        logit_rel_l2=rel_l2,
        auroc=_auroc(labels, score),
        reference_auroc=reference.auroc,
        tolerance=tolerance,
        details=details,
        ms_per_image=1e3 * min(seconds[1:]) if len(seconds) > 1 else None,
    )


def prepare_images(
    frames: Sequence[np.ndarray] | None,
    labels: Sequence[int] | None,
    image_size: int,
    count: int = 6,
) -> tuple[torch.Tensor, list[int] | None, bool]:
    """Given frames (labels optional) or synthetic ones; returns pixels, labels, synthetic."""
    if frames is None:
        synthetic, synthetic_labels = synthetic_frames(count, image_size)
        return preprocess(synthetic, image_size), synthetic_labels, True
    if not len(frames):
        raise FBClipError("no parity images given; pass some images or none for synthetic ones")
    if labels is not None and len(labels) != len(frames):
        raise FBClipError(f"{len(labels)} parity labels for {len(frames)} images")
    return preprocess(list(frames), image_size), None if labels is None else list(labels), False


def read_parity_images(folder: str | Path) -> tuple[list[np.ndarray], list[int] | None]:
    """Images in `folder`, or in its subfolders with labels from their names (good = 0,
    anything else = 1, as in MVTec AD's test split)."""
    from fbclip_edge.data.image_io import IMAGE_SUFFIXES, read_image

    root = Path(folder)
    if not root.is_dir():
        raise FBClipError(f"parity image folder {root} does not exist; pass a folder of images")
    direct = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if direct:
        return [read_image(p) for p in direct], None
    frames, labels = [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            frames.append(read_image(path))
            labels.append(0 if sub.name == "good" else 1)
    if not frames:
        raise FBClipError(
            f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {root} or its subfolders"
        )
    return frames, labels


def _number(value: float | None, digits: str = ".1e") -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, digits)


def parity_table(report: ParityReport) -> Table:
    """Rich table of the report, one row per target."""
    kind = "synthetic" if report.synthetic else "given"
    table = Table(
        title=f"parity vs {report.reference} on {report.images} {kind} images "
        f"at {report.image_size} px"
    )
    for column in (
        "target",
        "backend",
        "precision",
        "score max|d|",
        "map max|d|",
        "logit rel L2",
        "AUROC (ref)",
        "ms/image",
        "result",
    ):
        table.add_column(column)
    for row in report.rows:
        auroc = f"{_number(row.auroc, '.3f')} ({_number(row.reference_auroc, '.3f')})"
        verdict = "[green]pass[/]" if row.passed else "[red]FAIL[/]"
        table.add_row(
            row.target,
            row.backend,
            row.precision,
            f"{_number(row.score_max_abs)} / {row.tolerance.score:.0e}",
            f"{_number(row.map_max_abs)} / {row.tolerance.map:.0e}",
            _number(row.logit_rel_l2),
            auroc,
            _number(row.ms_per_image, ".3g"),
            verdict,
        )
    return table
