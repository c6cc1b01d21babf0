"""Plain-torch reference for the fused scoring and anomaly-map kernels (spec section 6).

These are the ground truth the Triton kernels are tested against, the CPU / Jetson path,
and the differentiable path used in training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def score_maps_torch(
    maps: torch.Tensor,
    text: torch.Tensor,
    map_weights: torch.Tensor,
    temperature: float = 0.07,
    rule: str = "logit_sum",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score projected token maps against the two frozen text vectors.

    maps (B, M, T, D) CLS first, text (2, D) rows [normal, abnormal], map_weights (M,).
    rule 'logit_sum' (FB-CLIP): the weighted sum of the per-map logits, one softmax; the
    image score is its CLS row. rule 'prob_sum' (AnomalyCLIP): a softmax per map, then the
    weighted sum of the abnormal probabilities; the image score is map 0's CLS row alone.
    Returns float32 image_score (B,) and patch_prob (B, T-1).
    """
    maps = maps.float()
    logits = torch.einsum("bmtd,kd->bmtk", F.normalize(maps, dim=-1), text.float()) / temperature
    weights = map_weights.float()[None, :, None]
    if rule == "logit_sum":
        prob = (logits * weights[..., None]).sum(dim=1).softmax(dim=-1)[..., 1]
        return prob[:, 0], prob[:, 1:]
    if rule == "prob_sum":
        prob = logits.softmax(dim=-1)[..., 1]
        return prob[:, 0, 0], (prob[:, :, 1:] * weights).sum(dim=1)
    raise ValueError(f"unknown scoring rule {rule!r}; use 'logit_sum' or 'prob_sum'")


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage's 1-D Gaussian: radius int(truncate * sigma + 0.5), normalized to 1."""
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / float(sigma)) ** 2)
    return kernel / kernel.sum()


def reflect_indices(length: int, radius: int) -> torch.Tensor:
    """Source indices for scipy's mode='reflect' (d c b a | a b c d | d c b a) padding."""
    idx = torch.arange(-radius, length + radius)
    period = 2 * length
    idx = torch.remainder(idx, period)
    return torch.where(idx >= length, period - 1 - idx, idx)


def as_grid(patch_prob: torch.Tensor) -> torch.Tensor:
    """Accept (B, N), (B, g, g) or (B, 1, g, g) and return (B, 1, g, g)."""
    if patch_prob.dim() == 2:
        side = math.isqrt(patch_prob.shape[1])
        if side * side != patch_prob.shape[1]:
            raise ValueError(f"patch_prob has {patch_prob.shape[1]} patches, not a square grid")
        return patch_prob.reshape(patch_prob.shape[0], 1, side, side)
    if patch_prob.dim() == 3:
        return patch_prob[:, None]
    if patch_prob.dim() == 4 and patch_prob.shape[1] == 1:
        return patch_prob
    raise ValueError(
        f"patch_prob must be (B, N), (B, g, g) or (B, 1, g, g); got {tuple(patch_prob.shape)}"
    )


def anomaly_map_torch(
    patch_prob: torch.Tensor, size: tuple[int, int], sigma: float = 4.0
) -> torch.Tensor:
    """Bilinear upsample (align_corners=False) to size, then scipy-equivalent Gaussian blur.

    Returns float32 (B, H, W). sigma <= 0 skips the blur.
    """
    grid = as_grid(patch_prob).float()
    height, width = int(size[0]), int(size[1])
    up = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    if sigma <= 0:
        return up
    kernel = gaussian_kernel1d(sigma).to(device=up.device, dtype=up.dtype)
    radius = (kernel.numel() - 1) // 2
    rows = up[:, reflect_indices(height, radius).to(up.device), :]
    up = F.conv2d(rows[:, None], kernel.view(1, 1, -1, 1))[:, 0]
    cols = up[:, :, reflect_indices(width, radius).to(up.device)]
    return F.conv2d(cols[:, None], kernel.view(1, 1, 1, -1))[:, 0]
