"""FiLo training (spec 9): optimizer groups against a hand-built AdamW step, logged losses
against the reference's golden terms, exact resume, the MVTec mosaic, and errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fbclip_edge.cli import app
from fbclip_edge.data import load_dataset, make_synthetic
from fbclip_edge.demo import filo_fixture_backbone, find_fixture
from fbclip_edge.errors import FBClipError
from fbclip_edge.methods.filo import import_official
from fbclip_edge.methods.filo.descriptions import load_descriptions
from fbclip_edge.methods.filo.folder import is_filo_folder, load_filo, save_filo
from fbclip_edge.preprocess import preprocess
from fbclip_edge.train_filo import (
    ADAPTER,
    HEADS,
    PROMPT_LEARNERS,
    FiLoTrainConfig,
    FiLoTrainingSet,
    item_rng,
    mosaic,
    resize_mask,
    train_filo,
)

SIZE = 42  # the random tiny model's image side (3 x 3 patches)
BETAS = (0.5, 0.999)
WEIGHT_DECAY = 0.01


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are latency-bound; one thread keeps them fast on a shared 2-core runner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write_descriptions(path: Path, entries: dict[str, Any]) -> Path:
    path.write_text(json.dumps(entries, indent=2))
    return path


def _state(folder: Path) -> dict[str, torch.Tensor]:
    return load_filo(folder).model.state_dict()


def _part(name: str, prefixes: tuple[str, ...]) -> bool:
    return name.startswith(prefixes)


# ----- the fixture's two images as an MVTec-layout dataset, the imported model as a folder -----
_golden_backbone = filo_fixture_backbone  # the fixture's tiny CLIP (fbclip_edge.demo)


@pytest.fixture(scope="module")
def golden() -> dict:
    found = find_fixture("filo")
    if found is None:
        pytest.skip("FiLo reference fixture not found: set FILO_FIXTURE to filo-reference-tiny/")
    return {
        "dir": found,
        **torch.load(found / "golden.pt", map_location="cpu", weights_only=False),
    }


@pytest.fixture(scope="module")
def reference(golden: dict, tmp_path_factory) -> dict[str, Path]:
    """bottle/test/good/000.png (normal) and pcb1/test/defect/000.png with its mask, the
    fixture's descriptions, and the imported checkpoint saved as a FiLo folder."""
    root = tmp_path_factory.mktemp("filo-ref")
    data = root / "data"
    assert golden["labels"].tolist() == [0.0, 1.0] and not golden["masks"][0].any()
    for i, category in enumerate(golden["categories"]):
        defect = "good" if i == 0 else "defect"
        folder = data / category / "test" / defect
        folder.mkdir(parents=True)
        Image.fromarray(golden["images_uint8"][i].numpy()).save(folder / "000.png")
        if defect != "good":
            masks = data / category / "ground_truth" / defect
            masks.mkdir(parents=True)
            mask = golden["masks"][i].numpy().astype(np.uint8) * 255
            Image.fromarray(mask).save(masks / "000_mask.png")
    keys = ("class_word", "descriptions", "grounding_descriptions")
    entries = {name: {k: golden["prompts"][name][k] for k in keys} for name in golden["categories"]}
    descriptions = _write_descriptions(root / "descriptions.json", entries)
    model, source = import_official(
        golden["dir"] / "filo_checkpoint.pth",
        clip_weights=golden["dir"] / "clip_openai_state_dict.pt",
        backbone=_golden_backbone(golden["config"]),
    )
    init = save_filo(root / "init", model, descriptions, source=source)
    return {"root": root, "data": data, "descriptions": descriptions, "init": init}


def _reference_run(reference: dict[str, Path], name: str, **settings: Any) -> Path:
    out = reference["root"] / name
    config = FiLoTrainConfig(
        data=reference["data"],
        out=out,
        descriptions=reference["descriptions"],
        init=reference["init"],
        mosaic=False,  # the fixture's terms were taken without the mosaic
        max_steps=1,
        progress=False,
        **settings,
    )
    train_filo(config)
    return out


