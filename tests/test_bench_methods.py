"""`fbclip-edge bench --method ...`: every registered method timed in one run, one table and
one plot, each method's speedups against its own eager baseline, folders decide the method."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from fbclip_edge.bench import harness
from fbclip_edge.bench.backends import BASELINE, BenchBackend
from fbclip_edge.bench.harness import BenchConfig, BenchResults, run_bench, stage_stats
from fbclip_edge.bench.report import (
    default_out_dir,
    recorded_runs_table,
    terminal_report,
    write_results,
)
from fbclip_edge.cli import app
from fbclip_edge.clip import backbone_config
from fbclip_edge.errors import FBClipError
from fbclip_edge.methods import METHODS, get_method
from fbclip_edge.runtime import TorchBackend

FAKE = "onnxruntime-cpu"  # an exported backend's slot, filled by a fused torch stand-in
SIZE = 28
REGISTERED = sorted(METHODS)
EVERY = sorted({*METHODS, "filo"})  # --method all: the registry and FiLo (tests/test_bench_filo.py)
RECORDED = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Single-threaded like tests/test_bench.py: tiny models on a loaded 2-core runner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides: object) -> BenchConfig:
    settings: dict = dict(
        image_size=SIZE,
        batches=(1,),
        warmup=1,
        iters=3,
        repeats=1,
        max_seconds=0.2,
        input_sets=1,
        frame_size=(24, 32),
        measure_ceiling=False,
        command="pytest methods bench",
    )
    settings.update(overrides)
    return BenchConfig(**settings)


def fused(name: str, model: torch.nn.Module) -> BenchBackend:
    """Network and scoring in one call, like an exported full graph."""
    backend = TorchBackend(model, device="cpu")
    return BenchBackend(name, torch.device("cpu"), "fp32", backend.run, None, "auto", 0.0, {})


@pytest.fixture
def stand_ins(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, bool]]:
    """FAKE runs as a fused torch backend; returns (backend, model's method, whether the
    artifacts that backend would export belong to that very model) for every build."""
    built: list[tuple[str, str, bool]] = []
    real_build = harness._build
    real_reason = harness.skip_reason

    def build(name: str, model: torch.nn.Module, artifacts: harness._Artifacts) -> BenchBackend:
        built.append((name, type(model).method, artifacts.model is model))
        return fused(name, model) if name == FAKE else real_build(name, model, artifacts)

    monkeypatch.setattr(harness, "_build", build)
    monkeypatch.setattr(harness, "skip_reason", lambda n: None if n == FAKE else real_reason(n))
    return built


@pytest.fixture
def twin(monkeypatch: pytest.MonkeyPatch) -> str:
    """A second registered method (FB-CLIP's model under another name), so the multi-method
    path is exercised whatever else is registered."""
    base = get_method("fbclip")
    model_cls = type("TwinModel", (base.model_cls,), {"method": "twin"})
    spec = dataclasses.replace(base, name="twin", title="Twin (test stand-in)", model_cls=model_cls)
    monkeypatch.setitem(METHODS, "twin", spec)
    return "twin"


@pytest.fixture(scope="module")
def every_method(tmp_path_factory: pytest.TempPathFactory) -> tuple[BenchResults, Path]:
    """One run of every registered method: eager baseline plus the fused stand-in."""
    patch = pytest.MonkeyPatch()
    real_reason = harness.skip_reason
    real_build = harness._build
    patch.setattr(harness, "skip_reason", lambda n: None if n == FAKE else real_reason(n))
    patch.setattr(
        harness, "_build", lambda n, m, a: fused(n, m) if n == FAKE else real_build(n, m, a)
    )
    try:
        results = run_bench(tiny_config(methods=tuple(REGISTERED), backends=(BASELINE, FAKE)))
    finally:
        patch.undo()
    out = tmp_path_factory.mktemp("methods")
    write_results(results, out)
    return results, out


def test_registry_offers_fbclip_at_least():
    assert len(REGISTERED) >= 1 and "fbclip" in REGISTERED


@pytest.mark.parametrize("method", REGISTERED)
def test_each_method_has_rows_flops_and_its_own_speedups(every_method, method):
    results, _ = every_method
    assert results.methods == REGISTERED
    base = results.measurement(BASELINE, 1, method=method)
    other = results.measurement(FAKE, 1, method=method)
    assert base is not None and other is not None
    assert base.method == other.method == method
    assert base.speedup == pytest.approx(1.0)
    assert other.speedup == pytest.approx(other.pipeline.throughput / base.pipeline.throughput)
    assert other.model_speedup == pytest.approx(other.model_throughput / base.model_throughput)
    spec = get_method(method)
    flops = spec.flops(spec.new_config(backbone_config("tiny"), image_size=SIZE)).total
    info = results.model_info(method)
    assert info is not None and info.flops_total == flops and info.title == spec.title
    assert base.achieved_tflops == pytest.approx(flops / (base.model_p50_ms / 1e3) / 1e12)
    statuses = {b.name: b.status for b in results.backends if b.method == method}
    assert statuses == {BASELINE: "ok", FAKE: "ok"}
    assert set(results.baseline_drift[method]) == {"1"}


def test_one_table_one_plot_and_the_json(every_method):
    results, out = every_method
    text = (out / "results.md").read_text()
    assert text.count("## Throughput and latency") == 1
    assert "| method | backend | batch |" in text
    for method in REGISTERED:
        assert f"| {method} | {BASELINE} | 1 |" in text and f"| {method} | {FAKE} | 1 |" in text
    plot = (out / "results.png").read_bytes()
    assert plot[:8] == b"\x89PNG\r\n\x1a\n" and len(plot) > 10_000
    data = json.loads((out / "results.json").read_text())
    assert data["schema_version"] == 2 and data["config"]["methods"] == REGISTERED
    assert [m["method"] for m in data["models"]] == REGISTERED
    assert {(m["method"], m["backend"]) for m in data["measurements"]} == {
        (method, name) for method in REGISTERED for name in (BASELINE, FAKE)
    }
    console = Console(width=200, record=True)
    console.print(terminal_report(results, 200))
    shown = console.export_text()
    assert all(method in shown for method in REGISTERED)


def test_stand_in_pair_times_each_method_on_its_own_model(stand_ins, twin, tmp_path):
    results = run_bench(tiny_config(methods=("fbclip", twin), backends=(BASELINE, FAKE)))
    # each method's backends were built on that method's model, with its own artifacts
    assert stand_ins == [
        (BASELINE, "fbclip", True), (FAKE, "fbclip", True), (BASELINE, "fbclip", True),
        (BASELINE, twin, True), (FAKE, twin, True), (BASELINE, twin, True),
    ]  # fmt: skip
    assert [(b.method, b.name) for b in results.backends] == [
        ("fbclip", BASELINE),
        ("fbclip", FAKE),
        (twin, BASELINE),
        (twin, FAKE),
    ]
    for method in ("fbclip", twin):
        base = results.measurement(BASELINE, 1, method=method)
        assert base is not None and base.speedup == pytest.approx(1.0)
    assert set(results.baseline_drift) == {"fbclip", twin}
    drift_notes = [n for n in results.notes if "timed again" in n]
    assert len(drift_notes) == 2 and f"for {twin}:" in drift_notes[1]
    assert default_out_dir(results, tmp_path).name == f"tiny-{SIZE}-fbclip-twin"
    files = write_results(results, tmp_path)
    text = files.markdown.read_text()
    assert f"# fbclip-edge bench: fbclip, {twin}, tiny @ {SIZE} px" in text
    assert "Twin (test stand-in)" in text  # the models table
    assert "only the fbclip rows are checked" in text


def test_speedups_never_cross_methods():
    def row(method: str, name: str, ms: float) -> harness.Measurement:
        stats = stage_stats([ms], 1, 1)
        return harness.Measurement(
            name, 1, stats, {}, ms, stats.throughput, None, None, 0.0, None, None, None, None,
            None, "process", 0.0, method=method,
        )  # fmt: skip

    rows = [row("a", BASELINE, 10.0), row("a", "x", 5.0), row("b", BASELINE, 40.0),
            row("b", "x", 10.0), row("c", "x", 1.0)]  # fmt: skip
    harness.add_speedups(rows)
    assert [r.speedup for r in rows[:4]] == pytest.approx([1.0, 2.0, 1.0, 4.0])
    assert rows[4].speedup is None  # no baseline of its own method: no speedup


def test_parse_methods():
    assert harness.parse_methods(None) is None and harness.parse_methods(" ") is None
    assert harness.parse_methods("all") == tuple(EVERY)
    assert harness.parse_methods("FBCLIP, fbclip") == ("fbclip",)
    with pytest.raises(FBClipError, match="unknown method 'nope'"):
        harness.parse_methods("fbclip,nope")


@pytest.fixture(scope="module")
def fbclip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fbclip_edge.checkpoint import save_model
    from fbclip_edge.factory import create_model

    folder = tmp_path_factory.mktemp("folder") / "model"
    return save_model(create_model("tiny", image_size=SIZE), folder)


def test_a_folder_decides_the_method(fbclip_folder, twin):
    with pytest.raises(FBClipError, match="disagrees") as caught:
        run_bench(tiny_config(model=fbclip_folder, methods=("fbclip", twin)))
    message = str(caught.value)
    assert "\n" not in message and "drop --method or pass --method fbclip" in message
    with pytest.raises(FBClipError, match="needs a method"):
        run_bench(tiny_config(methods=()))


def test_cli_disagreeing_method_is_a_one_line_error(fbclip_folder, twin):
    done = CliRunner().invoke(app, ["bench", "--model", str(fbclip_folder), "--method", twin])
    assert done.exit_code == 1
    lines = [line for line in done.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "disagrees with" in lines[0] and "Traceback" not in done.output


def test_cli_times_every_method_in_one_run(tmp_path):
    args = ["bench", "--method", "all", "--image-size", str(SIZE), "--batch", "1", "--iters",
            "3", "--warmup", "1", "--repeats", "1", "--max-seconds", "0.2", "--backends",
            BASELINE, "--out", str(tmp_path)]  # fmt: skip
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    data = json.loads((tmp_path / "results.json").read_text())
    assert [m["method"] for m in data["models"]] == EVERY
    assert {m["method"] for m in data["measurements"]} == set(EVERY)
    assert (tmp_path / "results.png").stat().st_size > 0


def test_recorded_runs_table_reads_both_schema_versions(every_method, tmp_path):
    _, out = every_method
    run_dir = tmp_path / "dev-2026-01-01" / "tiny-28"
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text((out / "results.json").read_text())
    table = recorded_runs_table(tmp_path)
    assert all(f"| {method} tiny @ {SIZE} |" in table for method in REGISTERED)
    if any(RECORDED.glob("*/*/results.json")):  # schema 1 runs recorded before methods
        assert "| fbclip " in recorded_runs_table(RECORDED)


@pytest.mark.slow
def test_exported_backend_exports_each_methods_model(monkeypatch):
    """The real onnxruntime path: one export per method, each of that method's model."""
    reason = harness.skip_reason(FAKE)
    if reason:
        pytest.skip(reason)
    from fbclip_edge.artifacts.manifest import read_manifest

    exported: list[str] = []
    real_export = harness.export_for_bench

    def spy(model, model_dir, scratch, plan):  # noqa: ANN001, ANN202
        folder = real_export(model, model_dir, scratch, plan)
        exported.append(read_manifest(folder).method)
        return folder

    monkeypatch.setattr(harness, "export_for_bench", spy)
    results = run_bench(
        tiny_config(methods=tuple(REGISTERED), backends=(FAKE,), recheck_baseline=False)
    )
    assert exported == REGISTERED
    for method in REGISTERED:
        statuses = {b.name: (b.status, b.reason) for b in results.backends if b.method == method}
        assert statuses == {BASELINE: ("ok", None), FAKE: ("ok", None)}
        row = results.measurement(FAKE, 1, method=method)
        assert row is not None and row.speedup is not None
    assert sum("exported for this run" in note for note in results.notes) == len(REGISTERED)
