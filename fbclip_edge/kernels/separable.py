"""The anomaly map as one small linear operator per axis: out = A_h @ grid @ A_w.T.

Bilinear resizing and the reflect-padded Gaussian are both separable and linear, so each axis
folds into one (out_len, in_len) matrix; the Triton map kernel is then a single output pass.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fbclip_edge.kernels.reference import gaussian_kernel1d, reflect_indices


def bilinear_matrix(in_len: int, out_len: int) -> torch.Tensor:
    """(out_len, in_len) float64 weights of F.interpolate(bilinear, align_corners=False)."""
    eye = torch.eye(in_len, dtype=torch.float64)[None, None]
    return F.interpolate(eye, size=(out_len, in_len), mode="bilinear", align_corners=False)[0, 0]


def gaussian_matrix(length: int, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """(length, length) float64 matrix of scipy's gaussian_filter1d with mode='reflect'."""
    if sigma <= 0:
        return torch.eye(length, dtype=torch.float64)
    kernel = gaussian_kernel1d(sigma, truncate)
    taps = kernel.numel()
    radius = (taps - 1) // 2
    cols = reflect_indices(length, radius).unfold(0, taps, 1).reshape(-1)
    rows = torch.arange(length).repeat_interleave(taps)
    matrix = torch.zeros(length, length, dtype=torch.float64)
    return matrix.index_put_((rows, cols), kernel.repeat(length), accumulate=True)


def axis_operator(in_len: int, out_len: int, sigma: float) -> torch.Tensor:
    """(out_len, in_len) float64: bilinear resize followed by the Gaussian along one axis."""
    return gaussian_matrix(out_len, sigma) @ bilinear_matrix(in_len, out_len)


@functools.lru_cache(maxsize=64)
def _cached_operator(in_len: int, out_len: int, sigma: float, device: str) -> torch.Tensor:
    return axis_operator(in_len, out_len, sigma).to(device=device, dtype=torch.float32)


def axis_operator_on(in_len: int, out_len: int, sigma: float, device: torch.device) -> torch.Tensor:
    """Cached float32 axis_operator on device (built once per size, sigma and device)."""
    return _cached_operator(int(in_len), int(out_len), float(sigma), str(device))