@pytest.fixture(scope="module")
def stage1_run(reference: dict[str, Path]) -> Path:
    return _reference_run(reference, "stage1", epochs=1, adapter_epochs=0)


@pytest.fixture(scope="module")
def stage2_run(reference: dict[str, Path]) -> Path:
    return _reference_run(reference, "stage2", epochs=0, adapter_epochs=1)


def _first_step(out: Path) -> tuple[dict[str, Any], int]:
    """Step 0 of history.json and which fixture image (0 bottle, 1 pcb1) it trained on."""
    step = json.loads((out / "history.json").read_text())["steps"][0]
    assert len(step["images"]) == 1 and step["mosaic"] == [False]
    return step, 0 if "/bottle/" in step["images"][0] else 1


def _adamw_first_step(
    param: torch.Tensor, grad: torch.Tensor, lr: float, eps: float = 1e-8
) -> torch.Tensor:
    """AdamW's first update written out: decoupled decay, then the bias-corrected moments."""
    m = (1 - BETAS[0]) * grad
    v = (1 - BETAS[1]) * grad * grad
    m_hat, v_hat = m / (1 - BETAS[0]), v / (1 - BETAS[1])
    return param * (1 - lr * WEIGHT_DECAY) - lr * m_hat / (v_hat.sqrt() + eps)


def _ulps(actual: torch.Tensor, expected: torch.Tensor, before: torch.Tensor, lr: float) -> float:
    """Largest difference in float32 units in the last place of the step's operands (p before
    and after, and the step of about lr): up to 3 where only the order of operations differs
    (gradients near AdamW's eps amplify it), while a wrong lr is thousands of them and a
    missing weight decay (lr * 0.01 * |p|) 8 or more on the heads and prompt learners."""
    scale = torch.maximum(torch.maximum(before.abs(), expected.abs()), torch.tensor(lr))
    ulp = torch.nextafter(scale, torch.tensor(float("inf"))) - scale
    return float(((actual - expected).abs() / ulp).max())


def _hand_step(
    reference: dict[str, Path], out: Path, stage: int, rates: dict[tuple[str, ...], float]
) -> None:
    """The run's one step equals a hand-built AdamW step on the same image and loss, with
    each group's lr; every other tensor (CLIP included) is bit-unchanged."""
    _, image = _first_step(out)
    initial = load_filo(reference["init"])
    model, table = initial.model.train(), initial.table
    samples = load_dataset(reference["data"])
    index = [i for i, s in enumerate(samples) if s.category == ("bottle", "pcb1")[image]][0]
    pixels, mask, label, _, _ = FiLoTrainingSet(samples, 518)[index]
    category = [table[samples[index].category]]
    if stage == 1:
        terms = model.stage1_loss(pixels[None], mask[None], category)
    else:
        terms = model.stage2_loss(pixels[None], torch.tensor([label]), category)
    terms.total.backward()
    trained = _state(out / "last")
    learned = dict(model.named_parameters())
    changed = 0
    for name, before in model.state_dict().items():
        group = [prefixes for prefixes in rates if _part(name, prefixes)]
        if not group:
            assert torch.equal(trained[name], before), name
            continue
        grad = learned[name].grad
        assert grad is not None, name
        expected = _adamw_first_step(before, grad, rates[group[0]])
        assert _ulps(trained[name], expected, before, rates[group[0]]) <= 4, name
        changed += int(not torch.equal(trained[name], before))
    assert changed == sum(1 for n in learned if any(_part(n, p) for p in rates))


def test_stage1_step_is_adamw_on_heads_and_prompt_learners(reference, stage1_run):
    _hand_step(reference, stage1_run, 1, {HEADS: 1e-4, PROMPT_LEARNERS: 1e-3})
    assert not any(n.startswith("stage2") for n in (p.name for p in stage1_run.iterdir()))


