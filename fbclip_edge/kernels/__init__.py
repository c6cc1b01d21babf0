"""Fused patch-scoring and anomaly-map kernels: Triton on CUDA, plain torch elsewhere.

Importing this package does not import Triton; see dispatch.py for how impl='auto' chooses.
"""

from __future__ import annotations

import torch

from fbclip_edge.kernels.dispatch import (
    BackendInfo,
    backend_info,
    needs_grad,
    resolve_impl,
    selected_impl,
    triton_modules,
)
from fbclip_edge.kernels.reference import anomaly_map_torch, score_maps_torch


def score_maps(
    maps: torch.Tensor,
    text: torch.Tensor,
    map_weights: torch.Tensor,
    temperature: float = 0.07,
    impl: str = "auto",
    rule: str = "logit_sum",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image score (B,) and patch probabilities (B, T-1), float32, from (B, M, T, D) maps.

    rule: 'logit_sum' (FB-CLIP) or 'prob_sum' (AnomalyCLIP), see `score_maps_torch`.
    impl: 'auto' (Triton on CUDA without autograd, else torch), 'triton' or 'torch'.
    """
    chosen = resolve_impl(impl, maps.device, needs_grad(maps, text, map_weights))
    if chosen == "triton":
        score_module, _ = triton_modules()
        return score_module.score_maps_triton(maps, text, map_weights, temperature, rule)
    return score_maps_torch(maps, text, map_weights, temperature, rule)


def anomaly_map(
    patch_prob: torch.Tensor,
    size: tuple[int, int],
    sigma: float = 4.0,
    impl: str = "auto",
) -> torch.Tensor:
    """Bilinear upsample to size then scipy-equivalent Gaussian blur: float32 (B, H, W).

    impl: 'auto' (Triton on CUDA without autograd, else torch), 'triton' or 'torch'.
    """
    chosen = resolve_impl(impl, patch_prob.device, needs_grad(patch_prob))
    if chosen == "triton":
        _, map_module = triton_modules()
        return map_module.anomaly_map_triton(patch_prob, size, sigma)
    return anomaly_map_torch(patch_prob, size, sigma)


__all__ = [
    "BackendInfo",
    "anomaly_map",
    "anomaly_map_torch",
    "backend_info",
    "score_maps",
    "score_maps_torch",
    "selected_impl",
]
