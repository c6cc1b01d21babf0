"""Dataset layouts people download (MVTec AD folders, VisA split_csv, meta.json) as Samples."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fbclip_edge.data.image_io import IMAGE_SUFFIXES
from fbclip_edge.errors import FBClipError

LayoutKind = Literal["auto", "mvtec", "visa", "meta"]
VISA_CSV = Path("split_csv") / "1cls.csv"
META_JSON = "meta.json"
_VISA_COLUMNS = ("object", "split", "label", "image", "mask")
_META_KEYS = ("img_path", "mask_path", "anomaly")
_LAYOUT_HINT = (
    "expected MVTec AD (<category>/test/<defect>/*.png), VisA (split_csv/1cls.csv) or a "
    "meta.json index; point to the dataset root or run `fbclip-edge make-synthetic DIR`"
)


class DatasetError(FBClipError):
    """A dataset folder or index that cannot be read as any supported layout."""


@dataclass(frozen=True)
class Sample:
    """One image of a dataset split; mask_path is None for normal images (all-zero mask)."""

    image_path: Path
    mask_path: Path | None
    label: int
    category: str
    defect_type: str


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and _visible(p))


def _images_in(folder: Path) -> list[Path]:
    """Image files of a folder, sorted; other files (readme, thumbs) are not images."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and _visible(p) and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _is_mvtec_category(folder: Path) -> bool:
    return (folder / "test").is_dir() or (folder / "train").is_dir()


def _check_folder(root: Path) -> None:
    if not root.exists():
        raise DatasetError(f"dataset folder {root} does not exist; {_LAYOUT_HINT}")
    if not root.is_dir():
        raise DatasetError(f"{root} is a file, not a dataset folder; {_LAYOUT_HINT}")
    if not any(_visible(p) for p in root.iterdir()):
        raise DatasetError(f"dataset folder {root} is empty; {_LAYOUT_HINT}")


def detect_layout(root: str | Path) -> Literal["mvtec", "visa", "meta"]:
    """Which layout root holds; native layouts win over a meta.json generated beside them."""
    root = Path(root)
    _check_folder(root)
    if (root / VISA_CSV).is_file():
        return "visa"
    if _is_mvtec_category(root) or any(_is_mvtec_category(d) for d in _subdirs(root)):
        return "mvtec"
    if (root / META_JSON).is_file():
        return "meta"
    raise DatasetError(f"{root} is not an anomaly-detection dataset; {_LAYOUT_HINT}")


def _find_mask(ground_truth: Path, image: Path) -> Path | None:
    """MVTec names masks <stem>_mask.png; some re-packs drop the suffix or change the format."""
    for name in (f"{image.stem}_mask.png", f"{image.stem}.png"):
        if (ground_truth / name).is_file():
            return ground_truth / name
    for candidate in sorted(ground_truth.glob(f"{image.stem}*")):
        if candidate.stem in (image.stem, f"{image.stem}_mask"):
            if candidate.suffix.lower() in IMAGE_SUFFIXES:
                return candidate
    return None


def _mvtec_defect(category_dir: Path, defect_dir: Path, require_masks: bool) -> list[Sample]:
    images = _images_in(defect_dir)
    if not images:
        raise DatasetError(
            f"{defect_dir} contains no images; re-download the category or delete the folder"
        )
    defect = defect_dir.name
    if defect == "good":
        return [Sample(p, None, 0, category_dir.name, "good") for p in images]
    samples = []
    ground_truth = category_dir / "ground_truth" / defect
    for image in images:
        mask = _find_mask(ground_truth, image) if ground_truth.is_dir() else None
        if mask is None and require_masks:
            raise DatasetError(
                f"anomalous image {image} has no mask (expected "
                f"{ground_truth / (image.stem + '_mask.png')}); add the mask or pass "
                "require_masks=False"
            )
        samples.append(Sample(image, mask, 1, category_dir.name, defect))
    return samples


