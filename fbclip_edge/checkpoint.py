"""The project's model format, and the importer for the authors' published checkpoints.

A model folder holds `config.json` (architecture, image size, feature layers, every FB-CLIP
setting, versions) and `model.safetensors`: the learned parts, the frozen text features
and the CLIP weights themselves (embedded, so a folder is self-contained and its sha256
pins everything the outputs depend on).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode

from fbclip_edge.errors import FBClipError
from fbclip_edge.factory import clip_from_file
from fbclip_edge.model import FBCLIP, FBCLIPConfig

FORMAT_NAME = "fbclip-edge-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# Entries of the published checkpoint that the reference defines but never uses.
_UNUSED_PROMPT_KEYS = (
    "token_prefix_",
    "token_suffix_",
    "tokenized_prompts_",
    "compound_prompts_text.",
    "compound_prompt_projections.",
)
_UNUSED_TRAINABLE_KEYS = ("layer_selector", "fusion_weights", "fusion_weight", "gate_network.")


def versions() -> dict[str, str]:
    """Library versions recorded with every artifact."""
    import open_clip

    from fbclip_edge import __version__

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


def save_model(model: FBCLIP, out: str | Path, source: Mapping[str, Any] | None = None) -> Path:
    """Write `out/config.json` and `out/model.safetensors` atomically; returns `out`."""
    if not model.text_frozen:
        model.freeze_text()
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
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


def read_config(path: str | Path) -> tuple[FBCLIPConfig, dict[str, Any]]:
    """Parse a model folder's config.json; returns the config and the whole metadata."""
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
    return FBCLIPConfig.from_dict(meta["config"]), meta


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

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func in self.SKIPPED:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


@contextmanager
def skip_weight_init() -> Iterator[None]:
    """Build modules without randomly initializing their weights (most of a ViT-L's
    construction time), for weights that a strict load overwrites right after. Buffers that
    the file does not hold (attention masks, prompt tokens) are computed as usual."""
    with _SkipRandomInit():
        yield


def load(path: str | Path, device: str | torch.device = "cpu") -> FBCLIP:
    """Load a model folder; returns FBCLIP in eval mode with frozen text features."""
    config, _ = read_config(path)
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
        model = FBCLIP(config)
    check_state_dict(model.state_dict(), state, str(weights))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def read_official_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load the published `.pth` and check its top-level layout."""
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
    if not isinstance(checkpoint, dict) or not {"prompt_learner", "model_trainable_params"} <= set(
        checkpoint
    ):
        raise FBClipError(
            f"{path} is not a published FB-CLIP checkpoint (expected the keys prompt_learner "
            "and model_trainable_params)"
        )
    return checkpoint


def official_to_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rename the published keys to this package's; unknown keys are an error."""
    renamed: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in checkpoint["prompt_learner"].items():
        if key in ("ctx_pos", "ctx_neg"):
            renamed[f"prompt_learner.{key}"] = value
        elif not key.startswith(_UNUSED_PROMPT_KEYS):
            unknown.append(f"prompt_learner.{key}")
    for key, value in checkpoint["model_trainable_params"].items():
        if key.startswith("fb_Attention."):
            renamed["fb_attention." + key.removeprefix("fb_Attention.")] = value
        elif key.startswith(("token_selector.", "text_projection_mlp.")):
            renamed[f"text_fusion.{key}"] = value
        elif key == "scale_weights":
            renamed[key] = value
        elif not key.startswith(_UNUSED_TRAINABLE_KEYS):
            unknown.append(f"model_trainable_params.{key}")
    if unknown:
        raise FBClipError(
            f"checkpoint has keys this importer does not know: {unknown[:10]}; "
            "is it an FB-CLIP checkpoint?"
        )
    return {k: v.float() for k, v in renamed.items()}


def import_official(
    clip_weights: str | Path,
    checkpoint: str | Path,
    out: str | Path | None = None,
    image_size: int = 518,
    feature_layers: tuple[int, ...] | None = None,
    **settings: Any,
) -> FBCLIP:
    """Published checkpoint + OpenAI CLIP weights -> FBCLIP (eval); saved to `out` if given.

    `settings` override FBCLIPConfig fields (e.g. class_name) for checkpoints trained
    with other prompts.
    """
    published = read_official_checkpoint(checkpoint)
    learned = official_to_state_dict(published)
    clip, backbone = clip_from_file(clip_weights)
    n_ctx = (
        int(learned["prompt_learner.ctx_pos"].shape[-2])
        if "prompt_learner.ctx_pos" in learned
        else 12
    )
    config = FBCLIPConfig(
        backbone=backbone,
        image_size=image_size,
        feature_layers=tuple(feature_layers or ()),
        n_ctx=n_ctx,
        **settings,
    )
    model = FBCLIP(config, clip)
    heads = {
        k: v
        for k, v in model.state_dict().items()
        if not k.startswith("clip.") and k != "text_features_frozen"
    }
    check_state_dict(heads, learned, f"checkpoint {checkpoint}")
    model.load_state_dict(learned, strict=False)
    _check_prompt_tokens(model, published["prompt_learner"], checkpoint)
    model.eval()
    if out is not None:
        source = {
            "kind": "official",
            "checkpoint": str(checkpoint),
            "clip_weights": str(clip_weights),
            "epoch": published.get("epoch"),
            "source_domain": published.get("source_domain"),
        }
        save_model(model, out, source)
    return model


def _check_prompt_tokens(
    model: FBCLIP, prompt_state: Mapping[str, torch.Tensor], name: object
) -> None:
    """The stored tokenized prompts must equal ours, or the contexts sit in the wrong place."""
    for row, suffix in enumerate(("pos", "neg")):
        stored = prompt_state.get(f"tokenized_prompts_{suffix}")
        if stored is not None and not torch.equal(
            stored.reshape(-1).long(), model.prompt_learner.tokens[row].cpu()
        ):
            raise FBClipError(
                f"checkpoint {name} was trained with different prompt text than "
                f"'{model.config.class_name}' and the default templates; pass the matching "
                "class_name / normal_template / abnormal_template settings"
            )
