"""`fbclip-edge bench --isolate`: exported backends timed in a child process of their own give
the same rows as in process, with the child's own RSS peak, and a child that fails is its
backend's one-line reason, never the run's end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from fbclip_edge.bench import isolate
from fbclip_edge.bench.backends import BASELINE, export_for_bench, export_plan, skip_reason
from fbclip_edge.bench.harness import BenchConfig, BenchResults, run_bench
from fbclip_edge.bench.isolate import PROGRESS, ChildSpec, crash_reason, run_child
from fbclip_edge.bench.schema import OWN_PROCESS, config_dict, config_from_dict
from fbclip_edge.factory import create_model

ORT = "onnxruntime-cpu"
INT8 = "onnxruntime-cpu-int8"  # the fp32 export has no int8 graph: opening it raises


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Single-threaded like tests/test_bench.py (the child gets the same thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def short_config(artifacts: Path | None = None, **overrides) -> BenchConfig:
    settings = dict(
        artifacts=artifacts,
        image_size=28,
        backends=(BASELINE, ORT, INT8),
        batches=(1, 2),
        warmup=1,
        iters=3,
        repeats=1,
        input_sets=2,
        frame_size=(24, 32),
        measure_ceiling=False,
        recheck_baseline=False,
        command="pytest isolate",
    )
    settings.update(overrides)
    return BenchConfig(**settings)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    """One fp32 export of the tiny model at 28 px, shared by every run here."""
    for name in (ORT, INT8):
        if skip_reason(name):
            pytest.skip(skip_reason(name))
    model = create_model("tiny", image_size=28, seed=0)
    scratch = tmp_path_factory.mktemp("isolate")
    return export_for_bench(model, None, scratch, export_plan([ORT], (1, 2)))


@pytest.fixture(scope="module")
def both(artifacts) -> tuple[BenchResults, BenchResults, list[str]]:
    """(in process, isolated, the isolated run's progress lines) on the same artifacts."""
    in_process = run_bench(short_config(artifacts))
    said: list[str] = []
    isolated = run_bench(short_config(artifacts, isolate=True), log=said.append)
    return in_process, isolated, said


def status(results: BenchResults) -> dict[str, tuple[str, str | None]]:
    return {b.name: (b.status, b.reason) for b in results.backends}


@pytest.mark.slow
def test_isolate_gives_the_same_backends_and_rows(both):
    in_process, isolated, _ = both
    assert status(isolated) == status(in_process)
    assert status(isolated)[ORT] == ("ok", None)
    assert isolated.config["isolate"] is True and in_process.config["isolate"] is False
    keys = {(m.backend, m.batch) for m in in_process.measurements}
    assert (
        {(m.backend, m.batch) for m in isolated.measurements}
        == keys
        == {(name, batch) for name in (BASELINE, ORT) for batch in (1, 2)}
    )
    ort = next(b for b in isolated.backends if b.name == ORT)
    assert ort.device == "cpu" and ort.precision == "fp32" and ort.details["provider"] == "cpu"
    for row in isolated.measurements:
        assert row.pipeline.iterations == 3 and row.speedup is not None
        assert row.achieved_tflops > 0
        assert row.stages["scoring"] is not None  # the vision graph + kernel, timed apart


@pytest.mark.slow
def test_isolated_rows_report_the_childs_own_peak(both):
    in_process, isolated, said = both
    for row in isolated.measurements:
        if row.backend == ORT:
            assert row.host_rss_peak_scope == OWN_PROCESS
            assert row.host_rss_peak_bytes and row.host_rss_peak_bytes > 0
        else:
            assert row.host_rss_peak_scope in ("backend+batch", "process")
    assert all(row.host_rss_peak_scope != OWN_PROCESS for row in in_process.measurements)
    assert any("isolate: each exported backend ran in a child" in n for n in isolated.notes)
    assert not any(n.startswith("isolate:") for n in in_process.notes)
    for line in (f"fbclip {ORT}: preparing", f"fbclip {ORT}: batch 1", f"fbclip {ORT}: batch 2"):
        assert line in said


@pytest.mark.slow
def test_a_child_that_raises_is_the_rows_one_line_error(both):
    """INT8 on an fp32 export: runtime.open raises inside the child, as it does in process."""
    _, isolated, said = both
    state, reason = status(isolated)[INT8]
    assert state == "failed" and reason and "\n" not in reason
    assert f"fbclip {INT8}: failed ({reason})" in said


@pytest.mark.slow
def test_a_crashing_child_fails_its_backend_not_the_run(artifacts, monkeypatch):
    def crash(spec: Path, report: Path) -> list[str]:
        return [sys.executable, "-c", "raise MemoryError('no room for the arena')"]

    monkeypatch.setattr(isolate, "child_argv", crash)
    results = run_bench(
        short_config(artifacts, backends=(BASELINE, ORT), batches=(1,), isolate=True)
    )
    assert status(results)[ORT] == (
        "failed",
        "MemoryError: no room for the arena (--isolate child, exit status 1)",
    )
    assert [(m.backend, m.batch) for m in results.measurements] == [(BASELINE, 1)]


def spec() -> ChildSpec:
    return ChildSpec(ORT, "fbclip", "/nowhere", 28, config_dict(short_config()), 1)


def test_a_killed_child_is_named_with_its_signal_and_progress_still_comes(monkeypatch):
    script = f"import os, signal; print({PROGRESS + 'batch 1'!r}, flush=True); print('loading'); "
    script += "os.kill(os.getpid(), signal.SIGKILL)"
    monkeypatch.setattr(isolate, "child_argv", lambda *_: [sys.executable, "-c", script])
    said: list[str] = []
    report = run_child(spec(), said.append)
    assert said == ["batch 1"]
    assert report.opened is None and report.runs.rows == []
    assert report.error == (
        "--isolate child killed by SIGKILL (out of memory? the OOM killer sends it); "
        "last output: loading"
    )


def test_crash_reasons_are_one_line():
    assert crash_reason(3, []) == "--isolate child exited with status 3 without a report"
    assert crash_reason(1, ["Traceback", "ValueError: x"]) == (
        "ValueError: x (--isolate child, exit status 1)"
    )
    assert crash_reason(-15, []) == "--isolate child killed by SIGTERM"
    assert len(crash_reason(1, ["y" * 1000])) <= isolate.MAX_REASON


def test_the_child_gets_the_runs_config_back():
    config = short_config(Path("/tmp/artifacts"), isolate=True, max_seconds=None)
    assert config_from_dict(config_dict(config)) == config


def test_a_child_that_cannot_open_its_backend_reports_why(tmp_path):
    """The child's own side, in process: a missing artifacts folder is the report's error."""
    report = isolate.time_backend(spec(), lambda _message: None)
    assert report.opened is None and report.error and "\n" not in report.error
    path = tmp_path / "report.json"
    path.write_text(json.dumps(isolate.report_dict(report)))
    assert isolate.read_report(path).error == report.error
