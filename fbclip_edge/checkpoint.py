"""The project's model format, and the importer for the authors' published checkpoints.

A model folder holds `config.json` (architecture, image size, feature layers, every FB-CLIP
setting, versions) and `model.safetensors`: the learned parts, the frozen text features
and the CLIP weights themselves (embedded, so a folder is self-contained and its sha256
pins everything the outputs depend on).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fbclip_edge.errors import FBClipError
from fbclip_edge.fileio import atomic_directory
from fbclip_edge.methods import AnomalyModel, get_method, identify_checkpoint
from fbclip_edge.methods.base import method_of_folder

# Shared with every method's folder; defined below the registry (import cycles), re-exported.
from fbclip_edge.modelformat import (
    CONFIG_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    skip_weight_init,
    versions,
)
from fbclip_edge.statedict import check_state_dict, read_checkpoint_file

__all__ = [
    "CONFIG_FILE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_FILE",
    "atomic_directory",
    "import_official",
    "load",
    "read_config",
    "save_model",
    "skip_weight_init",
    "versions",
]


def save_model(
    model: AnomalyModel, out: str | Path, source: Mapping[str, Any] | None = None
) -> Path:
    """Write `out/config.json` and `out/model.safetensors` atomically; returns `out`."""
    if not model.text_frozen:
        model.freeze_text()
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "method": model.method,
        "config": model.config.to_dict(),
        "clip_weights": "embedded",
        "source": dict(source or {}),
        "versions": versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_directory(out) as staging:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
        (staging / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (staging / WEIGHTS_FILE).chmod(0o644)
    return Path(out)


def read_config(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """Parse a model folder's config.json; returns the method's config and the metadata.

    Folders written before methods existed have no "method" key: they are FB-CLIP.
    """
    folder = Path(path)
    config_path = folder / CONFIG_FILE
    if not folder.is_dir() or not config_path.is_file():
        raise FBClipError(
            f"{folder} is not an fbclip-edge model folder (no {CONFIG_FILE}); create one with "
            "`fbclip-edge import-official` or `fbclip-edge train`"
        )
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FBClipError(
            f"{config_path} is not valid JSON ({error}); re-create the model folder"
        ) from None
    if meta.get("format") != FORMAT_NAME or meta.get("format_version") != FORMAT_VERSION:
        raise FBClipError(
            f"{config_path} is format {meta.get('format')!r} v{meta.get('format_version')}; this "
            f"fbclip-edge reads {FORMAT_NAME} v{FORMAT_VERSION}: re-export it with this version"
        )
    if method_of_folder(meta) == "filo":  # not a registered AnomalyModel (methods/filo)
        raise FBClipError(
            f"{folder} is a FiLo model folder: open it with fbclip_edge.methods.filo.load_filo, "
            "or `fbclip-edge export` it and use Detector.open"
        )
    return get_method(method_of_folder(meta)).config_from_dict(meta["config"]), meta


def load(
    path: str | Path, device: str | torch.device = "cpu", image_size: int | None = None
) -> AnomalyModel:
    """Load a model folder; returns the model in eval mode with frozen text features.

    image_size runs it at another input size: the positional embedding is interpolated at
    run time, so only the config changes.
    """
    config, meta = read_config(path)
    spec = get_method(method_of_folder(meta))
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise FBClipError(f"{weights} is missing; re-create the model folder")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as error:
        raise FBClipError(
            f"{weights} is corrupt or truncated ({error}); re-create the model folder"
        ) from None
    with skip_weight_init():  # every parameter and persistent buffer comes from the file
        model = spec.build(config)
    check_state_dict(model.state_dict(), state, str(weights))
    model.load_state_dict(state, strict=True)
    if image_size and image_size != model.config.image_size:
        model.config = dataclasses.replace(model.config, image_size=int(image_size))
    return model.to(device).eval()


def import_official(
    clip_weights: str | Path | None,
    checkpoint: str | Path,
    out: str | Path | None = None,
    image_size: int = 518,
    feature_layers: tuple[int, ...] | None = None,
    method: str = "fbclip",
    **settings: Any,
) -> AnomalyModel:
    """A published checkpoint of `method` + CLIP weights -> model (eval), saved to `out`.

    A checkpoint of another method is refused with the command that fits it.
    """
    spec = get_method(method)
    found = identify_checkpoint(read_checkpoint_file(checkpoint))
    if found != spec.name:
        looks = f"a published {get_method(found).title} checkpoint" if found else (
            "no published checkpoint layout this toolkit knows"
        )
        hint = get_method(found).import_hint if found else spec.import_hint
        raise FBClipError(
            f"{checkpoint} is {looks}, not {spec.title}; use: {hint}"
        )
    if clip_weights is None and not spec.extra.get("clip_in_checkpoint"):
        raise FBClipError(f"{spec.title} needs --clip-weights FILE (OpenAI CLIP weights)")
    model, source = spec.import_official(
        clip_weights, checkpoint, image_size=image_size, feature_layers=feature_layers,
        **settings,
    )
    if out is not None:
        save_model(model, out, source)
    return model
