"""Interleaved A/B (`fbclip-edge bench-ab`): rounds alternate the backends, rotate the order,
and the report says how many rounds each one won."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fbclip_edge.bench.ab import ABConfig, ABResult, ab_markdown, check_backends, run_ab
from fbclip_edge.cli import app
from fbclip_edge.errors import FBClipError

pytest.importorskip("onnxruntime")


def test_rounds_alternate_and_rotate():
    config = ABConfig(("torch-eager-fp32", "onnxruntime-cpu"), "tiny", 28, rounds=3, repeats=1)
    result = run_ab(config)
    assert result.order == [
        ["torch-eager-fp32", "onnxruntime-cpu"],
        ["onnxruntime-cpu", "torch-eager-fp32"],
        ["torch-eager-fp32", "onnxruntime-cpu"],
    ]
    for times in result.seconds_per_image.values():
        assert len(times) == 3 and all(t > 0 for t in times)
    assert result.device["cpu_model"]


def test_report_counts_round_wins():
    config = ABConfig(("a", "b"), rounds=3)
    result = ABResult(config, {"a": [1.0, 1.0, 1.0], "b": [0.5, 2.0, 0.9]}, [], {})
    assert result.wins("b", "a") == 2
    table = ab_markdown(result)
    assert "| b | 2.000 | 0.500 | 1.111 | 1.111 | 2 of 3 |" in table


def test_backend_names_are_checked():
    with pytest.raises(FBClipError, match="two or more of torch-eager-fp32"):
        check_backends(("torch-eager-fp32",))
    with pytest.raises(FBClipError, match="got torch-eager-fp32, tensorrt"):
        check_backends(("torch-eager-fp32", "tensorrt"))


def test_cli_writes_json_and_markdown(tmp_path):
    args = ["bench-ab", "--backbone", "tiny", "--image-size", "28", "--rounds", "2",
            "--repeats", "1", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp_path / "ab.json").read_text())
    assert payload["config"]["rounds"] == 2 and set(payload["seconds_per_image"]) == {
        "torch-eager-fp32",
        "onnxruntime-cpu",
    }
    table = (tmp_path / "ab.md").read_text()
    assert "rounds faster than torch-eager-fp32" in table
    assert "Device: " in table and "logical cores, ISA" in table and "torch " in table
