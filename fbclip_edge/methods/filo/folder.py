"""FiLo's model folder: everything a test-time run needs, in one self-contained folder.

    config.json            format, method "filo", FiLoConfig, the Grounding DINO arch (or null),
                           the descriptions' sha256, source, versions, created
    model.safetensors      FiLo's state dict, CLIP included (no OpenAI weights needed later)
    grounding.safetensors  the transformers port's state dict (BERT weights included)
    bert/                  the BERT tokenizer and config files (its weights are in the line above)
    descriptions.json      the user's category file, byte-exact (its sha256 is in config.json)

FiLo is not a registered `AnomalyModel` (its text depends on the image, the category and the
position word), so `checkpoint.load` refuses these folders and `load_filo` opens them. The
detector is optional: without it the folder has no box prior (no position word, no box step).
This module imports the shared format helpers from `modelformat` / `fileio`, not `checkpoint`,
so FiLo can join the method registry later without an import cycle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fbclip_edge.clip.backbone import backbone_config
from fbclip_edge.clip.config import BackboneConfig
from fbclip_edge.errors import FBClipError
from fbclip_edge.fileio import atomic_directory
from fbclip_edge.methods.base import method_of_folder
from fbclip_edge.methods.filo.config import FiLoConfig
from fbclip_edge.methods.filo.descriptions import CategoryData, load_descriptions
from fbclip_edge.methods.filo.model import FiLo
from fbclip_edge.modelformat import (
    CONFIG_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    skip_weight_init,
    versions,
)
from fbclip_edge.statedict import check_state_dict

if TYPE_CHECKING:  # grounding.py needs transformers; imported only where a detector is used
    from fbclip_edge.methods.filo.grounding import GroundingDetector, GroundingDinoArch

METHOD = "filo"
GROUNDING_FILE = "grounding.safetensors"
DESCRIPTIONS_FILE = "descriptions.json"
BERT_DIR = "bert"
#: The BERT folder's tokenizer and config files (weights excluded: they are in the checkpoint).
BERT_FILES = (
    "config.json",
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
#: What the detector needs from the BERT folder (config and WordPiece vocabulary).
BERT_REQUIRED = ("config.json", "vocab.txt")
#: BERT sizes that must agree between the folder's config and the detector's weights.
_BERT_SIZES = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
)
_REMAKE = "re-create it with `fbclip-edge import-official --method filo`"


@dataclass
class FiLoFolder:
    """A loaded FiLo model folder: the model (eval), its optional detector and its table."""

    path: Path
    model: FiLo  # eval mode
    detector: GroundingDetector | None  # None when the folder has no Grounding DINO
    table: dict[str, CategoryData]  # from the folder's descriptions.json
    descriptions_sha256: str
    meta: dict[str, Any]  # config.json


# ----- save -----
def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two entries sharing storage (safetensors refuses tied weights,
    such as the port's shared box head): later sharers are cloned."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        tensor = value.detach().cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:
            tensor = tensor.clone()
        seen.add(pointer)
        out[key] = tensor
    return out


def _check_bert_dir(bert_dir: Path) -> None:
    if not bert_dir.is_dir():
        raise FBClipError(f"text encoder folder not found: {bert_dir}; pass the BERT folder")
    missing = [name for name in BERT_REQUIRED if not (bert_dir / name).is_file()]
    if missing:
        raise FBClipError(
            f"text encoder folder {bert_dir} lacks {', '.join(missing)}; pass the BERT folder "
            "(bert-base-uncased layout: config.json, vocab.txt, tokenizer files)"
        )


def _copy_bert(bert_dir: Path, target: Path) -> list[str]:
    """Copy the tokenizer and config files (not the weights) of the BERT folder."""
    _check_bert_dir(bert_dir)
    target.mkdir()
    copied = [name for name in BERT_FILES if (bert_dir / name).is_file()]
    for name in copied:
        shutil.copyfile(bert_dir / name, target / name)
    return copied


def _check_bert(grounding: GroundingDetector, bert_dir: Path) -> None:
    """The folder's BERT config must describe the detector's text encoder, or the saved folder
    would not load (checked now, not at load time)."""
    saved = json.loads((bert_dir / "config.json").read_text(encoding="utf-8"))
    built = grounding.model.config.text_config.to_dict()
    differ = [k for k in _BERT_SIZES if k in saved and saved[k] != built.get(k)]
    if differ:
        raise FBClipError(
            f"text encoder folder {bert_dir} does not match the detector's BERT ({differ[0]} "
            f"{saved[differ[0]]} != {built.get(differ[0])}); pass the folder it was built with"
        )


def _grounding_meta(grounding: GroundingDetector) -> dict[str, Any]:
    from fbclip_edge.methods.filo.grounding import GroundingDinoArch

    arch = GroundingDinoArch.from_port_config(grounding.model.config)
    return {"arch": dataclasses.asdict(arch)}


def _versions(grounding: GroundingDetector | None) -> dict[str, str]:
    """versions(), plus transformers' when the port is saved (its behaviour is versioned)."""
    found = versions()
    if grounding is not None:
        import transformers

        found["transformers"] = transformers.__version__
    return found


