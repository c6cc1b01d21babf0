"""Metrics against scikit-learn on random data and AU-PRO on hand-derived small cases."""

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import (
    auc,
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
)

from fbclip_edge import metrics
from fbclip_edge.errors import FBClipError


def sklearn_f1_max(y, s):
    precision, recall, _ = precision_recall_curve(y, s)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom != 0)
    return f1.max()


def random_case(rng, n, ties):
    y = rng.integers(0, 2, n)
    y[0], y[1] = 0, 1
    s = rng.integers(0, 6, n).astype(float) if ties else rng.random(n)
    return y, s


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_image_metrics_match_sklearn(seed, ties):
    rng = np.random.default_rng(seed)
    y, s = random_case(rng, int(rng.integers(5, 300)), ties)
    assert metrics.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert metrics.average_precision(y, s) == pytest.approx(
        average_precision_score(y, s), abs=1e-12
    )
    assert metrics.f1_max(y, s) == pytest.approx(sklearn_f1_max(y, s), abs=1e-12)


def test_evaluate_matches_sklearn_on_random_maps():
    rng = np.random.default_rng(7)
    masks = np.zeros((6, 32, 32), dtype=np.float32)
    masks[1, 4:10, 5:12] = 1
    masks[3, 20:30, 2:6] = 1
    masks[4, 0:3, 0:3] = 1
    maps = np.clip(rng.random(masks.shape) * 0.8 + masks * 0.3, 0, 1).astype(np.float32)
    maps = np.round(maps * 50) / 50  # many ties
    labels = masks.reshape(6, -1).max(axis=1)
    scores = maps.reshape(6, -1).max(axis=1)
    result = metrics.evaluate(labels, scores, masks, maps)
    assert set(result) == set(metrics.METRIC_KEYS)
    y, s = masks.ravel(), maps.ravel()
    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert result["image_ap"] == pytest.approx(average_precision_score(labels, scores))
    assert result["image_f1_max"] == pytest.approx(sklearn_f1_max(labels, scores))
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(y, s))
    assert result["pixel_ap"] == pytest.approx(average_precision_score(y, s))
    assert result["pixel_f1_max"] == pytest.approx(sklearn_f1_max(y, s))
    assert result["pixel_aupro"] == pytest.approx(metrics.au_pro(masks, maps))
    assert result["pixel_aupro_200"] == pytest.approx(metrics.au_pro_thresholds(masks, maps))
    assert all(0 <= v <= 1 for v in result.values())


def test_single_class_gives_nan():
    assert math.isnan(metrics.auroc([0, 0, 0], [0.1, 0.5, 0.2]))
    assert math.isnan(metrics.average_precision([0, 0], [0.1, 0.5]))
    no_defects = np.zeros((2, 8, 8))
    assert math.isnan(metrics.au_pro(no_defects, np.random.default_rng(0).random((2, 8, 8))))
    assert math.isnan(metrics.au_pro_thresholds(no_defects, np.ones((2, 8, 8))))
    result = metrics.evaluate([0, 1], [0.2, 0.9], None, None)
    assert result["image_auroc"] == 1.0 and math.isnan(result["pixel_aupro"])


def test_shape_mismatch_is_a_user_error():
    with pytest.raises(FBClipError, match="must both be"):
        metrics.au_pro(np.zeros((2, 8, 8)), np.zeros((2, 4, 4)))
    with pytest.raises(FBClipError, match="one score per label"):
        metrics.evaluate([0, 1, 1], [0.2, 0.3], None, None)


# --------------------------------------------------------------------------- AU-PRO by hand


def one_region_case():
    """4x4 image, one 2x2 defect region (4 px), 12 normal pixels.

    region scores 1.0, 0.8, 0.6, 0.3; normal scores 0.7, 0.4 and ten 0.0.
    """
    mask = np.zeros((4, 4))
    mask[:2, :2] = 1
    amap = np.zeros((4, 4))
    amap[0, 0], amap[0, 1], amap[1, 0], amap[1, 1] = 1.0, 0.8, 0.6, 0.3
    amap[3, 3], amap[3, 2] = 0.7, 0.4
    return mask[None], amap[None]


