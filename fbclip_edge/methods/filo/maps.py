"""Maps and scores (spec 5 and 7): similarity logits, probability maps, blur, image score.

The operations keep the reference's order and memory layouts (the logits viewed as a
channels-last B x 2 x g x g image before the upsample), so CPU float32 results agree to the
last bit with one image per call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def global_similarity(conditioning: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """s = c . T^T (B, 2): no temperature, no softmax (spec 5)."""
    return (conditioning.unsqueeze(1) @ text.permute(0, 2, 1))[:, 0]


def similarity_logits(
    features: torch.Tensor, text: torch.Tensor, scale: float = 100.0
) -> torch.Tensor:
    """Head output f (B, N, D), T (B, 2, D) -> scale * normalize(f) @ T^T (B, N, 2)."""
    unit = features / features.norm(dim=-1, keepdim=True)
    return scale * unit @ text.transpose(-2, -1)


def probability_map(logits: torch.Tensor, image_size: int) -> torch.Tensor:
    """(B, N, 2) -> P (B, 2, S, S): bilinear upsample (align_corners) then softmax."""
    batch, tokens, classes = logits.shape
    side = math.isqrt(int(tokens))
    grid = logits.permute(0, 2, 1).view(batch, classes, side, side)
    up = F.interpolate(grid, size=image_size, mode="bilinear", align_corners=True)
    return torch.softmax(up, dim=1)


def probability_maps(map_logits: torch.Tensor, image_size: int) -> list[torch.Tensor]:
    """(B, M, N, 2) -> M maps P_m (B, 2, S, S)."""
    return [probability_map(map_logits[:, m], image_size) for m in range(map_logits.shape[1])]


def abnormality(prob: torch.Tensor) -> torch.Tensor:
    """q = (P[1] - P[0] + 1) / 2 (B, S, S), computed as the reference does."""
    return (prob[:, 1, :, :] - prob[:, 0, :, :] + 1) / 2


def gaussian_kernel(sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """3 x 3 Gaussian weights as torchvision's GaussianBlur(3, sigma) builds them: (1, 1, 3, 3)."""
    x = torch.linspace(-1.0, 1.0, steps=3, dtype=dtype, device=device)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    kernel1d = pdf / pdf.sum()
    return torch.mm(kernel1d[:, None], kernel1d[None, :]).expand(1, 1, 3, 3)


def blur(maps: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    """3 x 3 Gaussian blur of (B, S, S) on a reflect-padded copy (the edge pixel is not
    repeated), per image as torchvision's GaussianBlur on a (1, S, S) map."""
    kernel = gaussian_kernel(sigma, maps.dtype, maps.device)
    padded = F.pad(maps.unsqueeze(1), [1, 1, 1, 1], mode="reflect")
    return F.conv2d(padded, kernel)[:, 0]


def anomaly_map(map_logits: torch.Tensor, image_size: int, sigma: float = 4.0) -> torch.Tensor:
    """A (B, S, S): mean over the M maps of the blurred q_m (spec 7.2)."""
    blurred = [blur(abnormality(p), sigma) for p in probability_maps(map_logits, image_size)]
    return torch.mean(torch.stack(blurred, dim=0), dim=0)


def unblurred_map(map_logits: torch.Tensor, image_size: int) -> torch.Tensor:
    """Mean of q_m before the blur (B, S, S): a diagnostic, not a reference output."""
    maps = [abnormality(p) for p in probability_maps(map_logits, image_size)]
    return torch.mean(torch.stack(maps, dim=0), dim=0)


def image_score(similarity: torch.Tensor, amap: torch.Tensor) -> torch.Tensor:
    """(s_abnormal + max A) / 2 (B,), before the box step; summed in float64 like the
    reference's Python floats, then rounded to float32."""
    peak = amap.flatten(1).amax(dim=1)
    return ((similarity[:, 1].double() + peak.double()) / 2).to(amap.dtype)
