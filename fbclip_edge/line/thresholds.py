"""Decision thresholds from known-good frames, stored in the artifacts manifest.

The image threshold is an order statistic of the good scores: for exchangeable scores a
new good frame reaches the k-th smallest of n with probability (n - k + 1) / (n + 1), so
k is the smallest rank whose expected false-alarm rate is at most the target.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from fbclip_edge.errors import FBClipError

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Calibration:
    """Thresholds and how they were chosen."""

    image_threshold: float
    pixel_threshold: float
    target_fpr: float
    expected_fpr: float  # for a new good frame, from the order statistic
    calibration_fpr: float  # false alarms on the calibration frames themselves
    n_images: int
    rank: int  # k: the threshold is the k-th smallest good score
    method: str
    created: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def order_statistic_threshold(scores: np.ndarray, target_fpr: float) -> tuple[float, float, int]:
    """(threshold, expected false-alarm rate, rank k) for 'anomalous when score >= threshold'.

    With too few frames for the target, the threshold goes just above the largest good
    score and the expected rate is 1 / (n + 1), larger than the target.
    """
    if not 0 < target_fpr < 1:
        raise FBClipError(f"target false-alarm rate {target_fpr} must be between 0 and 1")
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    n = ordered.size
    if n == 0:
        raise FBClipError("no good frames to calibrate on; pass a folder of known-good images")
    rank = math.ceil((n + 1) * (1 - target_fpr))
    if rank > n:
        return float(np.nextafter(ordered[-1], np.inf)), 1.0 / (n + 1), n + 1
    return float(ordered[rank - 1]), (n - rank + 1) / (n + 1), rank


def calibrate_scores(
    image_scores: np.ndarray, good_maps: np.ndarray | list[np.ndarray], target_fpr: float
) -> Calibration:
    """Thresholds from good frames' image scores and anomaly maps."""
    scores = np.asarray(image_scores, dtype=np.float64)
    threshold, expected, rank = order_statistic_threshold(scores, target_fpr)
    if not len(good_maps):
        raise FBClipError("no good frames to calibrate on; pass a folder of known-good images")
    pixels = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in good_maps])
    pixel_threshold = float(np.quantile(pixels, 1 - target_fpr, method="higher"))
    return Calibration(
        image_threshold=threshold,
        pixel_threshold=pixel_threshold,
        target_fpr=target_fpr,
        expected_fpr=expected,
        calibration_fpr=float(np.mean(scores >= threshold)),
        n_images=int(scores.size),
        rank=rank,
        method=(
            f"image: {rank}-th smallest of {scores.size} good scores (order statistic, expected "
            f"false-alarm rate (n-k+1)/(n+1)); pixel: {1 - target_fpr:.4g} quantile of all "
            "good-frame anomaly-map values"
        ),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _manifest_path(artifacts: str | Path) -> Path:
    path = Path(artifacts) / MANIFEST
    if not path.is_file():
        raise FBClipError(f"{artifacts} has no {MANIFEST}; create it with `fbclip-edge export`")
    return path


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FBClipError(f"{path} is not valid JSON ({error}); re-export the artifacts") from None
    if not isinstance(manifest, dict):
        raise FBClipError(f"{path} is not a manifest object; re-export the artifacts")
    return manifest


#: Per-category calibrations (FiLo: each category has its own text, so its own scale).
BY_CATEGORY = "calibration_by_category"


def _calibration(stored: object, artifacts: str | Path) -> Calibration:
    try:
        return Calibration(**stored)  # type: ignore[arg-type]
    except TypeError:
        raise FBClipError(
            f"the calibration in {artifacts}/{MANIFEST} is malformed; "
            "run `fbclip-edge calibrate` again"
        ) from None


def read_calibration(artifacts: str | Path, category: str | None = None) -> Calibration | None:
    """The stored calibration (of `category`, if given), or None when there is none."""
    manifest = _read_manifest(_manifest_path(artifacts))
    stored = (
        manifest.get(BY_CATEGORY, {}).get(category) if category else manifest.get("calibration")
    )
    return _calibration(stored, artifacts) if stored else None


def read_category_calibrations(artifacts: str | Path) -> dict[str, Calibration]:
    """Every per-category calibration stored in the manifest."""
    stored = _read_manifest(_manifest_path(artifacts)).get(BY_CATEGORY) or {}
    return {str(name): _calibration(entry, artifacts) for name, entry in stored.items()}


def write_calibration(
    artifacts: str | Path, calibration: Calibration, category: str | None = None
) -> Path:
    """Store the calibration (as `category`'s, if given) in the manifest, atomically."""
    path = _manifest_path(artifacts)
    manifest = _read_manifest(path)
    if category:
        manifest.setdefault(BY_CATEGORY, {})[category] = calibration.as_dict()
    else:
        manifest["calibration"] = calibration.as_dict()
    handle, temp = tempfile.mkstemp(prefix=".manifest.", dir=path.parent)
    with os.fdopen(handle, "w") as stream:
        stream.write(json.dumps(manifest, indent=2) + "\n")
    os.chmod(temp, 0o644)
    os.replace(temp, path)
    return path
