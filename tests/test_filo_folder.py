"""FiLo model folders: `import-official --method filo` on the reference fixture, load_filo, the
save/load round trip, and one-line errors for damaged, edited or foreign folders.

The imported folder must reproduce the reference's outputs through the loaded detector (spec 0):
the Grounding DINO port's raw outputs differ from the reference's by float32 rounding (and a
near-tie slot swap on image 0), but the boxes and position words derived from them are the same
(tests/test_filo_grounding.py), so image_score and anomaly_map agree within 1e-5.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import filo_fixture
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("transformers")

from fbclip_edge import checkpoint, create_model, save_model  # noqa: E402
from fbclip_edge.cli import app  # noqa: E402
from fbclip_edge.errors import FBClipError  # noqa: E402
from fbclip_edge.methods.filo import (  # noqa: E402
    FiLoFolder,
    is_filo_folder,
    load_filo,
    save_filo,
)
from fbclip_edge.methods.filo import folder as filo_folder  # noqa: E402
from fbclip_edge.methods.filo.folder import (  # noqa: E402
    BERT_DIR,
    DESCRIPTIONS_FILE,
    GROUNDING_FILE,
    sha256_file,
)

TOL = 1e-5
runner = CliRunner()


@pytest.fixture(scope="module")
def filo_dir() -> Path:
    return filo_fixture.fixture_dir()


@pytest.fixture(scope="module")
def golden(filo_dir: Path) -> dict:
    return filo_fixture.load_golden(filo_dir)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, golden: dict) -> dict[str, Path]:
    """The user's files: descriptions JSON, the fixture's CLIP arch (head counts are not
    visible in the weights) and its Grounding DINO config values."""
    root = tmp_path_factory.mktemp("inputs")
    keys = ("class_word", "descriptions", "grounding_descriptions")
    table = {name: {k: entry[k] for k in keys} for name, entry in golden["prompts"].items()}
    (root / "descriptions.json").write_text(json.dumps(table, indent=1), encoding="utf-8")
    config = golden["config"]
    backbone = {
        "name": "filo-tiny",
        "embed_dim": config["embed_dim"],
        "vision": {
            "image_size": config["pretrained_res"],
            "layers": config["vision_layers"],
            "width": config["vision_width"],
            "patch_size": config["patch_size"],
            "head_width": config["vision_width"] // config["vision_heads"],
        },
        "text": {
            "context_length": config["context_length"],
            "vocab_size": config["vocab_size"],
            "width": config["text_width"],
            "heads": config["text_heads"],
            "layers": config["text_layers"],
        },
        "quick_gelu": False,
    }
    (root / "backbone.json").write_text(json.dumps(backbone))
    (root / "grounding.json").write_text(json.dumps(config["grounding_dino"]))
    return {
        "descriptions": root / "descriptions.json",
        "backbone": root / "backbone.json",
        "grounding": root / "grounding.json",
    }


def _import_args(filo_dir: Path, inputs: dict[str, Path], out: Path, grounding: bool) -> list:
    args = ["import-official", "--method", "filo"]
    args += ["--checkpoint", str(filo_dir / "filo_checkpoint.pth")]
    args += ["--descriptions", str(inputs["descriptions"]), "--backbone", str(inputs["backbone"])]
    if grounding:
        args += ["--grounding-checkpoint", str(filo_dir / "grounding_dino_checkpoint.pth")]
        args += ["--text-encoder", str(filo_dir / "bert")]
        args += ["--grounding-config", str(inputs["grounding"])]
    return [*args, "--out", str(out)]


@pytest.fixture(scope="module")
def imported(
    tmp_path_factory: pytest.TempPathFactory, filo_dir: Path, inputs: dict[str, Path]
) -> Path:
    out = tmp_path_factory.mktemp("folders") / "filo"
    result = runner.invoke(app, _import_args(filo_dir, inputs, out, grounding=True))
    assert result.exit_code == 0, result.output
    assert "with Grounding DINO" in result.output
    return out


@pytest.fixture(scope="module")
def loaded(imported: Path) -> FiLoFolder:
    return load_filo(imported)


def _one_line(error: pytest.ExceptionInfo[FBClipError]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / folder.name
    shutil.copytree(folder, target)
    for path in target.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


# ----- import and parity -----
def test_folder_layout(imported, filo_dir, inputs, golden):
    names = sorted(p.name for p in imported.iterdir())
    expected = [BERT_DIR, "config.json", DESCRIPTIONS_FILE, GROUNDING_FILE, "model.safetensors"]
    assert names == sorted(expected)
    bert = sorted(p.name for p in (imported / BERT_DIR).iterdir())
    assert bert == ["config.json", "special_tokens_map.json", "tokenizer_config.json", "vocab.txt"]
    for name in bert:  # tokenizer and config files copied as they are, no weights
        assert (imported / BERT_DIR / name).read_bytes() == (filo_dir / "bert" / name).read_bytes()
    copied = (imported / DESCRIPTIONS_FILE).read_bytes()
    assert copied == inputs["descriptions"].read_bytes()
    meta = json.loads((imported / "config.json").read_text())
    assert meta["format"] == checkpoint.FORMAT_NAME and meta["method"] == "filo"
    assert meta["descriptions_sha256"] == sha256_file(inputs["descriptions"])
    assert meta["config"]["image_size"] == 518
    assert meta["config"]["feature_layers"] == [6, 12, 18, 24]
    arch = meta["grounding"]["arch"]
    assert arch["hidden_dim"] == golden["config"]["grounding_dino"]["hidden_dim"] == 64
    assert arch["swin_depths"] == [2, 2, 2, 2] and arch["enc_layers"] == 2
    assert meta["source"]["clip_weights"] is None  # the checkpoint's CLIP copy
    assert {"torch", "transformers", "fbclip_edge"} <= set(meta["versions"])
    assert is_filo_folder(imported)


def test_loaded_folder_reproduces_the_reference(loaded, golden):
    assert not loaded.model.training and loaded.detector is not None
    assert list(loaded.table) == ["bottle", "pcb1"]
    for i, name in enumerate(golden["categories"]):
        category = loaded.table[name]
        with torch.no_grad():
            (found,) = loaded.detector.locate(
                golden["gd_pixel_values"][i : i + 1], [category.grounding_descriptions]
            )
            out = loaded.model(golden["pixel_values"][i : i + 1], [category], [found])
        assert found.positions == golden["positions"][i]
        assert (out.image_score - golden["image_score"][i : i + 1]).abs().max() < TOL
        assert (out.anomaly_map - golden["anomaly_map"][i : i + 1]).abs().max() < TOL


def test_save_load_round_trip_keeps_every_tensor(loaded, imported, tmp_path):
    out = save_filo(
        tmp_path / "again",
        loaded.model,
        imported / DESCRIPTIONS_FILE,
        loaded.detector,
        imported / BERT_DIR,
        source=loaded.meta["source"],
    )
    again = load_filo(out)
    assert again.detector is not None and loaded.detector is not None
    pairs = (
        (loaded.model.state_dict(), again.model.state_dict()),
        (loaded.detector.model.state_dict(), again.detector.model.state_dict()),
    )
    for before, after in pairs:
        assert list(before) == list(after)
        for key, value in before.items():
            assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    assert again.model.config == loaded.model.config
    assert again.meta["grounding"] == loaded.meta["grounding"]
    assert again.descriptions_sha256 == loaded.descriptions_sha256
    assert again.table == loaded.table
    special = again.detector.model.model.special_tokens.tolist()
    assert special == [2, 3, 5, 6]  # the tiny vocabulary's ids, set from the tokenizer


def test_import_without_grounding_has_no_box_prior(filo_dir, inputs, tmp_path, loaded):
    out = tmp_path / "plain"
    result = runner.invoke(app, _import_args(filo_dir, inputs, out, grounding=False))
    assert result.exit_code == 0, result.output
    assert "no box prior" in result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        DESCRIPTIONS_FILE,
        "model.safetensors",
    ]
    plain = load_filo(out)
    assert plain.detector is None and plain.meta["grounding"] is None
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(plain.model.state_dict()[key], value), key


# ----- errors -----
def test_edited_descriptions_are_refused(imported, tmp_path):
    folder = _copy(imported, tmp_path)
    path = folder / DESCRIPTIONS_FILE
    path.write_bytes(path.read_bytes() + b" ")
    with pytest.raises(FBClipError, match="edited after.*re-import.*--descriptions") as error:
        load_filo(folder)
    _one_line(error)


@pytest.mark.parametrize("name", ["model.safetensors", GROUNDING_FILE, DESCRIPTIONS_FILE])
def test_missing_files_are_one_line_errors(imported, tmp_path, name):
    folder = _copy(imported, tmp_path)
    (folder / name).unlink()
    with pytest.raises(FBClipError, match=f"{name} is missing.*import-official") as error:
        load_filo(folder)
    _one_line(error)


@pytest.mark.parametrize("name", ["model.safetensors", GROUNDING_FILE])
def test_truncated_weights_are_one_line_errors(imported, tmp_path, name):
    folder = _copy(imported, tmp_path)
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(FBClipError, match=f"{name} is corrupt or truncated") as error:
        load_filo(folder)
    _one_line(error)


def test_bad_config_json_is_a_one_line_error(imported, tmp_path):
    folder = _copy(imported, tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(FBClipError, match="not valid JSON") as error:
        load_filo(folder)
    _one_line(error)
    assert not is_filo_folder(folder)
    with pytest.raises(FBClipError, match="no config.json") as error:
        load_filo(tmp_path / "absent")
    _one_line(error)


def test_fbclip_folder_and_filo_folder_are_told_apart(imported, tmp_path):
    fbclip = tmp_path / "fbclip"
    save_model(create_model("tiny", image_size=112, seed=1), fbclip)
    assert not is_filo_folder(fbclip)
    with pytest.raises(FBClipError, match="fbclip model folder, not FiLo.*checkpoint.load") as e:
        load_filo(fbclip)
    _one_line(e)
    with pytest.raises(FBClipError, match="FiLo model folder.*load_filo.*Detector.open") as e:
        checkpoint.load(imported)
    _one_line(e)


def test_failing_save_leaves_no_partial_folder(loaded, imported, tmp_path, monkeypatch):
    def broken(bert_dir: Path, target: Path) -> list[str]:
        target.mkdir()
        raise OSError("disk full")

    monkeypatch.setattr(filo_folder, "_copy_bert", broken)
    args = (loaded.model, imported / DESCRIPTIONS_FILE, loaded.detector, imported / BERT_DIR)
    with pytest.raises(OSError, match="disk full"):
        save_filo(tmp_path / "new", *args)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its staging copy
    existing = _copy(imported, tmp_path)
    before = {p.name: p.read_bytes() for p in existing.iterdir() if p.is_file()}
    with pytest.raises(OSError, match="disk full"):
        save_filo(existing, *args)
    assert {p.name: p.read_bytes() for p in existing.iterdir() if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == [existing.name]


def test_save_refuses_bad_inputs_before_writing(loaded, imported, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"bottle": {"descriptions": []}}')
    with pytest.raises(FBClipError, match="empty descriptions list") as error:
        save_filo(tmp_path / "out", loaded.model, bad)
    _one_line(error)
    with pytest.raises(FBClipError, match="go together") as error:
        save_filo(tmp_path / "out", loaded.model, imported / DESCRIPTIONS_FILE, loaded.detector)
    _one_line(error)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (["--method", "fbclip", "--descriptions", "d.json"], "--descriptions: FiLo options"),
        (["--method", "filo"], "FiLo needs --descriptions"),
        (
            ["--method", "filo", "--descriptions", "{descriptions}", "--text-encoder", "bert"],
            "--grounding-checkpoint and --text-encoder go together",
        ),
    ],
)
def test_cli_wrong_combinations_are_one_line_errors(tmp_path, filo_dir, inputs, extra, pattern):
    extra = [item.format(descriptions=inputs["descriptions"]) for item in extra]
    args = ["import-official", "--checkpoint", str(filo_dir / "filo_checkpoint.pth")]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "out"), *extra])
    assert result.exit_code == 1, result.output
    assert pattern in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
