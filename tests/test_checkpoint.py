"""Model folders, import-official through the CLI, and clear errors for bad files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import fbclip_edge
from fbclip_edge import FBClipError, create_model, load, save_model
from fbclip_edge.cli import app
from fbclip_edge.factory import read_state_dict_file

runner = CliRunner()


def test_cli_import_official_then_load_gives_reference_numbers(
    tmp_path, clip_weights, official_checkpoint, golden
):
    out = tmp_path / "model"
    result = runner.invoke(
        app,
        [
            "import-official",
            "--clip-weights",
            str(clip_weights),
            "--checkpoint",
            str(official_checkpoint),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["config"]["image_size"] == 518 and meta["config"]["feature_layers"] == [
        1,
        6,
        12,
        18,
        24,
    ]
    assert meta["clip_weights"] == "embedded" and "torch" in meta["versions"]
    model = fbclip_edge.load(out)
    assert not model.training
    with torch.no_grad():
        output = model(golden["pixel_values"][:1])
    assert (output.image_score - golden["image_score"][:1]).abs().max() < 1e-5
    assert (output.patch_map - golden["patch_map"][:1]).abs().max() < 1e-5
    assert (model.text_features - golden["text_features"]).abs().max() < 1e-5


def test_save_load_round_trip_keeps_every_tensor(tmp_path):
    model = create_model("tiny", image_size=224, seed=3)
    save_model(model, tmp_path / "m")
    again = load(tmp_path / "m")
    for (name, a), (_, b) in zip(
        model.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert again.config == model.config


def test_folder_from_before_methods_loads_as_fbclip(tmp_path):
    """Folders written before the method layer have no "method" key: they are FB-CLIP's."""
    model = create_model("tiny", image_size=112, seed=1)
    save_model(model, tmp_path / "old")
    config_path = tmp_path / "old" / "config.json"
    meta = json.loads(config_path.read_text())
    assert meta.pop("method") == "fbclip"
    config_path.write_text(json.dumps(meta))
    old = load(tmp_path / "old")
    assert old.method == "fbclip" and isinstance(old, fbclip_edge.FBCLIP)
    pixels = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(old(pixels).patch_map, model(pixels).patch_map)


def test_anomalyclip_folder_records_its_method(tmp_path):
    model = create_model("tiny", image_size=56, seed=1, method="anomalyclip")
    save_model(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "config.json").read_text())["method"] == "anomalyclip"
    assert load(tmp_path / "a").method == "anomalyclip"


def test_save_replaces_existing_folder_atomically(tmp_path):
    out = tmp_path / "m"
    save_model(create_model("tiny", image_size=224, seed=1), out)
    save_model(create_model("tiny", image_size=224, seed=2), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging leftovers
    assert load(out).config.image_size == 224


def test_state_dict_file_reads_torchscript_archive(tmp_path):
    module = torch.jit.script(torch.nn.Linear(2, 3))
    module.save(str(tmp_path / "scripted.pt"))
    state = read_state_dict_file(tmp_path / "scripted.pt")
    assert set(state) == {"weight", "bias"}


def test_float16_openai_weights_are_kept_float32(tmp_path, clip_weights):
    state = torch.load(clip_weights, map_location="cpu")
    torch.save(
        {k: v.half() if v.is_floating_point() else v for k, v in state.items()},
        tmp_path / "half.pt",
    )
    model = create_model(None, clip_weights=tmp_path / "half.pt", image_size=224)
    assert model.clip.visual.conv1.weight.dtype == torch.float32


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("missing_config", "not an fbclip-edge model folder"),
        ("bad_json", "not valid JSON"),
        ("truncated_weights", "corrupt or truncated"),
        ("missing_weights", "model.safetensors is missing"),
        ("wrong_architecture", "does not fit this model"),
        ("old_format", "re-export it"),
    ],
)
def test_broken_model_folder_gives_clear_error(tmp_path, breakage, message):
    out = tmp_path / "m"
    save_model(create_model("tiny", image_size=224), out)
    config = out / "config.json"
    weights = out / "model.safetensors"
    if breakage == "missing_config":
        config.unlink()
    elif breakage == "bad_json":
        config.write_text("{not json")
    elif breakage == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif breakage == "missing_weights":
        weights.unlink()
    elif breakage == "wrong_architecture":
        meta = json.loads(config.read_text())
        meta["config"]["backbone"]["vision"]["width"] = 128
        config.write_text(json.dumps(meta))
    elif breakage == "old_format":
        meta = json.loads(config.read_text())
        meta["format_version"] = 99
        config.write_text(json.dumps(meta))
    with pytest.raises(FBClipError, match=message):
        load(out)


