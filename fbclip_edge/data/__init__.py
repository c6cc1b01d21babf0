"""Anomaly-detection datasets: layouts on disk, image/mask reading and synthetic data."""

from fbclip_edge.data.dataset import SampleDataset
from fbclip_edge.data.image_io import ImageReadError, read_image, read_mask
from fbclip_edge.data.layouts import (
    DatasetError,
    Sample,
    detect_layout,
    list_categories,
    load_dataset,
)
from fbclip_edge.data.synthetic import FAMILIES, contact_sheet, make_synthetic

__all__ = [
    "FAMILIES",
    "DatasetError",
    "ImageReadError",
    "Sample",
    "SampleDataset",
    "contact_sheet",
    "detect_layout",
    "list_categories",
    "load_dataset",
    "make_synthetic",
    "read_image",
    "read_mask",
]
