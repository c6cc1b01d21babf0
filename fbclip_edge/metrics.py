"""Anomaly-detection metrics in numpy: AUROC, AP, max-F1 (tie handling as scikit-learn) and
AU-PRO two ways, the official MVTec AD definition and the 200-threshold code-base variant."""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from fbclip_edge.errors import FBClipError

# 8-connectivity: diagonal neighbours belong to the same defect region, as in the MVTec AD
# evaluation code and in skimage.measure.label's default for 2-D images.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

METRIC_KEYS = (
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "pixel_aupro",
    "pixel_aupro_200",
)


@dataclass(frozen=True)
class _Curve:
    """Cumulative true/false positive counts at each distinct score, highest score first."""

    tps: np.ndarray
    fps: np.ndarray

    @property
    def n_pos(self) -> float:
        return float(self.tps[-1])

    @property
    def n_neg(self) -> float:
        return float(self.fps[-1])


def _descending_order(scores: np.ndarray) -> np.ndarray:
    """Sort order, highest first; order within ties never matters below (only group ends do)."""
    return np.argsort(scores, kind="quicksort")[::-1]


def _curve(y_true: np.ndarray, scores: np.ndarray, order: np.ndarray | None = None) -> _Curve:
    """Counts at every distinct threshold, as sklearn's _binary_clf_curve, so ties match it."""
    if order is None:
        order = _descending_order(scores)
    sorted_scores = scores[order]
    sorted_true = y_true[order].astype(np.float64)
    group_ends = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    tps = np.cumsum(sorted_true)[group_ends]
    fps = (group_ends + 1).astype(np.float64) - tps
    return _Curve(tps=tps, fps=fps)


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    """Plain trapezoid area; written out so no numpy-version-specific name is needed."""
    if x.size < 2:
        return 0.0
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)))


def _auroc_from_curve(curve: _Curve) -> float:
    if curve.n_pos == 0 or curve.n_neg == 0:
        return float("nan")
    tpr = np.r_[0.0, curve.tps] / curve.n_pos
    fpr = np.r_[0.0, curve.fps] / curve.n_neg
    return _trapezoid(fpr, tpr)


def _precision_recall(curve: _Curve) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall up to the first threshold reaching full recall (sklearn's cut)."""
    last = int(np.searchsorted(curve.tps, curve.tps[-1])) + 1
    tps, fps = curve.tps[:last], curve.fps[:last]
    predicted = tps + fps
    precision = np.divide(tps, predicted, out=np.zeros_like(tps), where=predicted != 0)
    recall = tps / curve.n_pos
    return precision, recall


def _ap_from_curve(curve: _Curve) -> float:
    if curve.n_pos == 0:
        return float("nan")
    precision, recall = _precision_recall(curve)
    # Step integral sum (R_n - R_{n-1}) * P_n, as sklearn's average_precision_score.
    return float(max(0.0, np.sum(np.diff(np.r_[0.0, recall]) * precision)))


def _f1_max_from_curve(curve: _Curve) -> float:
    if curve.n_pos == 0:
        return float("nan")
    precision, recall = _precision_recall(curve)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom != 0)
    return float(f1.max())