def test_stage2_step_changes_only_the_adapter(reference, stage2_run):
    _hand_step(reference, stage2_run, 2, {ADAPTER: 1e-5})


def test_logged_step0_terms_equal_the_reference(golden, stage1_run, stage2_run):
    step, image = _first_step(stage1_run)
    assert step["stage"] == 1 and step["global_step"] == 0
    assert step["losses"]["total"] == pytest.approx(float(golden["loss_main"][image]), abs=1e-5)
    for name, key in (("focal", "loss_focal"), ("dice_abnormal", "loss_dice_abnormal")):
        expected = float(golden[key][image].sum())
        assert step["losses"][name] == pytest.approx(expected, abs=1e-5)
    step, image = _first_step(stage2_run)
    assert step["stage"] == 2 and set(step["losses"]) == {"adapter_ce", "total"}
    expected = float(golden["loss_adapter_ce"][image])
    assert step["losses"]["adapter_ce"] == pytest.approx(expected, abs=1e-5)


def test_init_from_the_official_checkpoint_trains_like_its_folder(golden, reference, stage1_run):
    """--init FILE imports {"filo": ...} (here with the fixture's CLIP and a backbone JSON, as
    its head count is not in the weights): the same run as from the imported folder."""
    arch = reference["root"] / "backbone.json"
    arch.write_text(json.dumps(dataclasses.asdict(_golden_backbone(golden["config"]))))
    out = _reference_run(
        {**reference, "init": golden["dir"] / "filo_checkpoint.pth"},
        "official",
        epochs=1,
        adapter_epochs=0,
        clip_weights=golden["dir"] / "clip_openai_state_dict.pt",
        backbone=str(arch),
    )
    expected = _state(stage1_run / "last")
    state = _state(out / "last")
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    assert load_filo(out / "last").meta["source"]["init"].endswith("filo_checkpoint.pth")


# ----- a random tiny model on synthetic data: resume, folders, CLI -----
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("filo-synthetic")
    names = make_synthetic(root / "data", categories=2, images=4, size=64, seed=3)
    entries = {name: {"descriptions": ["scratch", "dent on the side"]} for name in names}
    descriptions = _write_descriptions(root / "descriptions.json", entries)
    return {"root": root, "data": root / "data", "names": names, "descriptions": descriptions}


def _tiny(synthetic: dict[str, Any], out: Path, **settings: Any) -> FiLoTrainConfig:
    values: dict[str, Any] = dict(
        data=synthetic["data"],
        out=out,
        descriptions=synthetic["descriptions"],
        backbone="tiny",
        pretrained="none",
        image_size=SIZE,
        max_steps=2,
        seed=1,  # with these settings a mosaic comes up in stage 2, after both resume points
        progress=False,
    )
    values.update(settings)
    return FiLoTrainConfig(**values)


