"""Map-style dataset over Samples, usable directly by torch.utils.data.DataLoader."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from fbclip_edge.data.image_io import read_image, read_mask
from fbclip_edge.data.layouts import Sample

PairTransform = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


class SampleDataset:
    """Yields (image uint8 (H, W, 3), mask float32 (H, W), label, category) per sample.

    Plain __len__/__getitem__ instead of a torch.utils.data.Dataset subclass so that listing
    and reading data never imports torch; DataLoader accepts any such sequence. transform
    maps (image, mask) to new ones (fbclip_edge.preprocess resizes and normalizes).
    """

    def __init__(self, samples: Sequence[Sample], transform: PairTransform | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, int, str]:
        sample = self.samples[index]
        image = read_image(sample.image_path)
        mask = read_mask(sample.mask_path, image.shape[:2])
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image, mask, sample.label, sample.category
