"""Loaders on tiny MVTec AD, VisA and meta.json fixture folders, good and bad."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fbclip_edge.data import (
    DatasetError,
    ImageReadError,
    SampleDataset,
    detect_layout,
    list_categories,
    load_dataset,
    read_image,
    read_mask,
)
from fbclip_edge.errors import FBClipError


def png(path: Path, value: int = 128, size=(6, 8), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[0], size[1], 3) if mode == "RGB" else size
    Image.fromarray(np.full(shape, value, dtype=np.uint8), mode=None).save(path)
    return path


def mask_png(path: Path, high: int = 255, size=(6, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(size, dtype=np.uint8)
    mask[1:3, 2:5] = high
    Image.fromarray(mask).save(path)
    return path


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.fixture
def mvtec(tmp_path):
    root = tmp_path / "mvtec"
    for category in ("bottle", "wood"):
        png(root / category / "train" / "good" / "000.png")
        png(root / category / "test" / "good" / "000.png")
        for defect in ("crack", "scratch"):
            for index in range(2):
                png(root / category / "test" / defect / f"{index:03d}.png", 200)
                mask_png(root / category / "ground_truth" / defect / f"{index:03d}_mask.png")
    (root / "license.txt").write_text("CC BY-NC-SA 4.0")
    return root


@pytest.fixture
def visa(tmp_path):
    root = tmp_path / "visa"
    rows = []
    for category in ("candle", "pcb1"):
        base = root / category / "Data"
        png(base / "Images" / "Normal" / "0000.JPG")
        png(base / "Images" / "Normal" / "0001.JPG")
        png(base / "Images" / "Anomaly" / "000.JPG", 210)
        mask_png(base / "Masks" / "Anomaly" / "000.png", high=1 if category == "candle" else 255)
        rows += [
            [category, "train", "normal", f"{category}/Data/Images/Normal/0000.JPG", ""],
            [category, "test", "normal", f"{category}/Data/Images/Normal/0001.JPG", ""],
            [
                category,
                "test",
                "anomaly",
                f"{category}/Data/Images/Anomaly/000.JPG",
                f"{category}/Data/Masks/Anomaly/000.png",
            ],
        ]
    write_visa_csv(root, rows)
    return root


def write_visa_csv(root: Path, rows):
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with (root / "split_csv" / "1cls.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)


@pytest.fixture
def meta(tmp_path):
    """A custom folder layout that only the meta.json index describes."""
    root = tmp_path / "meta"
    png(root / "images" / "screw_a.png")
    png(root / "images" / "screw_b.png")
    png(root / "images" / "screw_c.png", 220)
    mask_png(root / "masks" / "screw_c.png")

    def entry(img, mask, specie, anomaly):
        return {
            "img_path": img,
            "mask_path": mask,
            "cls_name": "screw",
            "specie_name": specie,
            "anomaly": anomaly,
        }

    index = {
        "train": {"screw": [entry("images/screw_a.png", "", "good", 0)]},
        "test": {
            "screw": [
                entry("images/screw_b.png", "", "good", 0),
                entry("images/screw_c.png", "masks/screw_c.png", "thread", 1),
            ]
        },
    }
    (root / "meta.json").write_text(json.dumps(index))
    return root


# --------------------------------------------------------------------------- MVTec AD


def test_mvtec_test_split(mvtec):
    assert detect_layout(mvtec) == "mvtec"
    samples = load_dataset(mvtec)
    assert len(samples) == 2 * (1 + 4)
    assert [s.category for s in samples] == ["bottle"] * 5 + ["wood"] * 5
    good = [s for s in samples if s.label == 0]
    bad = [s for s in samples if s.label == 1]
    assert all(s.mask_path is None and s.defect_type == "good" for s in good)
    assert {s.defect_type for s in bad} == {"crack", "scratch"}
    for sample in bad:
        assert sample.mask_path.name == sample.image_path.stem + "_mask.png"
        assert sample.mask_path.parent.name == sample.defect_type


def test_mvtec_train_split_and_filters(mvtec):
    train = load_dataset(mvtec, split="train")
    assert len(train) == 2 and all(s.label == 0 for s in train)
    assert {s.category for s in load_dataset(mvtec, categories=["wood"])} == {"wood"}
    assert {s.category for s in load_dataset(mvtec, exclude=["wood"])} == {"bottle"}
    assert list_categories(mvtec) == ["bottle", "wood"]


def test_mvtec_single_category_root(mvtec):
    samples = load_dataset(mvtec / "wood")
    assert len(samples) == 5 and {s.category for s in samples} == {"wood"}


def test_unknown_category_names_the_available_ones(mvtec):
    with pytest.raises(DatasetError) as excinfo:
        load_dataset(mvtec, categories=["wod"])
    assert "wod" in one_line_error(excinfo) and "bottle, wood" in str(excinfo.value)
    with pytest.raises(DatasetError):
        load_dataset(mvtec, exclude=["bottle", "wood"])


def test_mvtec_missing_mask_is_an_error(mvtec):
    missing = mvtec / "wood" / "ground_truth" / "crack" / "001_mask.png"
    missing.unlink()
    with pytest.raises(DatasetError) as excinfo:
        load_dataset(mvtec)
    message = one_line_error(excinfo)
    assert str(mvtec / "wood" / "test" / "crack" / "001.png") in message
    assert "001_mask.png" in message
    samples = load_dataset(mvtec, require_masks=False)
    assert sum(s.mask_path is None and s.label == 1 for s in samples) == 1


def test_mvtec_empty_defect_folder_is_an_error(mvtec):
    (mvtec / "bottle" / "test" / "hole").mkdir()
    with pytest.raises(DatasetError, match="contains no images"):
        load_dataset(mvtec)


# --------------------------------------------------------------------------- VisA


def test_visa_split_csv(visa):
    assert detect_layout(visa) == "visa"
    samples = load_dataset(visa)
    assert len(samples) == 4
    assert [(s.category, s.label) for s in samples] == [
        ("candle", 0),
        ("candle", 1),
        ("pcb1", 0),
        ("pcb1", 1),
    ]
    assert all(s.image_path.is_file() for s in samples)
    assert len(load_dataset(visa, split="train")) == 2


def test_visa_masks_zero_one_and_zero_255_read_the_same(visa):
    masks = [read_mask(s.mask_path, (6, 8)) for s in load_dataset(visa) if s.label]
    assert len(masks) == 2
    assert masks[0].dtype == np.float32 and set(np.unique(masks[0])) == {0.0, 1.0}
    np.testing.assert_array_equal(masks[0], masks[1])
    assert masks[0].sum() == 6


def test_visa_missing_file_and_bad_label(visa):
    write_visa_csv(visa, [["candle", "test", "normal", "candle/nope.JPG", ""]])
    with pytest.raises(DatasetError) as excinfo:
        load_dataset(visa)
    assert "candle/nope.JPG" in one_line_error(excinfo) and "line 2" in str(excinfo.value)
    write_visa_csv(visa, [["candle", "test", "broken", "candle/Data/Images/Normal/0000.JPG", ""]])
    with pytest.raises(DatasetError, match="'broken'"):
        load_dataset(visa)


def test_visa_anomaly_without_mask(visa):
    image = "candle/Data/Images/Anomaly/000.JPG"
    write_visa_csv(visa, [["candle", "test", "anomaly", image, ""]])
    with pytest.raises(DatasetError) as excinfo:
        load_dataset(visa)
    assert "has no mask" in one_line_error(excinfo)
    assert load_dataset(visa, require_masks=False)[0].mask_path is None


# --------------------------------------------------------------------------- meta.json


def test_meta_json_index(meta):
    assert detect_layout(meta) == "meta"
    samples = load_dataset(meta)
    assert [(s.label, s.defect_type) for s in samples] == [(0, "good"), (1, "thread")]
    assert samples[1].mask_path == meta / "masks" / "screw_c.png"
    assert len(load_dataset(meta, kind="meta", split="train")) == 1


def test_meta_json_problems(meta):
    index = json.loads((meta / "meta.json").read_text())
    index["test"]["screw"][1]["mask_path"] = ""
    (meta / "meta.json").write_text(json.dumps(index))
    with pytest.raises(DatasetError, match="no mask_path"):
        load_dataset(meta)
    with pytest.raises(DatasetError, match="no 'val' split"):
        load_dataset(meta, split="val")
    (meta / "meta.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_dataset(meta)


def test_native_layout_wins_over_meta_json(mvtec):
    (mvtec / "meta.json").write_text("{}")
    assert detect_layout(mvtec) == "mvtec"
    with pytest.raises(DatasetError, match="no 'test' split"):
        load_dataset(mvtec, kind="meta")


# --------------------------------------------------------------------------- not a dataset


def test_folders_that_are_not_datasets(tmp_path):
    with pytest.raises(DatasetError) as excinfo:
        load_dataset(tmp_path / "missing")
    assert "does not exist" in one_line_error(excinfo)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError) as excinfo:
        load_dataset(empty)
    assert "is empty" in one_line_error(excinfo) and "make-synthetic" in str(excinfo.value)
    junk = tmp_path / "junk"
    png(junk / "photos" / "cat.png")
    with pytest.raises(DatasetError) as excinfo:
        load_dataset(junk)
    assert "not an anomaly-detection dataset" in one_line_error(excinfo)
    with pytest.raises(DatasetError, match="not a VisA root"):
        load_dataset(junk, kind="visa")
    assert issubclass(DatasetError, FBClipError)


# --------------------------------------------------------------------------- reading files


def test_read_image_converts_modes(tmp_path):
    grey = read_image(png(tmp_path / "g.png", 77, mode="L"))
    assert grey.shape == (6, 8, 3) and grey.dtype == np.uint8 and (grey == 77).all()
    rgba = tmp_path / "a.png"
    Image.fromarray(np.full((4, 5, 4), 200, dtype=np.uint8)).save(rgba)
    assert read_image(rgba).shape == (4, 5, 3)
    deep = tmp_path / "d.png"
    Image.fromarray(np.full((3, 3), 65535, dtype=np.uint16)).save(deep)
    assert (read_image(deep) == 255).all()


def test_corrupt_and_truncated_images_name_the_file(tmp_path):
    corrupt = tmp_path / "bad" / "000.png"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(ImageReadError) as excinfo:
        read_image(corrupt)
    assert str(corrupt) in one_line_error(excinfo)
    whole = png(tmp_path / "whole.png", size=(64, 64))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(whole.read_bytes()[:-40])
    with pytest.raises(ImageReadError, match="truncated.png"):
        read_image(truncated)
    with pytest.raises(ImageReadError, match="not found"):
        read_image(tmp_path / "absent.png")
    with pytest.raises(ImageReadError, match="cannot read mask"):
        read_mask(corrupt, (6, 8))


def test_read_mask_zeros_for_good_and_resizes(tmp_path):
    zeros = read_mask(None, (5, 7))
    assert zeros.shape == (5, 7) and zeros.dtype == np.float32 and not zeros.any()
    mask = mask_png(tmp_path / "m.png")
    resized = read_mask(mask, (12, 16))
    assert resized.shape == (12, 16) and resized.sum() == 24


def test_sample_dataset_yields_arrays_and_reports_corrupt_files(mvtec):
    samples = load_dataset(mvtec, categories=["bottle"])
    dataset = SampleDataset(samples)
    image, mask, label, category = dataset[len(dataset) - 1]
    assert image.shape == (6, 8, 3) and mask.shape == (6, 8)
    assert label == 1 and category == "bottle" and mask.sum() == 6
    samples[0].image_path.write_bytes(b"garbage")
    with pytest.raises(ImageReadError, match=samples[0].image_path.name):
        dataset[0]
    flipped = SampleDataset(samples[1:], transform=lambda i, m: (i[:, ::-1], m[:, ::-1]))
    assert flipped[0][0].shape == (6, 8, 3)