def save_filo(
    out: str | Path,
    model: FiLo,
    descriptions: str | Path,
    grounding: GroundingDetector | None = None,
    bert_dir: str | Path | None = None,
    source: Mapping[str, Any] | None = None,
) -> Path:
    """Write a FiLo model folder atomically (a failure leaves `out` as it was); returns `out`.

    descriptions is validated, then copied byte-exact; grounding and bert_dir go together.
    """
    descriptions = Path(descriptions)
    load_descriptions(descriptions)  # refuse a bad table now, not at the first image
    if (grounding is None) != (bert_dir is None):
        raise FBClipError(
            "save_filo: grounding and bert_dir go together (the detector and its BERT "
            "tokenizer folder); pass both or neither"
        )
    if grounding is not None and bert_dir is not None:
        _check_bert_dir(Path(bert_dir))
        _check_bert(grounding, Path(bert_dir))
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "method": METHOD,
        "config": model.config.to_dict(),
        "grounding": _grounding_meta(grounding) if grounding is not None else None,
        "descriptions_sha256": sha256_file(descriptions),
        "source": dict(source or {}),
        "versions": _versions(grounding),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_directory(out) as staging:
        shutil.copyfile(descriptions, staging / DESCRIPTIONS_FILE)
        tag = {"format": FORMAT_NAME}
        save_file(_tensors(model.state_dict()), str(staging / WEIGHTS_FILE), tag)
        if grounding is not None and bert_dir is not None:
            _copy_bert(Path(bert_dir), staging / BERT_DIR)
            save_file(_tensors(grounding.model.state_dict()), str(staging / GROUNDING_FILE), tag)
        if sha256_file(staging / DESCRIPTIONS_FILE) != meta["descriptions_sha256"]:
            raise FBClipError(f"{descriptions} changed while it was copied; save again")
        (staging / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        for path in staging.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
    return Path(out)


# ----- load -----
def _read_meta(folder: Path) -> dict[str, Any]:
    """config.json of a FiLo folder, or a one-line error naming the fix."""
    config_path = folder / CONFIG_FILE
    if not folder.is_dir() or not config_path.is_file():
        raise FBClipError(
            f"{folder} is not an fbclip-edge model folder (no {CONFIG_FILE}); {_REMAKE}"
        )
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FBClipError(f"{config_path} is not valid JSON ({error}); {_REMAKE}") from None
    if not isinstance(meta, dict):
        raise FBClipError(f"{config_path} does not hold a JSON object; {_REMAKE}")
    if meta.get("format") != FORMAT_NAME or meta.get("format_version") != FORMAT_VERSION:
        raise FBClipError(
            f"{config_path} is format {meta.get('format')!r} v{meta.get('format_version')}; this "
            f"fbclip-edge reads {FORMAT_NAME} v{FORMAT_VERSION}: {_REMAKE}"
        )
    method = method_of_folder(meta)
    if method != METHOD:
        raise FBClipError(
            f"{folder} is a {method} model folder, not FiLo: open it with "
            "fbclip_edge.checkpoint.load (or fbclip_edge.load)"
        )
    return meta


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FBClipError(f"{path} is missing; {_REMAKE}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise FBClipError(f"{path} is corrupt or truncated ({message}); {_REMAKE}") from None


def _read_table(folder: Path, meta: Mapping[str, Any]) -> tuple[dict[str, CategoryData], str]:
    """The folder's descriptions, refused when edited after the folder was written: the
    recorded sha256 pins what the model was imported (and validated) with."""
    path = folder / DESCRIPTIONS_FILE
    if not path.is_file():
        raise FBClipError(f"{path} is missing; {_REMAKE} and --descriptions FILE")
    digest = sha256_file(path)
    if digest != meta.get("descriptions_sha256"):
        raise FBClipError(
            f"{path} was edited after the folder was written (sha256 differs from "
            f"{CONFIG_FILE}); re-import with `fbclip-edge import-official --method filo "
            "--descriptions FILE`, or restore it and pass your edited copy with --descriptions"
        )
    return load_descriptions(path), digest


def _config(folder: Path, meta: Mapping[str, Any]) -> FiLoConfig:
    try:
        return FiLoConfig.from_dict(dict(meta["config"]))
    except (KeyError, TypeError) as error:
        raise FBClipError(
            f"{folder / CONFIG_FILE} has an unusable FiLo config ({error}); {_REMAKE}"
        ) from None


def _load_model(folder: Path, config: FiLoConfig) -> FiLo:
    weights = folder / WEIGHTS_FILE
    state = _read_tensors(weights)
    with skip_weight_init():  # every parameter and persistent buffer comes from the file
        model = FiLo(config)
    check_state_dict(model.state_dict(), state, str(weights))
    model.load_state_dict(state, strict=True)
    return model.eval()


def _grounding_arch(folder: Path, grounding: Mapping[str, Any]) -> GroundingDinoArch:
    from fbclip_edge.methods.filo.grounding import GroundingDinoArch

    try:
        return GroundingDinoArch(**dict(grounding["arch"]))
    except (KeyError, TypeError) as error:
        raise FBClipError(
            f"{folder / CONFIG_FILE} has an unusable Grounding DINO arch ({error}); {_REMAKE}"
        ) from None


def _load_detector(
    folder: Path, grounding: Mapping[str, Any], device: str | torch.device
) -> GroundingDetector:
    from fbclip_edge.methods.filo.grounding import GroundingDetector  # needs transformers

    arch = _grounding_arch(folder, grounding)
    bert = folder / BERT_DIR
    missing = [name for name in BERT_REQUIRED if not (bert / name).is_file()]
    if missing:
        raise FBClipError(f"{bert} lacks {', '.join(missing)}; {_REMAKE}")
    state = _read_tensors(folder / GROUNDING_FILE)
    return GroundingDetector.from_port_state_dict(state, bert, arch, device)


def load_filo(folder: str | Path, device: str | torch.device = "cpu") -> FiLoFolder:
    """Open a FiLo model folder: the model (eval) on `device`, the detector when the folder has
    one, and the category table. Every problem is a one-line error naming the fix."""
    path = Path(folder)
    meta = _read_meta(path)
    table, digest = _read_table(path, meta)
    model = _load_model(path, _config(path, meta)).to(device)
    grounding = meta.get("grounding")
    detector = _load_detector(path, grounding, device) if grounding else None
    return FiLoFolder(
        path=path,
        model=model,
        detector=detector,
        table=table,
        descriptions_sha256=digest,
        meta=meta,
    )


def is_filo_folder(folder: str | Path) -> bool:
    """True for a folder whose config.json names method "filo" (nothing else is checked)."""
    config_path = Path(folder) / CONFIG_FILE
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("method") == METHOD


# ----- import (the CLI's `import-official --method filo`) -----
def _backbone(value: str | Path | BackboneConfig | None) -> BackboneConfig | None:
    """An open_clip name, a JSON file of BackboneConfig fields, or None (inferred)."""
    if value is None or isinstance(value, BackboneConfig):
        return value
    if str(value).endswith(".json"):
        path = Path(value)
        try:
            return BackboneConfig(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as error:
            raise FBClipError(
                f"--backbone {path}: not a readable BackboneConfig JSON ({error}); write "
                '{"name": ..., "embed_dim": ..., "vision": {...}, "text": {...}}'
            ) from None
    return backbone_config(str(value))


def read_grounding_config(path: str | Path) -> GroundingDinoArch:
    """A JSON of the original Grounding DINO config values (flat, or {"official_config": ...,
    "swin": ...} as the fixture's golden config) -> the arch."""
    from fbclip_edge.methods.filo.grounding import GroundingDinoArch

    path = Path(path)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise FBClipError(f"--grounding-config {path}: cannot read JSON ({error})") from None
    if not isinstance(values, dict):
        raise FBClipError(f"--grounding-config {path}: expected a JSON object of config values")
    try:
        return GroundingDinoArch.from_reference(values)
    except TypeError as error:
        raise FBClipError(f"--grounding-config {path}: {error}") from None


def import_filo_folder(
    checkpoint: str | Path,
    out: str | Path,
    descriptions: str | Path,
    grounding_checkpoint: str | Path | None = None,
    text_encoder: str | Path | None = None,
    clip_weights: str | Path | None = None,
    image_size: int | None = None,
    grounding_config: str | Path | None = None,
    backbone: str | Path | BackboneConfig | None = None,
    feature_layers: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """The published FiLo (+ Grounding DINO) checkpoints -> a FiLo model folder; returns the
    config.json written.

    The FiLo checkpoint carries its CLIP, so clip_weights is optional. grounding_checkpoint and
    text_encoder (the BERT folder) go together; without them the folder has no box prior.
    The Grounding DINO arch is SwinT_OGC unless grounding_config names a JSON of the original
    config's values.
    """
    from fbclip_edge.methods.filo.importer import import_official

    if (grounding_checkpoint is None) != (text_encoder is None):
        raise FBClipError(
            "--grounding-checkpoint and --text-encoder go together (Grounding DINO and its BERT "
            "folder); pass both, or neither for a folder without the box prior"
        )
    if grounding_config is not None and grounding_checkpoint is None:
        raise FBClipError("--grounding-config describes --grounding-checkpoint; pass that too")
    load_descriptions(descriptions)  # fail before the slow part
    model, source = import_official(
        checkpoint,
        clip_weights=clip_weights,
        image_size=image_size,
        feature_layers=feature_layers,
        backbone=_backbone(backbone),
    )
    detector = None
    if grounding_checkpoint is not None and text_encoder is not None:
        from fbclip_edge.methods.filo.grounding import SWINT_OGC, GroundingDetector

        arch = read_grounding_config(grounding_config) if grounding_config else SWINT_OGC
        detector = GroundingDetector.from_checkpoint(grounding_checkpoint, text_encoder, arch)
    source = {
        **source,
        "grounding_checkpoint": str(grounding_checkpoint) if grounding_checkpoint else None,
        "text_encoder": str(text_encoder) if text_encoder else None,
        "descriptions": str(descriptions),
    }
    save_filo(out, model, descriptions, detector, text_encoder, source)
    return _read_meta(Path(out))


__all__ = [
    "BERT_DIR",
    "DESCRIPTIONS_FILE",
    "GROUNDING_FILE",
    "FiLoFolder",
    "import_filo_folder",
    "is_filo_folder",
    "load_filo",
    "read_grounding_config",
    "save_filo",
    "sha256_file",
]
