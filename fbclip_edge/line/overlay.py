"""Pictures a person looks at: frame, heat map and defect contour side by side."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw
from scipy import ndimage

BAR = 18  # caption height in pixels


def heat_colors(anomaly_map: np.ndarray, vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
    """(H, W) probabilities -> (H, W, 3) uint8 'jet' colours on a fixed 0..1 scale,
    so maps of different frames are comparable."""
    scaled = np.clip((anomaly_map - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    return (colormaps["jet"](scaled)[..., :3] * 255).astype(np.uint8)


def contour(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """Boundary pixels of a boolean mask, `width` pixels thick."""
    if not mask.any():
        return mask
    return mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)


def overlay_panel(
    image: np.ndarray, anomaly_map: np.ndarray, defect_mask: np.ndarray, caption: str
) -> Image.Image:
    """[frame | heat map blended over the frame | frame with defect contour] + caption bar."""
    height, width = image.shape[:2]
    heat = (0.5 * image + 0.5 * heat_colors(anomaly_map)).astype(np.uint8)
    outlined = image.copy()
    outlined[contour(defect_mask)] = (255, 0, 0)
    canvas = Image.new("RGB", (3 * width, height + BAR), "black")
    for index, panel in enumerate((image, heat, outlined)):
        canvas.paste(Image.fromarray(panel), (index * width, BAR))
    ImageDraw.Draw(canvas).text((4, 3), caption, fill="white")
    return canvas
