"""Fused patch-scoring and anomaly-map kernels: Triton on CUDA, plain torch elsewhere."""

from fbclip_edge.kernels.reference import anomaly_map_torch, score_maps_torch

score_maps = score_maps_torch
anomaly_map = anomaly_map_torch

__all__ = ["anomaly_map", "anomaly_map_torch", "score_maps", "score_maps_torch"]
