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


def cls_similarity(tokens: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """cos(x, c) of every patch token (L, N) with its CLS (L, Dv), torch.cosine_similarity
    with eps 1e-8: the mask's CLS cue and both views' logits read it, so it is computed once."""
    return F.cosine_similarity(tokens, cls[:, None, :], dim=-1, eps=1e-8)


def foreground_mask(
    tokens: torch.Tensor,
    similarity: torch.Tensor,
    previous: torch.Tensor | None,
    weights: tuple[float, float, float, float] = (0.3, 0.3, 0.3, 0.1),
    smooth: int = 5,
    threshold: float = 0.5,
    low: float = 0.5,
) -> torch.Tensor:
    """Soft foreground mask p_fg in {low, 1} per patch token.

    tokens (L, N, Dv) patch tokens, similarity (L, N) their `cls_similarity`, previous
    (L, N, Dv) tokens of the previous selected layer or None for the first. Cues are taken
    along the 1-D raster order, as the reference does.
    """
    pooled = F.avg_pool1d(tokens.transpose(1, 2), 3, stride=1, padding=1, count_include_pad=True)
    saliency = (tokens - pooled.transpose(1, 2)).norm(dim=-1)
    center = (tokens - tokens.mean(dim=1, keepdim=True)).norm(dim=-1)
    cls_inc = 1 - similarity
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
    tokens: torch.Tensor,
    similarity: torch.Tensor,
    fg: torch.Tensor,
    mix: float = 0.6,
    low: float = 0.5,
) -> torch.Tensor:
    """SEM view: foreground/background-restricted attention weighted by CLS dissimilarity.

    The spec's logits (1 - s_i) fg_i fg_k and s_i bg_i bg_k are outer products, and fg holds
    only the values 1 and `low` (foreground_mask's output). So every softmax row takes one
    value per group of tokens (fg_k = 1, fg_k = low) and mixes the two group sums with two
    weights: two (N x 2) matrix products replace the N x N attention, O(N Dv) instead of
    O(N^2 Dv) and no N x N tensor; equal to the spec's form up to float rounding.
    """
    high = (fg == 1).to(tokens.dtype)
    groups = torch.stack([high, 1 - high], dim=-1)  # (L, N, 2) membership
    sums = groups.transpose(1, 2) @ tokens  # (L, 2, Dv): the token sum of each group
    sizes = groups.sum(dim=1, keepdim=True)  # (L, 1, 2)
    fg_values = tokens.new_tensor([1.0, low])  # fg_k of each group

    def member_weights(rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """softmax_k(rows_i * values_k) as (L, N, 2): the weight of one member of each group."""
        logits = rows[..., None] * values
        exp = (logits - logits.amax(dim=-1, keepdim=True)).exp()
        return exp / (exp * sizes).sum(dim=-1, keepdim=True)

    bg = 1 - fg
    fg_weights = member_weights((1 - similarity) * fg, fg_values)
    bg_weights = member_weights(similarity * bg, 1 - fg_values)
    weights = fg[..., None] * fg_weights + bg[..., None] * bg_weights
    return torch.baddbmm(tokens, weights, sums, beta=1 - mix, alpha=mix)


def _windows(grid: torch.Tensor, kernel: int, fill: float = 0.0) -> list[torch.Tensor]:
    """The kernel x kernel neighbours of every cell of a (L, g, g, ...) grid, row-major, with
    `fill` beyond the border: one shifted view of the padded grid per window position."""
    side = int(grid.shape[1])  # a constant when traced for ONNX
    radius = kernel // 2
    padded = F.pad(grid, [0, 0] * (grid.dim() - 3) + [radius] * 4, value=fill)
    return [
        padded[:, dy : dy + side, dx : dx + side] for dy in range(kernel) for dx in range(kernel)
    ]


def spatial_view(
    tokens: torch.Tensor, similarity: torch.Tensor, fg: torch.Tensor, kernel: int = 5
) -> torch.Tensor:
    """SPA view: softmax-weighted pooling of fg and bg neighbours in a kernel x kernel window.

    Restated from the spec's per-neighbour form (the tests keep that form as the reference).
    A neighbour n_j with mask m_j has cos(m_j n_j, c) = s_j, its CLS similarity, and
    ||(1 - m_j) n_j|| = (1 - m_j) ||n_j||: both logits' per-token factors are computed once
    and shifted as scalars (for tokens of norm >= 1e-8, i.e. all real ones). Only the fg
    distance ||z_j - mean z|| needs a pass over the vectors per window position, and the fg
    and bg sums fold into one weight per neighbour: one multiply-add per position makes the
    output. Tokens stay channel-last (the norms reduce contiguous rows), and memory stays
    O(tokens x width): every shifted grid is a view.
    """
    count, patches, width = tokens.shape
    side = round(int(patches) ** 0.5)  # int(): a constant when traced for ONNX
    grid = tokens.reshape(count, side, side, width)
    mask = fg.reshape(count, side, side)
    cos = similarity.reshape(count, side, side)
    fg_part = grid * mask[..., None]
    # Padded neighbours are zero vectors with p_fg = 0: bg logit 0, fg dissimilarity 1.
    bg_logit = cos * (1 - mask) * grid.norm(dim=-1)
    fg_mean = F.avg_pool2d(
        fg_part.permute(0, 3, 1, 2), kernel, stride=1, padding=kernel // 2, count_include_pad=True
    ).permute(0, 2, 3, 1)
    fg_distance = torch.stack(
        [(z - fg_mean).norm(dim=-1) for z in _windows(fg_part, kernel)], dim=1
    )
    fg_logits = torch.stack(_windows(1 - cos, kernel, 1.0), dim=1) * fg_distance
    bg_logits = torch.stack(_windows(bg_logit, kernel), dim=1)
    masks = torch.stack(_windows(mask, kernel), dim=1)  # (L, k*k, g, g)
    fg_count = masks.sum(dim=1, keepdim=True).clamp_min(1e-8)
    bg_count = (1 - masks).sum(dim=1, keepdim=True).clamp_min(1e-8)
    weights = fg_logits.softmax(dim=1) * masks / fg_count
    weights = weights + bg_logits.softmax(dim=1) * (1 - masks) / bg_count
    neighbours = _windows(grid, kernel)
    out = weights[:, 0, :, :, None] * neighbours[0]
    for index in range(1, len(neighbours)):  # in place: no product is saved for backward
        out.addcmul_(weights[:, index, :, :, None], neighbours[index])
    return out.reshape(count, patches, width)


def background_prototype(maps: torch.Tensor, mean_weight: float = 0.5) -> torch.Tensor:
    """b from the first floor(T/2) tokens of every map: mix of their mean and elementwise max."""
    batch, _, tokens, width = maps.shape
    bank = maps[:, :, : tokens // 2].reshape(batch, -1, width)
    return mean_weight * bank.mean(dim=1) + (1 - mean_weight) * bank.amax(dim=1)


def suppress_and_project(
    maps: torch.Tensor, background: torch.Tensor, proj: torch.Tensor, mix: float = 0.5
) -> torch.Tensor:
    """P = F @ proj with F = mix*E + (1-mix)*(E - b)*(1 - cos(E, b)) for every map (B, M, T, Dv).

    F = alpha*E - beta*b with per-token beta = (1-mix)(1 - s) and alpha = mix + beta, so
    P = alpha*(E @ proj) - beta*(b @ proj): the suppression's elementwise work runs after the
    projection, on D instead of Dv columns, and s = cos(E, b) is one matrix-vector product
    with the unit prototype and one norm; no suppressed copy of E is made. Equal to the
    spec's form (spec section 5, then the projection) up to float rounding.
    """
    unit = background / background.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    similarity = (maps @ unit[:, None, :, None])[..., 0] / maps.norm(dim=-1).clamp_min(1e-8)
    beta = ((1 - mix) * (1 - similarity))[..., None]
    proj = proj.to(maps.dtype)
    projected = maps @ proj
    # In place on the fresh product: autograd saves the factors, never the product itself.
    projected.mul_(mix + beta)
    return projected.addcmul_(beta, (background @ proj)[:, None, None, :], value=-1)