def test_au_pro_one_region():
    masks, maps = one_region_case()
    # Exact curve, thresholds high to low, (FPR over 12 normal px, PRO = covered/4):
    # 1.0 -> (0, 1/4); 0.8 -> (0, 2/4); 0.7 -> (1/12, 2/4); 0.6 -> (1/12, 3/4);
    # 0.4 -> (2/12, 3/4); 0.3 -> (2/12, 1); 0.0 -> (1, 1).
    # Area to FPR 0.3: 1/12 * 0.5 + 1/12 * 0.75 + (0.3 - 2/12) * 1 = 0.2375
    # AU-PRO = 0.2375 / 0.3 = 19/24
    assert metrics.au_pro(masks, maps) == pytest.approx(19 / 24)
    # Limit 0.1 falls inside the flat 0.75 step: 1/12 * 0.5 + (0.1 - 1/12) * 0.75 = 0.0541667
    # / 0.1 = 13/24
    assert metrics.au_pro(masks, maps, fpr_limit=0.1) == pytest.approx(13 / 24)


def test_au_pro_thresholds_one_region():
    masks, maps = one_region_case()
    # Code-base variant with 4 steps: thresholds arange(0, 1, 0.25) = 0, .25, .5, .75; a pixel
    # counts when score > threshold:
    # t=0:   PRO 4/4, FPR 2/12   t=.25: PRO 4/4, FPR 2/12
    # t=.5:  PRO 3/4, FPR 1/12   t=.75: PRO 2/4, FPR 0
    # All FPR < 0.3; min-max normalized FPR: 1, 1, 0.5, 0.
    # Trapezoid: 0 + 0.5 * (1 + 0.75) / 2 + 0.5 * (0.75 + 0.5) / 2 = 0.4375 + 0.3125 = 0.75
    assert metrics.au_pro_thresholds(masks, maps, n_thresholds=4) == pytest.approx(0.75)


def two_region_case():
    """5x5 image: region A 2x2 (4 px) top-left, region B one pixel bottom-right, 20 normal.

    B scores 1.0, one normal pixel 0.8, A scores 0.6, the other 19 normal pixels 0.0.
    """
    mask = np.zeros((5, 5))
    mask[:2, :2] = 1
    mask[4, 4] = 1
    amap = np.zeros((5, 5))
    amap[4, 4], amap[0, 4], amap[:2, :2] = 1.0, 0.8, 0.6
    return mask[None], amap[None]


def test_au_pro_two_regions_of_unequal_size():
    masks, maps = two_region_case()
    # Regions count equally, whatever their size: PRO = (overlap_A + overlap_B) / 2.
    # 1.0 -> (0, (0 + 1)/2 = 0.5); 0.8 -> (1/20, 0.5); 0.6 -> (1/20, 1); 0.0 -> (1, 1).
    # Area to 0.3: 0.05 * 0.5 + (0.3 - 0.05) * 1 = 0.275; / 0.3 = 11/12.
    # (Pixel-weighted overlap would have given B only 1/5 of the weight.)
    assert metrics.au_pro(masks, maps) == pytest.approx(11 / 12)
    # Code-base variant, 5 steps: thresholds 0, .2, .4, .6, .8 (score > t):
    # t=0, .2, .4: PRO 1, FPR 1/20;  t=.6: PRO (0 + 1)/2 = .5, FPR 1/20;  t=.8: PRO .5, FPR 0.
    # Normalized FPR 1, 1, 1, 1, 0: the only width is the last segment at height 0.5 -> 0.5.
    assert metrics.au_pro_thresholds(masks, maps, n_thresholds=5) == pytest.approx(0.5)


