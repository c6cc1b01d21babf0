"""Patch map -> full-resolution anomaly map (spec section 6), for numpy or torch callers."""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

from fbclip_edge.kernels import anomaly_map as _anomaly_map_kernel

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def anomaly_map(patch_map: ArrayT, size: tuple[int, int], sigma: float = 4.0) -> ArrayT:
    """(B, 1, g, g) patch probabilities -> (B, H, W): bilinear upsample, Gaussian blur.

    Returns the same kind as the input: numpy in, numpy out; torch in, torch out.
    """
    if isinstance(patch_map, np.ndarray):
        result = _anomaly_map_kernel(
            torch.from_numpy(np.asarray(patch_map, np.float32)), size, sigma
        )
        return result.numpy()
    return _anomaly_map_kernel(patch_map, size, sigma)
