"""State-dict checks shared by model folders and the official importers."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fbclip_edge.errors import FBClipError


def check_state_dict(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], what: str
) -> None:
    """One error listing every missing, unexpected and mis-shaped key."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = sorted(
        f"{k} {tuple(given[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(expected) & set(given)
        if tuple(given[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
        if items:
            shown = ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise FBClipError(
            f"{what} does not fit this model ({'; '.join(problems)}); "
            "check that it was made for the same backbone and settings"
        )


def read_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """torch.load a published `.pth` (weights only) with one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise FBClipError(f"checkpoint not found: {path}; check the path")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise FBClipError(
            f"cannot read checkpoint {path} ({type(error).__name__}); it is truncated or "
            "corrupt: download it again"
        ) from None
    if not isinstance(checkpoint, dict):
        raise FBClipError(f"{path} does not hold a checkpoint dict; pass the published .pth")
    return checkpoint