def test_au_pro_uses_eight_connectivity():
    # Pixel (0,0) touches the 2x2 block at (1..2, 1..2) only diagonally: one region of 5 px.
    mask = np.zeros((4, 4))
    mask[0, 0] = 1
    mask[1:3, 1:3] = 1
    amap = np.full((4, 4), 0.3)
    amap[0, 0], amap[1:3, 1:3] = 0.9, 0.2
    # 0.9 -> (0, 1/5); 0.3 -> (1, 1/5); 0.2 -> (1, 1). Area to 0.3 = 0.3 * 0.2; / 0.3 = 0.2.
    # With 4-connectivity the regions would be {(0,0)} and the block: PRO 0.5 -> 0.5.
    assert metrics.au_pro(mask[None], amap[None]) == pytest.approx(0.2)


def test_au_pro_perfect_and_backwards_maps():
    masks, _ = two_region_case()
    perfect = masks.copy()  # 1 on every defect pixel, 0 elsewhere
    # Curve (0, 0) -> (0, 1) -> (1, 1): area to 0.3 is 0.3, so 1.
    assert metrics.au_pro(masks, perfect) == pytest.approx(1.0)
    backwards = 1 - masks
    # Curve (0, 0) -> (1, 0) -> (1, 1): PRO is 0 on all of [0, 0.3], so 0.
    assert metrics.au_pro(masks, backwards) == pytest.approx(0.0)
    # Code-base variant: binary maps leave all kept steps at FPR 0 (documented: mean PRO, 1)
    # or no step below 0.3 (documented: 0).
    assert metrics.au_pro_thresholds(masks, perfect) == pytest.approx(1.0)
    assert metrics.au_pro_thresholds(masks, backwards) == pytest.approx(0.0)
    # A perfect ranking with spread normal scores: every step has PRO 1 -> area 1.
    spread = np.where(masks > 0, 1.0, np.linspace(0, 0.4, masks.size).reshape(masks.shape))
    assert metrics.au_pro_thresholds(masks, spread) == pytest.approx(1.0)


# --------------------------------------------------------------------------- brute force


def brute_force_official(masks, maps, limit=0.3):
    """One full pass per distinct threshold, straight from the definition."""
    structure = np.ones((3, 3))
    labelled = [ndimage.label(m, structure) for m in masks]
    normal = masks == 0
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        hit = maps >= t
        fprs.append((hit & normal).sum() / normal.sum())
        overlaps = [
            hit[i][lab == k].mean() for i, (lab, n) in enumerate(labelled) for k in range(1, n + 1)
        ]
        pros.append(np.mean(overlaps))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= limit
    x, y = fprs[keep], pros[keep]
    nxt = np.argmax(fprs > limit)
    y_lim = y[-1] + (pros[nxt] - y[-1]) * (limit - x[-1]) / (fprs[nxt] - x[-1])
    x, y = np.r_[x, limit], np.r_[y, y_lim]
    return np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / limit


def brute_force_codebase(masks, maps, steps=200, limit=0.3):
    """cal_pro_score of the public zero-shot code bases, with scipy's 8-connected labels."""
    low, high = maps.min(), maps.max()
    pros, fprs = [], []
    for t in np.arange(low, high, (high - low) / steps):
        binary = maps > t
        overlaps = []
        for b, m in zip(binary, masks, strict=True):
            lab, n = ndimage.label(m, np.ones((3, 3)))
            overlaps += [b[lab == k].sum() / (lab == k).sum() for k in range(1, n + 1)]
        pros.append(np.mean(overlaps))
        fprs.append(np.logical_and(1 - masks, binary).sum() / (1 - masks).sum())
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < limit
    fprs = fprs[keep]
    return auc((fprs - fprs.min()) / (fprs.max() - fprs.min()), pros[keep])


@pytest.mark.parametrize("seed", range(3))
def test_au_pro_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 20, 20))
    masks[0, 2:6, 3:5] = 1
    masks[0, 12, 12] = 1
    masks[1, 10:18, 1:9] = 1
    masks[2, 0:2, 18:20] = 1
    maps = rng.random(masks.shape) * 0.7 + masks * rng.uniform(0.1, 0.4)
    if seed == 2:
        maps = np.round(maps * 10) / 10  # heavy ties
    assert metrics.au_pro(masks, maps) == pytest.approx(brute_force_official(masks, maps))
    assert metrics.au_pro_thresholds(masks, maps) == pytest.approx(
        brute_force_codebase(masks, maps)
    )
