"""Reading images and ground-truth masks into numpy, with errors that name the bad file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fbclip_edge.errors import FBClipError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


class ImageReadError(FBClipError):
    """An image or mask file that is missing, truncated or not an image at all."""


def _open(path: Path, what: str) -> Image.Image:
    """Open and fully decode, so a truncated file fails here and not deep inside a batch."""
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise ImageReadError(
            f"{what} not found: {path}; restore the file or regenerate the dataset index"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(
            f"cannot read {what} {path} ({type(exc).__name__}: {exc}); the file is corrupt "
            "or not an image, re-download it or remove it from the dataset"
        ) from None
    return image


def _to_uint8(image: Image.Image) -> np.ndarray:
    """16-bit and 32-bit greyscale are rescaled to 8 bits instead of being clipped by PIL."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        return np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.asarray(image.convert("L"), dtype=np.uint8)


def read_image(path: str | Path) -> np.ndarray:
    """The image as uint8 RGB (H, W, 3); greyscale, palette and alpha images are converted."""
    path = Path(path)
    image = _open(path, "image")
    if image.mode in ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LA", "L", "1"):
        return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
    grey = _to_uint8(image)
    return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))


def _mask_values(image: Image.Image) -> np.ndarray:
    """Raw mask values: palette indices stay indices (index 0 is the background)."""
    if image.mode in ("P", "L", "1", "I", "I;16", "I;16B", "I;16L"):
        return np.asarray(image).astype(np.int64)
    return np.asarray(image.convert("L")).astype(np.int64)


def read_mask(path: str | Path | None, shape: tuple[int, ...]) -> np.ndarray:
    """Ground truth as float32 {0, 1} of the given (H, W); None (a good sample) gives zeros.

    Masks stored as 0/1 and as 0/255 are both accepted (VisA ships both); 0/255 masks are
    cut at 128 so JPEG-compressed masks do not turn their noise into defects. A mask whose
    size differs from the image is resized with nearest-neighbour sampling.
    """
    height, width = int(shape[0]), int(shape[1])
    if path is None:
        return np.zeros((height, width), dtype=np.float32)
    path = Path(path)
    values = _mask_values(_open(path, "mask"))
    if values.ndim == 3:
        values = values.max(axis=2)
    cut = 0 if values.max(initial=0) <= 1 else 127
    binary = values > cut
    if binary.shape != (height, width):
        resized = Image.fromarray(binary.astype(np.uint8) * 255).resize(
            (width, height), Image.Resampling.NEAREST
        )
        binary = np.asarray(resized) > 127
    return binary.astype(np.float32)
