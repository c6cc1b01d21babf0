"""Synthetic dataset: MVTec layout, exact masks, determinism, variety, speed, safety."""

import time

import numpy as np
import pytest
from PIL import Image

from fbclip_edge.data import FAMILIES, contact_sheet, load_dataset, make_synthetic, read_mask
from fbclip_edge.data.synthetic import DEFECTS, render
from fbclip_edge.errors import FBClipError


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "ds"
    names = make_synthetic(root, categories=3, images=5, size=64, seed=3)
    return root, names


def test_layout_loads_as_mvtec(small):
    root, names = small
    assert names == [f.name for f in FAMILIES[:3]]
    test = load_dataset(root, kind="mvtec")
    assert sorted({s.category for s in test}) == sorted(names)
    assert len(test) == 3 * 5 and len(load_dataset(root, split="train")) == 3 * 5
    for category in names:
        labels = [s.label for s in test if s.category == category]
        assert labels.count(0) >= 1 and labels.count(1) >= 1
    for sample in test:
        image = np.asarray(Image.open(sample.image_path))
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        if sample.label:
            raw = np.asarray(Image.open(sample.mask_path))
            assert set(np.unique(raw)) == {0, 255}
            assert read_mask(sample.mask_path, (64, 64)).sum() >= 8


def test_masks_are_exactly_the_changed_pixels():
    for family in FAMILIES:
        style = family.style(np.random.default_rng(1))
        for index, defect in enumerate(family.defects):
            clean, _ = render(family, style, np.random.default_rng(index), 96, None)
            image, mask = render(family, style, np.random.default_rng(index), 96, defect)
            changed = (image != clean).any(axis=2)
            assert mask.any(), (family.name, defect)
            np.testing.assert_array_equal(changed, mask, err_msg=f"{family.name}/{defect}")


def test_families_cover_textures_objects_and_all_defect_kinds():
    assert len({f.name for f in FAMILIES}) == len(FAMILIES) >= 10
    assert {f.kind for f in FAMILIES[:2]} == {"texture", "object"}
    assert {d for f in FAMILIES for d in f.defects} == set(DEFECTS)


def test_categories_look_different():
    """Mean colour and texture energy differ between categories: a held-out one is new."""
    stats = []
    for family in FAMILIES:
        image, _ = render(
            family, family.style(np.random.default_rng(0)), np.random.default_rng(0), 64, None
        )
        grey = image.astype(float).mean(axis=2)
        stats.append((*image.reshape(-1, 3).mean(axis=0), np.abs(np.diff(grey, axis=1)).mean()))
    stats = np.array(stats)
    distances = np.linalg.norm(stats[:, None] - stats[None], axis=2)
    assert distances[~np.eye(len(FAMILIES), dtype=bool)].min() > 3


def test_deterministic_per_seed(tmp_path, small):
    root, _ = small
    again = tmp_path / "again"
    make_synthetic(again, categories=3, images=5, size=64, seed=3)
    files = sorted(p.relative_to(root) for p in root.rglob("*.png"))
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.png"))
    assert all((root / f).read_bytes() == (again / f).read_bytes() for f in files)
    other = tmp_path / "other"
    make_synthetic(other, categories=1, images=2, size=64, seed=4)
    first = f"{FAMILIES[0].name}/train/good/000.png"
    assert (root / first).read_bytes() != (other / first).read_bytes()


def test_refuses_to_clobber_and_validates_arguments(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("do not delete")
    with pytest.raises(FBClipError, match="already exists"):
        make_synthetic(precious, categories=1, images=2, size=64, overwrite=True)
    assert (precious / "thesis.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    ours = tmp_path / "ours"
    make_synthetic(ours, categories=1, images=2, size=64)
    with pytest.raises(FBClipError, match="already exists"):
        make_synthetic(ours, categories=1, images=2, size=64)
    make_synthetic(ours, categories=2, images=2, size=64, overwrite=True)
    assert len(load_dataset(ours)) == 4
    with pytest.raises(FBClipError, match="--categories"):
        make_synthetic(tmp_path / "x", categories=len(FAMILIES) + 1)
    with pytest.raises(FBClipError, match="--images"):
        make_synthetic(tmp_path / "x", images=1)


def test_demo_sized_dataset_is_fast_and_sheet_renders(tmp_path):
    start = time.perf_counter()
    make_synthetic(tmp_path / "demo", categories=4, images=10, size=224, seed=0)
    elapsed = time.perf_counter() - start
    assert elapsed < 20, f"4 x 10 images at 224 px took {elapsed:.1f} s"
    sheet = contact_sheet(tmp_path / "demo", tmp_path / "sheet.png", per_category=5, tile=64)
    assert Image.open(sheet).size == (96 + 5 * 64, 4 * 64)