def test_import_errors_are_one_line(tmp_path, clip_weights, official_checkpoint):
    from fbclip_edge import import_official

    with pytest.raises(FBClipError, match="checkpoint not found"):
        import_official(clip_weights, tmp_path / "nope.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(official_checkpoint.read_bytes()[:4096])
    with pytest.raises(FBClipError, match="truncated or corrupt"):
        import_official(clip_weights, truncated)
    with pytest.raises(FBClipError, match="CLIP weights file not found"):
        import_official(tmp_path / "nope.pt", official_checkpoint)
    bad_clip = tmp_path / "clip_truncated.pt"
    bad_clip.write_bytes(clip_weights.read_bytes()[:4096])
    with pytest.raises(FBClipError, match="truncated or corrupt"):
        import_official(bad_clip, official_checkpoint)


def test_checkpoint_for_another_architecture_is_refused(tmp_path, official_checkpoint):
    # ViT-B-32-shaped CLIP (text width 512) against a checkpoint trained for text width 64.
    other = create_model("ViT-B-32", image_size=224).clip.state_dict()
    torch.save(other, tmp_path / "vit_b_32.pt")
    from fbclip_edge import import_official

    with pytest.raises(FBClipError, match="mis-shaped: fb_attention.bg_norm.bias"):
        import_official(tmp_path / "vit_b_32.pt", official_checkpoint, image_size=224)


def test_unknown_checkpoint_keys_are_listed(tmp_path, clip_weights, official_checkpoint):
    published = torch.load(official_checkpoint, map_location="cpu", weights_only=True)
    published["model_trainable_params"]["mystery_head.weight"] = torch.zeros(3)
    torch.save(published, tmp_path / "extra.pth")
    from fbclip_edge import import_official

    with pytest.raises(FBClipError, match="mystery_head.weight"):
        import_official(clip_weights, tmp_path / "extra.pth")


def test_cli_prints_error_without_traceback(tmp_path):
    result = runner.invoke(
        app,
        [
            "import-official",
            "--clip-weights",
            str(tmp_path / "a.pt"),
            "--checkpoint",
            str(tmp_path / "b.pth"),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 1
    assert "error: checkpoint not found" in result.output
    assert "Traceback" not in result.output


def test_fixture_files_are_untouched_by_import(tmp_path, fixture_dir):
    copy = tmp_path / "fixture"
    shutil.copytree(fixture_dir, copy)
    before = {p.name: p.stat().st_size for p in Path(copy).iterdir()}
    from fbclip_edge import import_official

    import_official(
        copy / "clip_openai_state_dict.pt", copy / "fbclip_checkpoint.pth", tmp_path / "m"
    )
    assert {p.name: p.stat().st_size for p in Path(copy).iterdir()} == before


def test_load_skips_random_init_but_computes_unsaved_buffers(tmp_path):
    from fbclip_edge.methods.fbclip import FBCLIP

    model = create_model("tiny", image_size=56, seed=3)
    save_model(model, tmp_path / "m")
    loaded = load(tmp_path / "m")
    fresh = FBCLIP(model.config)  # built the ordinary way
    saved = set(model.state_dict())
    unsaved = {n: b for n, b in fresh.named_buffers() if n not in saved}
    assert unsaved, "the model has no unsaved buffers to check"
    loaded_buffers = dict(loaded.named_buffers())
    for name, buffer in unsaved.items():
        assert torch.equal(loaded_buffers[name], buffer), name
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_skip_weight_init_is_scoped_and_thread_local():
    import threading

    from fbclip_edge.checkpoint import skip_weight_init

    zeros = torch.zeros(4, 4)
    with skip_weight_init():
        torch.nn.init.normal_(zeros)
        torch.nn.init.kaiming_uniform_(zeros)
        torch.nn.init.trunc_normal_(zeros)
        zeros.uniform_()
        assert torch.count_nonzero(zeros) == 0
        # other ops, the ones masks and tokens are built with, still run
        mask = torch.empty(3, 3).fill_(float("-inf")).triu_(1)
        assert torch.isinf(mask).sum() == 3 and mask[1, 0] == 0
        other = torch.zeros(4, 4)
        thread = threading.Thread(target=torch.nn.init.normal_, args=(other,))
        thread.start()
        thread.join()
        assert torch.count_nonzero(other) > 0  # another thread initializes as usual
    torch.nn.init.normal_(zeros)
    assert torch.count_nonzero(zeros) > 0
