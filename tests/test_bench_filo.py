"""`fbclip-edge bench --method filo`: FiLo rows beside the registered methods, with Grounding
DINO, vision, text, score and host timed apart from the pipeline's own clock.

The tiny backbone gets the fixture-sized Grounding DINO (bench/filo.py), so these run in
seconds; Grounding DINO still sees a 518-pixel input, which is most of each iteration."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from fbclip_edge.bench import filo as bench_filo
from fbclip_edge.bench import harness
from fbclip_edge.bench.backends import BASELINE
from fbclip_edge.bench.harness import BenchConfig, BenchResults, run_bench
from fbclip_edge.bench.report import markdown, stage_rows, terminal_report, write_results
from fbclip_edge.cli import app
from fbclip_edge.errors import FBClipError
from fbclip_edge.methods import METHODS

SIZE = 28
ORT = "onnxruntime-cpu"
STAGES = ("grounding", "vision", "text", "score", "host")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Single-threaded like tests/test_bench.py: tiny models on a loaded 2-core runner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides: object) -> BenchConfig:
    settings: dict = dict(
        methods=("filo",),
        image_size=SIZE,
        backends=(BASELINE,),
        batches=(1,),
        warmup=1,
        iters=3,
        repeats=1,
        max_seconds=0.1,
        input_sets=2,
        frame_size=(24, 32),
        measure_ceiling=False,
        command="pytest filo bench",
    )
    settings.update(overrides)
    return BenchConfig(**settings)


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[BenchResults, Path]:
    """The random FiLo on eager torch at batches 1 and 2."""
    results = run_bench(tiny_config(batches=(1, 2)))
    out = tmp_path_factory.mktemp("filo-bench")
    write_results(results, out)
    return results, out


def test_random_filo_has_the_benchs_backbone_and_a_grounding_dino(tmp_path):
    folder, source = bench_filo.random_filo(tiny_config(), tmp_path)
    assert folder.model.config.image_size == SIZE and folder.model.config.backbone.name == "tiny"
    assert folder.detector is not None and set(folder.table) == set(bench_filo.DESCRIPTIONS)
    assert all(5 <= len(d.descriptions) <= 8 for d in folder.table.values())
    text = folder.detector.model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers) == (32, 2)  # tiny: the fixture's size
    vocab = (tmp_path / "bert" / "vocab.txt").read_text().split()
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert {"cracked", "solder", "anomaly", "."} <= set(vocab)
    assert "random weights (seed 0)" in source and "tiny Grounding DINO" in source


def test_real_backbones_get_the_published_grounding_dino():
    from fbclip_edge.methods.filo.grounding import SWINT_OGC

    arch, bert, label = bench_filo.grounding_size("ViT-B-16")
    assert arch == SWINT_OGC and "SwinT_OGC" in label
    assert (bert.hidden, bert.layers, bert.heads) == (768, 12, 12)


def test_torch_rows_time_every_stage(torch_run):
    results, _ = torch_run
    assert results.methods == ["filo"]
    assert [(b.name, b.status) for b in results.backends] == [(BASELINE, "ok")]
    for batch in (1, 2):
        row = results.measurement(BASELINE, batch, method="filo")
        assert row is not None and row.speedup == pytest.approx(1.0)
        assert set(row.stages) == set(STAGES) and set(row.stages_ms) == set(STAGES)
        assert all(row.stages_ms[stage] > 0 for stage in STAGES)
        # stages run inside the timed call: per image they add up to at most the pipeline
        assert sum(row.stages_ms.values()) * batch <= row.pipeline.mean_ms
        networks = [row.stages[s].p50_ms for s in bench_filo.NETWORK_STAGES]
        assert 0 < row.model_p50_ms <= row.pipeline.max_ms and all(v > 0 for v in networks)
        assert 3 <= row.pipeline.iterations and row.host_rss_peak_bytes
    info = results.model_info("filo")
    assert info is not None and info.stage_flops is not None
    assert set(info.stage_flops) == set(bench_filo.NETWORK_STAGES)
    assert info.flops_total == sum(info.stage_flops.values()) > 0
    assert info.flops_backbone == info.stage_flops["vision"]
    assert any(note.startswith("filo rows:") for note in results.notes)


def test_reports_show_the_filo_stage_table(torch_run):
    results, out = torch_run
    text = (out / "results.md").read_text()
    assert "## FiLo stages (mean ms per image)" in text
    assert "| method | backend | batch | grounding | vision | text | score | host |" in text
    assert f"| filo | {BASELINE} | 1 |" in text and f"| filo | {BASELINE} | 2 |" in text
    assert stage_rows(results) == []  # no preprocess/network columns for FiLo rows
    assert "## Stages (p50 ms per batch)" not in text  # so no empty table either
    data = json.loads((out / "results.json").read_text())
    rows = data["measurements"]
    assert rows and all(set(r["stages_ms"]) == set(STAGES) for r in rows)
    assert set(data["models"][0]["stage_flops"]) == set(bench_filo.NETWORK_STAGES)
    console = Console(width=200, record=True)
    console.print(terminal_report(results, 200))
    shown = console.export_text()
    assert "FiLo stages (mean ms per image)" in shown and "grounding" in shown
    assert markdown(results).count("## FiLo stages") == 1


def test_other_methods_rows_carry_stages_ms_and_no_filo_table():
    results = run_bench(tiny_config(methods=("fbclip",), recheck_baseline=False))
    row = results.measurement(BASELINE, 1, method="fbclip")
    assert row is not None and row.stages_ms is not None
    assert set(row.stages_ms) == {"preprocess", "network", "scoring", "map"}
    assert "FiLo stages" not in markdown(results) and "## Stages (p50" in markdown(results)


def test_backends_filo_has_no_runtime_for_are_skipped_with_the_reason():
    names, reasons = bench_filo.split_backends(
        [BASELINE, "torch-compile", ORT, "openvino-cpu-fp32"], {"tensorrt": "needs a CUDA GPU"}
    )
    assert names == [BASELINE, ORT]
    assert reasons["tensorrt"] == "needs a CUDA GPU"
    assert "no torch-compile path" in reasons["torch-compile"]
    assert "no openvino-cpu-fp32 path" in reasons["openvino-cpu-fp32"]


def test_method_names():
    assert harness.parse_methods("all") == tuple(sorted({*METHODS, "filo"}))
    assert len(harness.parse_methods("all") or ()) == 3
    assert harness.parse_methods("FiLo,fbclip") == ("filo", "fbclip")
    with pytest.raises(FBClipError, match="use one of: anomalyclip, fbclip, filo"):
        harness.parse_methods("filo,nope")


@pytest.fixture(scope="module")
def filo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved FiLo model folder (tiny CLIP, tiny Grounding DINO) at 42 px."""
    from fbclip_edge.methods.filo import save_filo

    scratch = tmp_path_factory.mktemp("filo-folder")
    folder, _ = bench_filo.random_filo(tiny_config(image_size=42), scratch)
    assert folder.detector is not None
    return save_filo(
        scratch / "model", folder.model, scratch / "descriptions.json", folder.detector,
        scratch / "bert",
    )  # fmt: skip