def test_resume_mid_stage_and_across_the_boundary_is_exact(synthetic, tmp_path):
    straight = train_filo(_tiny(synthetic, tmp_path / "straight", epochs=2, adapter_epochs=1))
    names = ["stage1-epoch-001", "stage1-epoch-002", "stage2-epoch-001"]
    assert [p.name for p in straight.checkpoints] == names
    assert (tmp_path / "straight" / "last").resolve().name == names[-1]
    assert is_filo_folder(tmp_path / "straight" / "last")
    final = _state(tmp_path / "straight" / "last")

    split = tmp_path / "split"
    train_filo(_tiny(synthetic, split, epochs=1, adapter_epochs=0))
    resumed = train_filo(
        _tiny(synthetic, split, epochs=2, adapter_epochs=1, resume=split / names[0])
    )
    assert [p.name for p in resumed.checkpoints] == names[1:]
    across = train_filo(
        _tiny(
            synthetic,
            tmp_path / "across",
            epochs=2,
            adapter_epochs=1,
            resume=tmp_path / "straight" / names[1],
        )
    )
    assert [p.name for p in across.checkpoints] == names[2:]
    for run in (split, tmp_path / "across"):
        state = _state(run / "last")
        assert state.keys() == final.keys()
        for key, value in final.items():
            assert torch.equal(state[key], value), (run.name, key)

    history = json.loads((split / "history.json").read_text())
    expected = json.loads((tmp_path / "straight" / "history.json").read_text())
    assert [s["losses"] for s in history["steps"]] == [s["losses"] for s in expected["steps"]]
    assert [(e["stage"], e["epoch"]) for e in history["epochs"]] == [(1, 1), (1, 2), (2, 1)]
    assert [s["mosaic"] for s in history["steps"]] == [s["mosaic"] for s in expected["steps"]]
    assert any(s["mosaic"] == [True] for s in history["steps"])
    assert set(expected["steps"][0]["losses"]) == {"focal", "dice_abnormal", "dice_normal", "total"}

    # CLIP never moved; the trained folder carries its source and the descriptions.
    fresh = load_filo(split / names[0]).model.state_dict()
    assert all(torch.equal(final[k], v) for k, v in fresh.items() if k.startswith("clip."))
    meta = load_filo(split / "last").meta
    assert meta["source"]["kind"] == "trained" and meta["source"]["stage"] == 2
    with pytest.raises(FBClipError, match="already finished"):
        train_filo(_tiny(synthetic, split, epochs=2, adapter_epochs=1, resume=split / "last"))


def test_cli_trains_filo_and_refuses_filo_options_elsewhere(synthetic, tmp_path):
    common = ["train", "--data", str(synthetic["data"]), "--backbone", "tiny"]
    common += ["--pretrained", "none", "--image-size", str(SIZE), "--no-progress"]
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        app,
        [*common, "--out", str(out), "--method", "filo"]
        + ["--descriptions", str(synthetic["descriptions"]), "--epochs", "1"]
        + ["--adapter-epochs", "1", "--max-steps", "1", "--no-mosaic"],
    )
    assert result.exit_code == 0, result.output
    assert "stage 2 epoch 1" in result.output
    config = json.loads((out / "history.json").read_text())["config"]
    assert config["mosaic"] is False and config["prompt_lr"] == 1e-3
    assert load_filo(out / "stage2-epoch-001").model.config.image_size == SIZE

    refused = CliRunner().invoke(
        app, [*common, "--out", str(tmp_path / "x"), "--no-mosaic", "--adapter-epochs", "2"]
    )
    assert refused.exit_code == 1
    assert "--adapter-epochs, --mosaic/--no-mosaic: FiLo-only" in " ".join(refused.output.split())
    missing = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "y"), "--method", "filo"])
    assert missing.exit_code == 1 and "--descriptions" in missing.output


