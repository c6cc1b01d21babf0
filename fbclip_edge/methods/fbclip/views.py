"""Parameter-free parts of FB-CLIP: soft foreground mask, SEM/SPA views, background suppression.

All functions are batched over a leading axis, so the caller stacks (batch x layers) and
runs every layer in one call. Spec sections 3, 4 and 5.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F


def _minmax(values: torch.Tensor) -> torch.Tensor:
    """Per-row min-max normalization over tokens, guarded against flat rows."""
    low = values.amin(dim=-1, keepdim=True)
    high = values.amax(dim=-1, keepdim=True)
    return (values - low) / (high - low).clamp_min(1e-6)


def foreground_mask(
    tokens: torch.Tensor,
    cls: torch.Tensor,
    previous: torch.Tensor | None,
    weights: tuple[float, float, float, float] = (0.3, 0.3, 0.3, 0.1),
    smooth: int = 5,
    threshold: float = 0.5,
    low: float = 0.5,
) -> torch.Tensor:
    """Soft foreground mask p_fg in {low, 1} per patch token.

    tokens (L, N, Dv) patch tokens, cls (L, Dv), previous (L, N, Dv) tokens of the previous
    selected layer or None for the first. Cues are taken along the 1-D raster order, as the
    reference does.
    """
    pooled = F.avg_pool1d(tokens.transpose(1, 2), 3, stride=1, padding=1, count_include_pad=True)
    saliency = (tokens - pooled.transpose(1, 2)).norm(dim=-1)
    center = (tokens - tokens.mean(dim=1, keepdim=True)).norm(dim=-1)
    cls_inc = 1 - F.cosine_similarity(tokens, cls[:, None, :], dim=-1, eps=1e-8)
    if previous is None:
        change = torch.zeros_like(saliency)
    else:
        change = (tokens - previous).norm(dim=-1)
    cues = (saliency, center, cls_inc, change)
    score = cast(torch.Tensor, sum(w * _minmax(c) for w, c in zip(weights, cues, strict=True)))
    pad = smooth // 2
    score = F.pad(score[:, None], (pad, pad), mode="reflect")
    score = F.avg_pool1d(score, smooth, stride=1)[:, 0]
    return torch.where(score > threshold, torch.ones_like(score), torch.full_like(score, low))


def semantic_view(
    tokens: torch.Tensor, cls: torch.Tensor, fg: torch.Tensor, mix: float = 0.6
) -> torch.Tensor:
    """SEM view: foreground/background-restricted attention weighted by CLS dissimilarity."""
    similarity = F.cosine_similarity(tokens, cls[:, None, :], dim=-1, eps=1e-8)
    bg = 1 - fg
    attn_fg = ((1 - similarity)[:, :, None] * (fg[:, :, None] * fg[:, None, :])).softmax(dim=-1)
    attn_bg = (similarity[:, :, None] * (bg[:, :, None] * bg[:, None, :])).softmax(dim=-1)
    mixed = fg[..., None] * (attn_fg @ tokens) + bg[..., None] * (attn_bg @ tokens)
    return mix * mixed + (1 - mix) * tokens


def _neighbours(grid_map: torch.Tensor, kernel: int) -> list[torch.Tensor]:
    """The kernel x kernel zero-padded neighbour shifts of a (L, C, g, g) map, row-major."""
    side = grid_map.shape[-1]
    radius = kernel // 2
    padded = F.pad(grid_map, (radius, radius, radius, radius))
    return [
        padded[:, :, dy : dy + side, dx : dx + side] for dy in range(kernel) for dx in range(kernel)
    ]


def spatial_view(
    tokens: torch.Tensor, cls: torch.Tensor, fg: torch.Tensor, kernel: int = 5
) -> torch.Tensor:
    """SPA view: softmax-weighted pooling of fg and bg neighbours in a kernel x kernel window.

    Written as a loop over the kernel*kernel shifts instead of unfold, so memory stays
    O(tokens x width) rather than kernel^2 times that (ViT-L at 518 px would need GBs).
    """
    count, patches, width = tokens.shape
    side = round(int(patches) ** 0.5)  # int(): a constant when traced for ONNX
    grid_tokens = tokens.transpose(1, 2).reshape(count, width, side, side)
    grid_fg = fg.reshape(count, 1, side, side)
    cls_unit = F.normalize(cls, dim=-1)[:, :, None, None]
    shifts = list(zip(_neighbours(grid_tokens, kernel), _neighbours(grid_fg, kernel), strict=True))

    def cos_to_cls(vectors: torch.Tensor) -> torch.Tensor:
        return (F.normalize(vectors, dim=1) * cls_unit).sum(dim=1)

    fg_mean = sum(n * m for n, m in shifts) / len(shifts)
    bg_logits = torch.stack(
        [cos_to_cls(n * (1 - m)) * (n * (1 - m)).norm(dim=1) for n, m in shifts], 1
    )
    fg_logits = torch.stack(
        [(1 - cos_to_cls(n * m)) * (n * m - fg_mean).norm(dim=1) for n, m in shifts], 1
    )
    bg_weights = bg_logits.softmax(dim=1)
    fg_weights = fg_logits.softmax(dim=1)
    bg_sum = sum(bg_weights[:, j : j + 1] * n * (1 - m) for j, (n, m) in enumerate(shifts))
    fg_sum = sum(fg_weights[:, j : j + 1] * n * m for j, (n, m) in enumerate(shifts))
    bg_count = cast(torch.Tensor, sum(1 - m for _, m in shifts)).clamp_min(1e-8)
    fg_count = cast(torch.Tensor, sum(m for _, m in shifts)).clamp_min(1e-8)
    out = fg_sum / fg_count + bg_sum / bg_count
    return out.reshape(count, width, patches).transpose(1, 2)


def background_prototype(maps: torch.Tensor, mean_weight: float = 0.5) -> torch.Tensor:
    """b from the first floor(T/2) tokens of every map: mix of their mean and elementwise max."""
    batch, _, tokens, width = maps.shape
    bank = maps[:, :, : tokens // 2].reshape(batch, -1, width)
    return mean_weight * bank.mean(dim=1) + (1 - mean_weight) * bank.amax(dim=1)


def suppress_background(
    maps: torch.Tensor, background: torch.Tensor, mix: float = 0.5
) -> torch.Tensor:
    """F = mix*E + (1-mix)*(E - b)*(1 - cos(E, b)) for every map (B, M, T, Dv)."""
    proto = background[:, None, None, :]
    similarity = F.cosine_similarity(maps, proto, dim=-1, eps=1e-8)
    return mix * maps + (1 - mix) * (maps - proto) * (1 - similarity)[..., None]