def _mvtec_category(category_dir: Path, split: str, require_masks: bool) -> list[Sample]:
    split_dir = category_dir / split
    if not split_dir.is_dir():
        raise DatasetError(
            f"category {category_dir.name} has no {split}/ folder ({split_dir}); choose "
            "another split or exclude the category"
        )
    defect_dirs = _subdirs(split_dir)
    if not defect_dirs:
        raise DatasetError(f"{split_dir} has no defect folders; re-download the category")
    samples: list[Sample] = []
    for defect_dir in defect_dirs:
        samples.extend(_mvtec_defect(category_dir, defect_dir, require_masks))
    return samples


def _mvtec_category_dirs(root: Path) -> list[Path]:
    if _is_mvtec_category(root):
        return [root]
    return [d for d in _subdirs(root) if _is_mvtec_category(d)]


def _load_mvtec(
    root: Path, split: str, wanted: set[str] | None, require_masks: bool
) -> list[Sample]:
    samples: list[Sample] = []
    for category_dir in _mvtec_category_dirs(root):
        if wanted is None or category_dir.name in wanted:
            samples.extend(_mvtec_category(category_dir, split, require_masks))
    return samples


def _existing(root: Path, relative: str, where: str) -> Path:
    """Index paths are relative to the dataset root; absolute ones are taken as they are."""
    path = Path(relative)
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise DatasetError(
            f"{where} lists {relative} but {path} does not exist; fix the index or restore the file"
        )
    return path


def _visa_label(value: str, where: str) -> int:
    labels = {"normal": 0, "good": 0, "0": 0, "anomaly": 1, "anomalous": 1, "1": 1}
    if value.strip().lower() not in labels:
        raise DatasetError(f"{where}: label {value!r} is neither 'normal' nor 'anomaly'")
    return labels[value.strip().lower()]


def _visa_row(root: Path, row: dict[str, str], where: str, require_masks: bool) -> Sample:
    label = _visa_label(row["label"] or "", where)
    image = _existing(root, row["image"] or "", where)
    mask_name = (row["mask"] or "").strip()
    mask = _existing(root, mask_name, where) if label and mask_name else None
    if label and mask is None and require_masks:
        raise DatasetError(
            f"{where}: anomalous image {image} has no mask; fill the mask column or pass "
            "require_masks=False"
        )
    return Sample(image, mask, label, row["object"], "anomaly" if label else "good")


def _load_visa(
    root: Path, split: str, wanted: set[str] | None, require_masks: bool
) -> list[Sample]:
    csv_path = root / VISA_CSV
    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in _VISA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(
                f"{csv_path} lacks columns {', '.join(missing)}; expected the VisA header "
                f"{','.join(_VISA_COLUMNS)}"
            )
        rows = [(n, r) for n, r in enumerate(reader, start=2) if r["split"] == split]
    samples = [
        _visa_row(root, row, f"{csv_path} line {number}", require_masks)
        for number, row in rows
        if wanted is None or row["object"] in wanted
    ]
    return sorted(samples, key=lambda s: (s.category, s.label, str(s.image_path)))


def _read_meta(path: Path) -> dict:
    try:
        with path.open(encoding="utf-8") as handle:
            meta = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} is not valid JSON ({exc}); regenerate the index") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{path} must hold an object with train/test keys; regenerate it")
    return meta


def _meta_entry(
    root: Path, entry: object, category: str, where: str, require_masks: bool
) -> Sample:
    if not isinstance(entry, dict) or any(k not in entry for k in _META_KEYS):
        raise DatasetError(f"{where}: each entry needs keys {', '.join(_META_KEYS)}")
    if str(entry["anomaly"]).strip().lower() not in ("0", "1", "true", "false"):
        raise DatasetError(f"{where}: anomaly must be 0 or 1, got {entry['anomaly']!r}")
    label = 1 if str(entry["anomaly"]).strip().lower() in ("1", "true") else 0
    image = _existing(root, str(entry["img_path"]), where)
    mask_name = str(entry.get("mask_path") or "").strip()
    mask = _existing(root, mask_name, where) if label and mask_name else None
    if label and mask is None and require_masks:
        raise DatasetError(
            f"{where}: anomalous image {image} has no mask_path; add it or pass require_masks=False"
        )
    defect = str(entry.get("specie_name") or "") or ("anomaly" if label else "good")
    return Sample(image, mask, label, str(entry.get("cls_name") or category), defect)