def test_fresh_model_takes_clip_weights_with_the_resized_positional_embedding(synthetic, tmp_path):
    from fbclip_edge.clip.backbone import TINY_BACKBONE, build_clip
    from fbclip_edge.methods.filo.importer import resize_positional_embedding
    from fbclip_edge.train_filo import new_filo

    torch.manual_seed(7)
    weights = build_clip(TINY_BACKBONE).state_dict()
    torch.save(weights, tmp_path / "clip.pt")
    model = new_filo(_tiny(synthetic, tmp_path, clip_weights=tmp_path / "clip.pt"))
    assert model.config.image_size == SIZE and not model.config.quick_gelu
    state = model.clip.state_dict()
    pos = resize_positional_embedding(weights["visual.positional_embedding"], SIZE // 14)
    assert torch.equal(state["visual.positional_embedding"], pos)
    others = [k for k in weights if k != "visual.positional_embedding" and k in state]
    assert len(others) == len(weights) - 1
    assert all(torch.equal(state[k], weights[k]) for k in others)
    again = new_filo(_tiny(synthetic, tmp_path, clip_weights=tmp_path / "clip.pt"))
    assert torch.equal(again.decoder_cov.fc_77[0].weight, model.decoder_cov.fc_77[0].weight)


def test_missing_category_names_it_and_the_file(synthetic, tmp_path):
    first = synthetic["names"][0]
    partial = _write_descriptions(tmp_path / "partial.json", {first: {"descriptions": ["dent"]}})
    missing = synthetic["names"][1]
    with pytest.raises(FBClipError, match=f"partial.json: no entry for category '{missing}'"):
        train_filo(_tiny(synthetic, tmp_path / "run", descriptions=partial))
    assert not (tmp_path / "run").exists()


def test_class_word_sharing_is_the_reference_default(synthetic, tmp_path):
    from fbclip_edge.train_filo import category_table

    entries = {
        "macaroni1": {"descriptions": ["first"]},
        "macaroni2": {"descriptions": ["second"]},
    }
    path = _write_descriptions(tmp_path / "d.json", entries)
    shared = category_table(_tiny(synthetic, tmp_path, descriptions=path), ["macaroni1"])
    own = category_table(
        _tiny(synthetic, tmp_path, descriptions=path, share_class_words=False), ["macaroni1"]
    )
    assert shared["macaroni1"].descriptions == ("second",)
    assert own["macaroni1"].descriptions == ("first",)
    assert load_descriptions(path)["macaroni1"].descriptions == ("first",)


# ----- the 2 x 2 mosaic -----
def test_mosaic_places_tiles_row_major_with_their_masks():
    images = [np.full((4, 6, 3), 40 * (i + 1), dtype=np.uint8) for i in range(4)]
    masks = [np.zeros((4, 6), dtype=np.float32) for _ in range(4)]
    masks[1][1, 2] = 1
    masks[2][3, 5] = 1
    images[3] = np.full((8, 12, 3), 160, dtype=np.uint8)  # another size: resized to the first's
    masks[3] = np.ones((8, 12), dtype=np.float32)
    image, mask = mosaic(images, masks)
    assert image.shape == (8, 12, 3) and mask.shape == (8, 12)
    for i, (rows, cols) in enumerate(
        [(slice(0, 4), slice(0, 6)), (slice(0, 4), slice(6, 12))]
        + [(slice(4, 8), slice(0, 6)), (slice(4, 8), slice(6, 12))]
    ):
        assert (image[rows, cols] == 40 * (i + 1)).all(), i
    assert mask[0:4, 0:6].sum() == 0 and mask[1, 8] == 1 and mask[7, 5] == 1
    assert mask[0:4, 6:12].sum() == 1 and mask[4:8, 0:6].sum() == 1 and mask[4:8, 6:12].all()
    with pytest.raises(FBClipError, match="4 images"):
        mosaic(images[:3], masks[:3])


def test_mosaic_item_keeps_the_original_label(synthetic):
    samples = load_dataset(synthetic["data"])
    dataset = FiLoTrainingSet(samples, SIZE, mosaic_probability=1.0, seed=5)
    dataset.set_epoch(1, 2)
    index = next(i for i, s in enumerate(samples) if s.label == 0)
    pixels, target, label, returned, combined = dataset[index]
    assert combined and returned == index and label == 0.0

    rng = item_rng(5, 1, 2, index)
    rng.random()  # the draw that chose the mosaic
    tiles = dataset.tiles(samples[index].category, rng)
    assert {t.category for t in tiles} == {samples[index].category}
    parts = [dataset._read(tile) for tile in tiles]
    image, mask = mosaic([p[0] for p in parts], [p[1] for p in parts])
    assert torch.equal(pixels, preprocess(image, SIZE)[0])
    assert torch.equal(target, torch.from_numpy(resize_mask(mask, SIZE)))

    plain = FiLoTrainingSet(samples, SIZE)[index]
    assert plain[4] is False and plain[2] == 0.0
