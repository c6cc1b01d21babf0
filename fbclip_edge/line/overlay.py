"""Pictures a person looks at: frame, heat map and defect contour side by side."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw
from scipy import ndimage

from fbclip_edge.runtime.base import Box

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


ANOMALY_BOX = (255, 0, 0)
OTHER_BOX = (255, 210, 0)


def draw_boxes(canvas: Image.Image, boxes: Sequence[Box], left: int, top: int) -> None:
    """A box prior's boxes on the panel at (left, top): anomaly boxes red, the others
    yellow, each with its label; clipped to the panel (boxes may reach past the frame)."""
    draw = ImageDraw.Draw(canvas)
    for box in boxes:
        color = ANOMALY_BOX if box.is_anomaly else OTHER_BOX
        x0, y0 = left + max(box.x0, 0.0), top + max(box.y0, 0.0)
        x1 = left + min(box.x1, canvas.width / 3 - 1)
        y1 = top + min(box.y1, canvas.height - top - 1)
        if x1 <= x0 or y1 <= y0:
            continue
        draw.rectangle((x0, y0, x1, y1), outline=color, width=2)
        draw.text((x0 + 3, y0 + 2), box.label, fill=color)


def overlay_panel(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    defect_mask: np.ndarray,
    caption: str,
    boxes: Sequence[Box] = (),
) -> Image.Image:
    """[frame | heat map blended over the frame | frame with defect contour and the box
    prior's boxes, if any] + caption bar."""
    height, width = image.shape[:2]
    heat = (0.5 * image + 0.5 * heat_colors(anomaly_map)).astype(np.uint8)
    outlined = image.copy()
    outlined[contour(defect_mask)] = (255, 0, 0)
    canvas = Image.new("RGB", (3 * width, height + BAR), "black")
    for index, panel in enumerate((image, heat, outlined)):
        canvas.paste(Image.fromarray(panel), (index * width, BAR))
    draw_boxes(canvas, boxes, 2 * width, BAR)
    ImageDraw.Draw(canvas).text((4, 3), caption, fill="white")
    return canvas
