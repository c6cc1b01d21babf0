"""Training: frozen CLIP, learned heads, checkpoint folders, exact resume, errors."""

from __future__ import annotations

import json

import pytest
import torch

from fbclip_edge import create_model, load
from fbclip_edge.data import make_synthetic
from fbclip_edge.errors import FBClipError
from fbclip_edge.methods.fbclip.losses import fbclip_losses
from fbclip_edge.train import (
    STATE_FILE,
    TrainConfig,
    _build_run,
    read_train_state,
    resume_config,
    train,
    trainable_parameters,
    training_step,
)

SIZE = 112


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are latency-bound: with 2 threads on a loaded 2-core runner, OpenMP
    spinning made steps 10-100x slower, so these tests run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train") / "data"
    names = make_synthetic(root, categories=3, images=4, size=SIZE, seed=1)
    return root, names


def _config(data, out, **overrides) -> TrainConfig:
    root, names = data
    settings = dict(
        data=root,
        out=out,
        backbone="tiny",
        image_size=SIZE,
        epochs=1,
        batch_size=2,
        max_steps=2,
        exclude=(names[2],),
        progress=False,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def _heads(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("clip.")}


def test_only_the_heads_are_trainable():
    model = create_model("tiny", image_size=SIZE)
    names = [n for n, _ in trainable_parameters(model)]
    assert names and not any(n.startswith("clip.") for n in names)
    for part in ("prompt_learner.ctx_pos", "text_fusion.", "fb_attention.", "scale_weights"):
        assert any(n.startswith(part) for n in names), part
    assert all(not p.requires_grad for p in model.clip.parameters())


def test_training_step_matches_the_losses_and_grads_reach_only_the_heads():
    model = create_model("tiny", image_size=SIZE).train()
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, SIZE, SIZE)
    masks = torch.zeros(2, SIZE, SIZE)
    masks[1, 30:60, 40:70] = 1
    labels = torch.tensor([0.0, 1.0])
    terms = training_step(model, pixels, masks, labels)
    output = model(pixels, return_maps=True)
    expected = fbclip_losses(
        output.image_score,
        output.patch_map,
        output.maps[:, -1],
        model.text_features,
        labels,
        masks,
    )
    assert terms.total.item() == pytest.approx(expected.total.item(), rel=1e-6)
    terms.total.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {n for n, _ in trainable_parameters(model)}


def test_train_writes_epoch_folders_keeps_clip_frozen_and_learns(data, tmp_path):
    out = tmp_path / "run"
    result = train(_config(data, out))
    folder = out / "epoch-001"
    assert result.checkpoints == [folder]
    assert (out / "last").resolve() == folder.resolve()
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", STATE_FILE}

    initial = create_model("tiny", image_size=SIZE, seed=42).state_dict()
    trained = load(out / "last")
    state = trained.state_dict()
    for key, value in initial.items():
        if key.startswith("clip."):
            assert torch.equal(value, state[key]), key
    changed = [
        k
        for k, v in _heads(initial).items()
        if k != "text_features_frozen" and not torch.equal(v, state[k])
    ]
    assert "scale_weights" in changed and any(k.startswith("fb_attention.") for k in changed)
    assert any(k.startswith("prompt_learner.") for k in changed)
    # The saved text features come from the trained prompts, not the initial ones.
    assert torch.allclose(trained.text_features_frozen, trained.encode_text(), atol=1e-6)

    meta = json.loads((folder / "config.json").read_text())
    names = data[1]
    assert meta["source"]["kind"] == "trained"
    assert meta["source"]["epoch"] == 1
    assert meta["source"]["categories"] == sorted(names[:2])
    assert meta["source"]["excluded"] == [names[2]]
    history = json.loads((out / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1]
    assert set(history["epochs"][0]["losses"]) == {
        "focal_image",
        "focal_pixel",
        "dice",
        "scr",
        "total",
    }
    assert history["epochs"][0]["steps"] == 2 and history["epochs"][0]["images"] == 4


def test_resume_continues_exactly_like_an_uninterrupted_run(data, tmp_path):
    straight = train(_config(data, tmp_path / "straight", epochs=2, max_steps=1))
    train(_config(data, tmp_path / "split", epochs=1, max_steps=1))
    first = tmp_path / "split" / "epoch-001"

    # The restored run carries the saved optimizer state, step and epoch.
    saved = read_train_state(first)
    run = _build_run(resume_config(first, epochs=2), torch.device("cpu"), torch.float32)
    assert run.epoch == 1 and run.global_step == 1
    restored = run.optimizer.state_dict()
    for index, values in saved["optimizer"]["state"].items():
        for key, value in values.items():
            assert torch.equal(restored["state"][index][key], value), (index, key)

    resumed = train(resume_config(first, epochs=2, out=tmp_path / "resumed"))
    assert [e.epoch for e in resumed.history] == [1, 2]
    assert resumed.checkpoints == [tmp_path / "resumed" / "epoch-002"]
    a = load(straight.checkpoints[-1]).state_dict()
    b = load(resumed.checkpoints[-1]).state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    state_a = read_train_state(straight.checkpoints[-1])["optimizer"]["state"]
    state_b = read_train_state(resumed.checkpoints[-1])["optimizer"]["state"]
    for index in state_a:
        for key in state_a[index]:
            assert torch.equal(state_a[index][key], state_b[index][key])
    history = json.loads((tmp_path / "resumed" / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2]


def test_resume_errors(data, tmp_path):
    with pytest.raises(FBClipError, match="no train_state.pt"):
        train(_config(data, tmp_path / "x", resume=tmp_path))
    train(_config(data, tmp_path / "done", max_steps=1))
    with pytest.raises(FBClipError, match="raise --epochs"):
        train(resume_config(tmp_path / "done" / "last", epochs=1))
    (tmp_path / "done" / "last" / STATE_FILE).write_bytes(b"truncated")
    with pytest.raises(FBClipError, match="truncated"):
        read_train_state(tmp_path / "done" / "last")


def test_config_errors(data, tmp_path):
    with pytest.raises(FBClipError, match="--epochs"):
        _config(data, tmp_path, epochs=0)
    with pytest.raises(FBClipError, match="--precision"):
        _config(data, tmp_path, precision="int8")
    if not torch.cuda.is_available():
        with pytest.raises(FBClipError, match="needs a CUDA GPU"):
            train(_config(data, tmp_path / "bf16", precision="bf16", device="cpu"))
    with pytest.raises(FBClipError, match="not in"):
        train(_config(data, tmp_path / "bad", categories=("nope",)))
