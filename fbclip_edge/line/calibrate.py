"""Calibrate a Detector on a folder of known-good frames (the statistics: thresholds.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fbclip_edge.errors import FBClipError
from fbclip_edge.line.detector import Detector
from fbclip_edge.line.thresholds import (
    Calibration,
    calibrate_scores,
    order_statistic_threshold,
    read_calibration,
    write_calibration,
)

__all__ = [
    "Calibration",
    "CalibrationRun",
    "calibrate_folder",
    "calibrate_scores",
    "order_statistic_threshold",
    "read_calibration",
    "write_calibration",
]


@dataclass
class CalibrationRun:
    """A calibration plus the files that could not be read (reported, not silently dropped)."""

    calibration: Calibration
    failed: dict[str, str]


def calibrate_folder(
    detector: Detector,
    good: str | Path,
    target_fpr: float = 0.01,
    batch_size: int = 8,
    category: str | None = None,
) -> CalibrationRun:
    """Score every known-good image under `good` and derive the thresholds (FiLo
    artifacts: as `category`, default the Detector's)."""
    from rich.progress import track

    from fbclip_edge.data.image_io import read_image
    from fbclip_edge.line.predict import collect_inputs

    files = collect_inputs([good])
    scores: list[float] = []
    maps: list[np.ndarray] = []
    failed: dict[str, str] = {}
    batches = [files[i : i + batch_size] for i in range(0, len(files), batch_size)]
    for batch in track(batches, description="scoring good frames", transient=True):
        frames = []
        for path in batch:
            try:
                frames.append(read_image(path))
            except FBClipError as error:
                failed[str(path)] = str(error)
        if frames:
            for detection in detector.predict(frames, category=category):
                scores.append(detection.image_score)
                maps.append(detection.anomaly_map)
    return CalibrationRun(calibrate_scores(np.array(scores), maps, target_fpr), failed)
