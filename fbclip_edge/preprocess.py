"""Frames -> normalized pixel tensors exactly as the reference prepares them (spec section 1).

RGB, bicubic resize to S x S (no crop), scale to [0, 1], OpenAI mean/std.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fbclip_edge.errors import FBClipError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

ImageLike = np.ndarray | Image.Image


def to_rgb_uint8(image: ImageLike) -> np.ndarray:
    """Any supported frame -> (H, W, 3) uint8 RGB.

    Accepts PIL images of any mode and numpy arrays: (H, W) grey, (H, W, 1|3|4),
    uint8 or uint16 (16-bit scaled to 8-bit). Alpha is dropped.
    """
    if isinstance(image, Image.Image):
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            return to_rgb_uint8(np.asarray(image))
        return np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise FBClipError(f"expected a numpy array or PIL image, got {type(image).__name__}")
    array = image
    if array.dtype == np.uint16 or array.dtype == np.int32:
        array = np.clip(np.rint(array.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
    elif array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        raise FBClipError(
            f"image dtype {array.dtype} is not supported; pass uint8 (0-255) or uint16 frames"
        )
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or min(array.shape[:2]) < 1:
        raise FBClipError(
            f"image shape {array.shape} is not (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"
        )
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3])


def resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """PIL bicubic resize to size x size (what torchvision's Resize does on PIL images)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) or float [0, 1] -> OpenAI-normalized float32."""
    if pixels.dtype == torch.uint8:
        pixels = pixels.float() / 255.0
    mean = torch.tensor(OPENAI_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float() - mean) / std


def preprocess(images: ImageLike | Sequence[ImageLike], image_size: int = 518) -> torch.Tensor:
    """One frame or a list of frames of any size and mode -> float32 (B, 3, S, S)."""
    frames = [images] if isinstance(images, (np.ndarray, Image.Image)) else list(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        frames = list(images)
    if not frames:
        raise FBClipError("no images given to preprocess")
    resized = [resize_rgb(to_rgb_uint8(frame), image_size) for frame in frames]
    batch = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2)
    return normalize(batch)


def preprocess_tensor(frames: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (B, H, W, 3) tensor, on any device -> normalized float32 (B, 3, S, S) there.

    torch bicubic with antialias, rounded to 8 bits as PIL does: close to, not bit-equal
    with, `preprocess`; on a GPU it avoids a host-side resize per frame.
    """
    pixels = frames.permute(0, 3, 1, 2).float()
    if pixels.shape[-2:] != (image_size, image_size):
        pixels = F.interpolate(
            pixels,
            size=(image_size, image_size),
            mode="bicubic",
            antialias=True,
            align_corners=False,
        )
        pixels = pixels.round_().clamp_(0, 255)
    return normalize(pixels / 255.0)
