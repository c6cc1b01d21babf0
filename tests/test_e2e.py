"""End to end on CPU: make-synthetic -> train (two categories) -> eval (the held-out one)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from fbclip_edge.cli import app
from fbclip_edge.eval import EvalConfig, run_eval, write_report
from fbclip_edge.metrics import METRIC_KEYS
from fbclip_edge.train import TrainConfig, train

SIZE = 224
CATEGORIES = ("wood", "capsule", "carpet")  # the first three synthetic families
HELD_OUT = "carpet"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Single-threaded: a loaded 2-core runner makes OpenMP spin (see test_train.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _check_report(path) -> dict:
    data = json.loads(path.read_text())
    assert list(data["categories"]) == [HELD_OUT]
    for metrics in (data["mean"], data["categories"][HELD_OUT]["metrics"]):
        assert set(metrics) == set(METRIC_KEYS)
        # Every synthetic test set has good and defective images, so nothing is undefined.
        assert all(value is not None and 0.0 <= value <= 1.0 for value in metrics.values())
    assert data["backend"]["name"] == "torch"
    assert data["model"]["source"]["kind"] == "trained"
    assert HELD_OUT not in data["model"]["source"]["categories"]
    assert path.with_suffix(".md").is_file()
    return data


def _make_synthetic(root) -> None:
    result = CliRunner().invoke(
        app, ["make-synthetic", str(root), "--categories", "3", "--images", "4", "--size", "224"]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(CATEGORIES)


def test_make_synthetic_train_eval(tmp_path):
    data = tmp_path / "data"
    _make_synthetic(data)
    result = train(
        TrainConfig(
            data=data,
            out=tmp_path / "run",
            backbone="tiny",
            image_size=SIZE,
            epochs=1,
            batch_size=2,
            max_steps=2,
            exclude=(HELD_OUT,),
            progress=False,
        )
    )
    assert result.global_step == 2
    assert all(math.isfinite(v) for v in result.history[0].losses.values())
    report = run_eval(
        EvalConfig(data=data, model=result.last, categories=(HELD_OUT,), progress=False)
    )
    json_path, _ = write_report(report, tmp_path / "eval.json")
    _check_report(json_path)


def test_command_line(tmp_path):
    commands = {command.name for command in app.registered_commands}
    if not {"train", "eval"} <= commands:
        pytest.skip("train/eval are not wired into fbclip_edge.cli yet")
    data = tmp_path / "data"
    _make_synthetic(data)
    runner = CliRunner()
    trained = runner.invoke(
        app,
        [
            "train", "--data", str(data), "--out", str(tmp_path / "run"),
            "--backbone", "tiny", "--image-size", str(SIZE), "--epochs", "1",
            "--batch-size", "2", "--max-steps", "1", "--exclude", HELD_OUT, "--no-progress",
        ],
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    evaluated = runner.invoke(
        app,
        [
            "eval", "--model", str(tmp_path / "run" / "last"), "--data", str(data),
            "--categories", HELD_OUT, "--backend", "torch", "--out", str(tmp_path / "eval.json"),
            "--no-progress",
        ],
    )  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    assert "mean" in evaluated.output
    _check_report(tmp_path / "eval.json")
    missing = runner.invoke(app, ["eval", "--data", str(data)])
    assert missing.exit_code == 1 and "exactly one of --model" in missing.output