def _load_meta(
    root: Path, split: str, wanted: set[str] | None, require_masks: bool
) -> list[Sample]:
    path = root / META_JSON
    meta = _read_meta(path)
    if split not in meta or not isinstance(meta[split], dict):
        raise DatasetError(
            f"{path} has no '{split}' split (keys: {', '.join(map(str, meta)) or 'none'}); "
            "choose another split"
        )
    samples: list[Sample] = []
    for category, entries in sorted(meta[split].items()):
        if wanted is not None and category not in wanted:
            continue
        where = f"{path} [{split}][{category}]"
        if not isinstance(entries, list):
            raise DatasetError(f"{where} must be a list of entries; regenerate the index")
        samples.extend(_meta_entry(root, e, category, where, require_masks) for e in entries)
    return samples


_LOADERS = {"mvtec": _load_mvtec, "visa": _load_visa, "meta": _load_meta}


def _resolve_layout(root: Path, kind: LayoutKind) -> LayoutKind:
    """The detected layout, or the requested one after checking its index file is there."""
    if kind not in ("auto", *_LOADERS):
        raise DatasetError(f"unknown dataset kind {kind!r}; use auto, mvtec, visa or meta")
    if kind == "auto":
        return detect_layout(root)
    _check_folder(root)
    if kind == "visa" and not (root / VISA_CSV).is_file():
        raise DatasetError(f"{root / VISA_CSV} not found; {root} is not a VisA root")
    if kind == "meta" and not (root / META_JSON).is_file():
        raise DatasetError(f"{root / META_JSON} not found; generate the index or use kind=auto")
    if kind == "mvtec" and not _mvtec_category_dirs(root):
        raise DatasetError(f"{root} has no <category>/test folders; it is not MVTec AD layout")
    return kind


def list_categories(root: str | Path, kind: LayoutKind = "auto", split: str = "test") -> list[str]:
    """Category names a dataset root holds for a split, sorted."""
    root = Path(root)
    layout = _resolve_layout(root, kind)
    if layout == "mvtec":
        return [d.name for d in _mvtec_category_dirs(root)]
    if layout == "visa":
        with (root / VISA_CSV).open(newline="", encoding="utf-8") as handle:
            return sorted(
                {r.get("object", "") for r in csv.DictReader(handle) if r.get("split") == split}
            )
    meta = _read_meta(root / META_JSON)
    return sorted(meta.get(split, {}))


def _check_known(names: Iterable[str] | None, known: list[str], root: Path, what: str) -> None:
    unknown = sorted(set(names or ()) - set(known))
    if unknown:
        raise DatasetError(
            f"{what} {', '.join(unknown)} not in {root}; available: {', '.join(known) or 'none'}"
        )


def load_dataset(
    root: str | Path,
    kind: LayoutKind = "auto",
    split: str = "test",
    categories: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    require_masks: bool = True,
) -> list[Sample]:
    """All samples of one split, sorted by category; the layout is detected unless kind says.

    For the zero-shot protocol both training and evaluation use the test split (it has
    masks); categories keeps only those names, exclude drops names (a held-out category).
    Every problem raises DatasetError naming the file and the fix: nothing is skipped.
    """
    root = Path(root)
    layout = _resolve_layout(root, kind)
    known = list_categories(root, layout, split)
    categories = None if categories is None else list(categories)
    exclude = list(exclude or ())
    _check_known(categories, known, root, "categories")
    _check_known(exclude, known, root, "excluded categories")
    wanted = set(categories if categories is not None else known) - set(exclude)
    samples = _LOADERS[layout](root, split, wanted, require_masks)
    if not samples:
        raise DatasetError(
            f"no {split} images in {root} for categories {', '.join(sorted(wanted)) or 'none'}; "
            "check the split name and the category filters"
        )
    return samples