def test_a_filo_model_folder_is_benched_as_filo(filo_folder):
    results = run_bench(tiny_config(model=filo_folder, image_size=None))
    info = results.model_info("filo")
    assert info is not None and info.image_size == 42
    assert info.source == f"FiLo model folder {filo_folder}"
    row = results.measurement(BASELINE, 1, method="filo")
    assert row is not None and all(row.stages_ms[s] > 0 for s in STAGES)
    assert harness.folder_methods(filo_folder, None) == [("filo", filo_folder)]


def test_a_filo_folder_refuses_other_methods_and_sizes(filo_folder):
    with pytest.raises(FBClipError, match="disagrees with .* holds a filo model"):
        run_bench(tiny_config(model=filo_folder, methods=("fbclip",), image_size=None))
    with pytest.raises(FBClipError, match="runs FiLo at 42 px; drop --image-size"):
        run_bench(tiny_config(model=filo_folder))


def _ort_reason() -> str | None:
    if importlib.util.find_spec("fbclip_edge.export.filo") is None:
        return "fbclip_edge.export.filo is not in this tree"
    return harness.skip_reason(ORT)


@pytest.mark.slow
def test_onnxruntime_row_runs_the_exported_graphs():
    reason = _ort_reason()
    if reason:
        pytest.skip(reason)
    results = run_bench(tiny_config(backends=(BASELINE, ORT), recheck_baseline=False))
    statuses = {b.name: (b.status, b.reason) for b in results.backends}
    assert statuses == {BASELINE: ("ok", None), ORT: ("ok", None)}
    row = results.measurement(ORT, 1, method="filo")
    assert row is not None and row.speedup is not None and row.speedup > 0
    assert all(row.stages_ms[s] > 0 for s in STAGES)
    assert sum(row.stages_ms.values()) <= row.pipeline.mean_ms
    backend = next(b for b in results.backends if b.name == ORT)
    assert backend.details["runtime"] == "onnxruntime" and backend.details["grounding"] == "on"
    assert any(note.startswith("filo: exported for this run") for note in results.notes)


@pytest.mark.slow
def test_filo_artifacts_are_benched_with_their_model_folder(filo_folder, tmp_path):
    reason = _ort_reason()
    if reason:
        pytest.skip(reason)
    from fbclip_edge.export.filo import export_filo
    from fbclip_edge.methods.filo import load_filo

    artifacts = tmp_path / "artifacts"
    export_filo(load_filo(filo_folder), artifacts, "fp32", (1, 1, 1), (40, 30), parity_count=1)
    assert harness.folder_methods(None, artifacts) == [("filo", artifacts)]
    config = tiny_config(artifacts=artifacts, image_size=None, backends=(BASELINE, ORT))
    results = run_bench(dataclasses.replace(config, recheck_baseline=False))
    statuses = {b.name: (b.status, b.reason) for b in results.backends}
    assert statuses == {BASELINE: ("ok", None), ORT: ("ok", None)}
    info = results.model_info("filo")
    assert info is not None and info.source.endswith(f"(from {artifacts})")
    # Grounding DINO's graph takes 40x30 frames: every FiLo row runs on frames of that size
    assert any(note.startswith("filo: 40x30 frames") for note in results.notes)
    assert f"filo: onnxruntime rows opened {artifacts}" in results.notes


def test_cli_all_methods_has_filo_rows(tmp_path):
    args = ["bench", "--method", "all", "--image-size", str(SIZE), "--batch", "1", "--iters",
            "3", "--warmup", "0", "--repeats", "1", "--max-seconds", "0.1", "--backends",
            BASELINE, "--no-recheck-baseline", "--out", str(tmp_path)]  # fmt: skip
    done = CliRunner().invoke(app, args, terminal_width=200)
    assert done.exit_code == 0, done.output
    data = json.loads((tmp_path / "results.json").read_text())
    assert [m["method"] for m in data["models"]] == ["anomalyclip", "fbclip", "filo"]
    assert {m["method"] for m in data["measurements"]} == {"anomalyclip", "fbclip", "filo"}
    assert "FiLo stages" in done.output and "FiLo stages" in (tmp_path / "results.md").read_text()
