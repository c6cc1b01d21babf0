"""`fbclip-edge predict`: score image files, write overlays and a results table.

Unreadable files are reported by name and counted; the rest go on.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from rich.progress import Progress

from fbclip_edge.data.image_io import IMAGE_SUFFIXES, read_image
from fbclip_edge.errors import FBClipError
from fbclip_edge.fileio import write_text_atomic
from fbclip_edge.line.detector import Detection, Detector
from fbclip_edge.line.overlay import overlay_panel


@dataclass
class PredictRow:
    """One scored file."""

    file: str
    score: float
    decision: str  # "anomalous" | "good"
    defect_area: int  # pixels
    defect_fraction: float
    overlay: str
    category: str = ""  # FiLo: the category the file was scored as
    position: str = ""  # FiLo: the position word of its best anomaly box
    anomaly_boxes: int = 0  # FiLo: Grounding DINO boxes flagged as anomalies


@dataclass
class PredictResult:
    """Everything predict produced."""

    rows: list[PredictRow] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # file -> reason
    out: Path | None = None


def collect_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files, folders (recursive) and glob patterns -> sorted unique image paths."""
    found: set[Path] = set()
    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            found.update(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
        elif path.is_file():
            found.add(path)
        elif any(ch in text for ch in "*?["):
            found.update(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        else:
            raise FBClipError(f"input {text} does not exist; pass image files, folders or globs")
    if not found:
        raise FBClipError(
            "no image files found in the inputs (looked for "
            + ", ".join(sorted(IMAGE_SUFFIXES))
            + ")"
        )
    return sorted(found)


def write_tables(result: PredictResult, out: Path) -> None:
    """results.csv and results.json (with the failures), each written atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    columns = ["file", "score", "decision", "defect_area", "defect_fraction", "overlay"]
    with_category = any(row.category for row in result.rows)
    extra = ["category", "position", "anomaly_boxes"] if with_category else []
    writer.writerow(columns + extra)
    for row in result.rows:
        values = [
            row.file,
            f"{row.score:.6f}",
            row.decision,
            row.defect_area,
            f"{row.defect_fraction:.6f}",
            row.overlay,
        ]
        if with_category:
            values += [row.category, row.position, row.anomaly_boxes]
        writer.writerow(values)
    write_text_atomic(out / "results.csv", buffer.getvalue())
    payload = {
        "results": [asdict(r) for r in result.rows],
        "failed": result.failed,
        "counts": {
            "scored": len(result.rows),
            "failed": len(result.failed),
            "anomalous": sum(r.decision == "anomalous" for r in result.rows),
        },
    }
    write_text_atomic(out / "results.json", json.dumps(payload, indent=2) + "\n")


def predict_files(
    detector: Detector,
    inputs: Iterable[str | Path],
    out: str | Path,
    show_progress: bool = True,
    batch_size: int = 8,
    category: str | None = None,
) -> PredictResult:
    """Score every input image, batch_size readable images per backend call (frames of one
    size share the map call too); write one overlay PNG per image plus the result tables.
    category: for FiLo artifacts, the category of every input (default: the Detector's)."""
    if batch_size < 1:
        raise FBClipError(f"batch size must be >= 1, got {batch_size}")
    files = collect_inputs(inputs)
    out = Path(out)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    result = PredictResult(out=out)
    with Progress(disable=not show_progress, transient=True) as progress:
        task = progress.add_task("scoring", total=len(files))
        for first in range(0, len(files), batch_size):
            chunk: list[tuple[int, Path, np.ndarray]] = []
            for index in range(first, min(first + batch_size, len(files))):
                try:
                    chunk.append((index, files[index], read_image(files[index])))
                except FBClipError as error:
                    result.failed[str(files[index])] = str(error)
            images = [image for _, _, image in chunk]
            detections = detector.predict(images, category=category) if chunk else []
            for (index, path, image), detection in zip(chunk, detections, strict=True):
                result.rows.append(_write_overlay(out, index, path, image, detection))
            progress.advance(task, min(batch_size, len(files) - first))
    write_tables(result, out)
    return result


def _write_overlay(
    out: Path, index: int, path: Path, image: np.ndarray, detection: Detection
) -> PredictRow:
    """Save one image's overlay panel atomically; its table row."""
    decision = "anomalous" if detection.is_anomalous else "good"
    name = f"{index:05d}_{path.stem}.png"
    caption = f"{path.parent.name}/{path.name}  score {detection.image_score:.3f}  {decision}"
    if detection.category is not None:
        caption += f"  {detection.category}, {detection.position or 'no position'}"
    panel = overlay_panel(
        image, detection.anomaly_map, detection.defect_mask, caption, detection.boxes
    )
    temp = out / "overlays" / f".{name}.tmp"
    panel.save(temp, format="PNG")
    os.replace(temp, out / "overlays" / name)
    area = detection.defect_area
    return PredictRow(
        str(path),
        detection.image_score,
        decision,
        area,
        area / detection.defect_mask.size,
        f"overlays/{name}",
        category=detection.category or "",
        position=detection.position or "",
        anomaly_boxes=sum(box.is_anomaly for box in detection.boxes),
    )