def _binary_scores(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flatten and check; labels/masks above 0.5 count as anomalous."""
    y = np.asarray(y_true).ravel() > 0.5
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise FBClipError(
            f"labels have {y.size} values but scores have {s.size}; pass one score per label"
        )
    if not np.all(np.isfinite(s)):
        raise FBClipError("scores contain NaN or inf; check the model output before evaluating")
    return y, s


def auroc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (equals sklearn.metrics.roc_auc_score); NaN if one class only."""
    y, s = _binary_scores(y_true, scores)
    return _auroc_from_curve(_curve(y, s))


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Average precision (equals sklearn.metrics.average_precision_score); NaN if no positives."""
    y, s = _binary_scores(y_true, scores)
    return _ap_from_curve(_curve(y, s))


def f1_max(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Best F1 over all thresholds of the precision-recall curve; NaN if no positives."""
    y, s = _binary_scores(y_true, scores)
    return _f1_max_from_curve(_curve(y, s))


def _as_stack(array: np.ndarray) -> np.ndarray:
    """(H, W) -> (1, H, W) and (N, 1, H, W) -> (N, H, W); other shapes pass through."""
    if array.ndim == 2:
        return array[None]
    if array.ndim == 4 and array.shape[1] == 1:
        return array[:, 0]
    return array


def _pixel_arrays(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bring masks and maps to (N, H, W); masks become boolean at 0.5."""
    masks = np.asarray(masks)
    maps = np.asarray(maps)
    masks, maps = _as_stack(masks), _as_stack(maps)
    if masks.ndim != 3 or masks.shape != maps.shape:
        raise FBClipError(
            f"masks {masks.shape} and maps {maps.shape} must both be (N, H, W); resize the "
            "anomaly maps to the ground-truth resolution first"
        )
    if not np.issubdtype(maps.dtype, np.floating):
        maps = maps.astype(np.float64)
    if not np.all(np.isfinite(maps)):
        raise FBClipError("anomaly maps contain NaN or inf; check the model output")
    return masks > 0.5, maps


def _region_labels(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Globally numbered 8-connected regions (0 = normal) and each region's pixel count."""
    labels = np.zeros(masks.shape, dtype=np.int64)
    offset = 0
    for i, mask in enumerate(masks):
        image_labels, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        labels[i] = np.where(image_labels > 0, image_labels + offset, 0)
        offset += count
    sizes = np.bincount(labels.ravel(), minlength=offset + 1)
    return labels, sizes


def _trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area of y(x) on [x[0], x_max], interpolating the point at x_max (MVTec code)."""
    correction = 0.0
    if x_max not in x:
        ins = bisect_right(x.tolist(), x_max)
        if 0 < ins < len(x):
            y_at = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
            correction = 0.5 * (y_at + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    return _trapezoid(x[keep], y[keep]) + float(correction)


def _pro_curve(
    masks: np.ndarray, maps: np.ndarray, order: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO curve: (FPR, mean per-region overlap) at every distinct map value, from (0, 0).

    Each normal pixel adds 1/#normal to the FPR and each region pixel adds 1/(area * #regions)
    to the PRO once the threshold falls to its score, so one sort gives the whole curve.
    """
    labels, sizes = _region_labels(masks)
    n_regions = sizes.size - 1
    n_normal = int(sizes[0])
    flat_labels = labels.ravel()
    flat_maps = maps.ravel()
    if order is None:
        order = _descending_order(flat_maps)
    sorted_labels = flat_labels[order]
    sorted_scores = flat_maps[order]
    fp_step = (sorted_labels == 0).astype(np.float64) / n_normal
    region_weight = np.r_[0.0, 1.0 / (sizes[1:] * float(n_regions))]
    pro_step = region_weight[sorted_labels]
    group_ends = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    fprs = np.minimum(np.cumsum(fp_step)[group_ends], 1.0)
    pros = np.minimum(np.cumsum(pro_step)[group_ends], 1.0)
    return np.r_[0.0, fprs], np.r_[0.0, pros]


def _official_au_pro(
    masks: np.ndarray, maps: np.ndarray, fpr_limit: float, order: np.ndarray | None = None
) -> float:
    if not masks.any() or masks.all():
        return float("nan")
    fprs, pros = _pro_curve(masks, maps, order)
    return _trapezoid_to(fprs, pros, fpr_limit) / fpr_limit


def au_pro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """AU-PRO as defined by MVTec AD: exact PRO curve over all 8-connected ground-truth regions.

    Integrates PRO over FPR in [0, fpr_limit] (trapezoid rule, the point at fpr_limit
    interpolated) and divides by fpr_limit, so a perfect map scores 1. masks and maps are
    (N, H, W) at ground-truth resolution. NaN when there are no anomalous or no normal pixels.
    """
    bool_masks, float_maps = _pixel_arrays(masks, maps)
    if not 0 < fpr_limit <= 1:
        raise FBClipError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return _official_au_pro(bool_masks, float_maps, fpr_limit)


def _codebase_thresholds(maps: np.ndarray, n_thresholds: int) -> np.ndarray:
    """np.arange(min, max, (max - min) / n) as the code bases write it, float quirks included."""
    low, high = maps.min(), maps.max()
    return np.arange(low, high, (high - low) / n_thresholds)


def _region_counts_above(
    labels: np.ndarray, maps: np.ndarray, thresholds: np.ndarray, n_regions: int
) -> np.ndarray:
    """(regions, thresholds) count of region pixels strictly above each threshold."""
    region_pixels = labels > 0
    # Pixel v is above thresholds[k] for every k < (number of thresholds strictly below v).
    n_below = np.searchsorted(thresholds, maps[region_pixels], side="left")
    n_steps = thresholds.size + 1
    flat = (labels[region_pixels] - 1) * n_steps + n_below
    hist = np.bincount(flat, minlength=n_regions * n_steps).reshape(n_regions, n_steps)
    at_or_above = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]
    return at_or_above[:, 1:]


def _codebase_au_pro(
    masks: np.ndarray, maps: np.ndarray, n_thresholds: int, fpr_limit: float
) -> float:
    if not masks.any() or masks.all():
        return float("nan")
    thresholds = _codebase_thresholds(maps, n_thresholds)
    if thresholds.size == 0:
        return float("nan")
    labels, sizes = _region_labels(masks)
    above = _region_counts_above(labels, maps, thresholds, sizes.size - 1)
    pros = np.mean(above / sizes[1:, None], axis=0)
    normal_sorted = np.sort(maps[~masks])
    normal_above = normal_sorted.size - np.searchsorted(normal_sorted, thresholds, side="right")
    fprs = normal_above / normal_sorted.size
    keep = fprs < fpr_limit
    if not keep.any():
        return 0.0
    fprs, pros = fprs[keep], pros[keep]
    span = fprs.max() - fprs.min()
    if span == 0:
        return float(pros.mean())
    return abs(_trapezoid((fprs - fprs.min()) / span, pros))


def au_pro_thresholds(
    masks: np.ndarray, maps: np.ndarray, n_thresholds: int = 200, fpr_limit: float = 0.3
) -> float:
    """AU-PRO as the public zero-shot code bases compute it (AnomalyCLIP/AdaCLIP cal_pro_score).

    n_thresholds steps from the map minimum towards the maximum; per step the map is binarized
    (score > t), PRO is averaged over 8-connected regions and FPR over normal pixels; steps with
    FPR < fpr_limit are kept, their FPR min-max normalized to [0, 1] and PRO integrated over it.
    Not comparable with au_pro. NaN when there are no anomalous or no normal pixels or the maps
    are constant; 0.0 when no step gets below fpr_limit; the mean PRO when the kept steps all
    share one FPR (the normalization is undefined there and the code bases would crash).
    """
    bool_masks, float_maps = _pixel_arrays(masks, maps)
    if n_thresholds < 2:
        raise FBClipError(f"n_thresholds must be at least 2, got {n_thresholds}")
    return _codebase_au_pro(bool_masks, float_maps, n_thresholds, fpr_limit)


def evaluate(
    labels: np.ndarray,
    image_scores: np.ndarray,
    masks: np.ndarray | None,
    maps: np.ndarray | None,
) -> dict[str, float]:
    """All image and pixel metrics as fractions (not percent), keys as in METRIC_KEYS.

    masks and maps are (N, H, W) in [0, 1] at ground-truth resolution; pass None for both to
    get image metrics only (pixel metrics NaN). A metric is NaN when its set lacks a class.
    """
    y, s = _binary_scores(labels, image_scores)
    image_curve = _curve(y, s)
    result = {
        "image_auroc": _auroc_from_curve(image_curve),
        "image_ap": _ap_from_curve(image_curve),
        "image_f1_max": _f1_max_from_curve(image_curve),
    }
    result.update(_pixel_metrics(masks, maps, n_images=y.size))
    return result


def _pixel_metrics(
    masks: np.ndarray | None, maps: np.ndarray | None, n_images: int
) -> dict[str, float]:
    """Pixel metrics sharing one sort of all map values (the expensive step)."""
    pixel_keys = METRIC_KEYS[3:]
    if masks is None and maps is None:
        return dict.fromkeys(pixel_keys, float("nan"))
    if masks is None or maps is None:
        raise FBClipError("pass both masks and maps, or neither for image metrics only")
    bool_masks, float_maps = _pixel_arrays(masks, maps)
    if bool_masks.shape[0] != n_images:
        raise FBClipError(
            f"{n_images} image labels but {bool_masks.shape[0]} masks; pass one mask per image"
        )
    order = _descending_order(float_maps.ravel())
    pixel_curve = _curve(bool_masks.ravel(), float_maps.ravel(), order)
    return {
        "pixel_auroc": _auroc_from_curve(pixel_curve),
        "pixel_ap": _ap_from_curve(pixel_curve),
        "pixel_f1_max": _f1_max_from_curve(pixel_curve),
        "pixel_aupro": _official_au_pro(bool_masks, float_maps, 0.3, order),
        "pixel_aupro_200": _codebase_au_pro(bool_masks, float_maps, 200, 0.3),
    }
