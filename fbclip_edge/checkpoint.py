"""The project's model format, and the importer for the authors' published checkpoints.

A model folder holds `config.json` (architecture, image size, feature layers, every FB-CLIP
setting, versions) and `model.safetensors`: the learned parts, the frozen text features
and the CLIP weights themselves (embedded, so a folder is self-contained and its sha256
pins everything the outputs depend on).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode

from fbclip_edge.errors import FBClipError
from fbclip_edge.methods import AnomalyModel, get_method, identify_checkpoint
from fbclip_edge.methods.base import method_of_folder
from fbclip_edge.statedict import check_state_dict, read_checkpoint_file

FORMAT_NAME = "fbclip-edge-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"



def versions() -> dict[str, str]:
    """Library versions recorded with every artifact."""
    import open_clip

    from fbclip_edge.version import __version__

    return {
        "fbclip_edge": __version__,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "python": platform.python_version(),
    }


@contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces `out` only if the block succeeds."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a model folder is ordinary data
    try:
        yield staging
        if out.exists():
            backup = out.with_name(f".{out.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(out, backup)
            os.replace(staging, out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
    return get_method(method_of_folder(meta)).config_from_dict(meta["config"]), meta


class _SkipRandomInit(TorchFunctionMode):
    """Turn weight-initialization calls into no-ops, in this thread only (torch function modes
    are thread-local, so a model built concurrently elsewhere keeps its random init)."""

    SKIPPED = frozenset(
        {
            torch.nn.init.uniform_,
            torch.nn.init.normal_,
            torch.nn.init.trunc_normal_,
            torch.nn.init.constant_,
            torch.nn.init.kaiming_uniform_,
            torch.nn.init.kaiming_normal_,
            torch.nn.init.xavier_uniform_,
            torch.nn.init.xavier_normal_,
            torch.Tensor.uniform_,
            torch.Tensor.normal_,
        }
    )

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Iterable[type],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if func in self.SKIPPED:
            return args[0] if args else (kwargs or {})["tensor"]
        return func(*args, **(kwargs or {}))


@contextmanager
def skip_weight_init() -> Iterator[None]:
    """Build modules without randomly initializing their weights (most of a ViT-L's
    construction time), for weights that a strict load overwrites right after. Buffers that
    the file does not hold (attention masks, prompt tokens) are computed as usual."""
    with _SkipRandomInit():
        yield


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
