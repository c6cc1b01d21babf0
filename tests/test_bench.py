"""`fbclip-edge bench`: a short CPU run writes every documented field, a PNG plot, skip
reasons, and speedups against the eager float32 row of the same run."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import torch

from fbclip_edge.bench import backends as bench_backends
from fbclip_edge.bench import harness
from fbclip_edge.bench.backends import ALL_BACKENDS, BASELINE, BenchBackend
from fbclip_edge.bench.device import (
    PowerSampler,
    describe_device,
    device_label,
    measure_matmul_ceiling,
    parse_tegrastats_line,
)
from fbclip_edge.bench.harness import BenchConfig, run_bench, stage_stats
from fbclip_edge.bench.report import markdown, write_results
from fbclip_edge.errors import FBClipError
from fbclip_edge.runtime import TorchBackend

README = Path(__file__).resolve().parents[1] / "benchmarks" / "README.md"
FAKE = "onnxruntime-cpu"  # stands in for an exported backend that scores inside run()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are latency-bound: on a loaded 2-core runner two OpenMP threads spin
    against each other, so these tests run single-threaded (the bench records the count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def short_config(**overrides) -> BenchConfig:
    settings = dict(
        image_size=28,
        batches=(1, 2),
        warmup=1,
        iters=4,
        repeats=2,
        input_sets=2,
        frame_size=(24, 32),
        command="pytest short bench",
    )
    settings.update(overrides)
    return BenchConfig(**settings)


def fused_torch_backend(name: str, model) -> BenchBackend:
    """A backend whose run() does network and scoring in one call, like onnxruntime's."""
    backend = TorchBackend(model, device="cpu")
    return BenchBackend(
        name,
        torch.device("cpu"),
        "fp32",
        backend.run,
        None,
        "auto",
        0.0,
        {"runtime": "torch (test stand-in)"},
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short run: the eager baseline plus a fused stand-in for an exported backend."""
    patch = pytest.MonkeyPatch()
    real_build = harness._build
    real_reason = bench_backends.skip_reason

    def build(name, model, artifacts):
        return (
            fused_torch_backend(name, model) if name == FAKE else real_build(name, model, artifacts)
        )

    patch.setattr(harness, "_build", build)
    patch.setattr(harness, "skip_reason", lambda n: None if n == FAKE else real_reason(n))
    try:
        results = run_bench(short_config(backends=(BASELINE, FAKE, "torch-fp16-sdpa")))
    finally:
        patch.undo()
    out = tmp_path_factory.mktemp("bench")
    files = write_results(results, out)
    return results, files


def documented_fields() -> list[str]:
    """Field paths listed in the schema block of benchmarks/README.md."""
    text = README.read_text()
    block = text.split("<!-- schema:start -->")[1].split("<!-- schema:end -->")[0]
    return [
        line.split()[0]
        for line in block.splitlines()
        if line.strip() and not line.startswith("```")
    ]


def lookup(data, path: str) -> list:
    """Values at a dotted path; 'x[]' walks every list element; None parents end the walk."""
    values = [data]
    for part in path.split("."):
        many = part.endswith("[]")
        key = part[:-2] if many else part
        found = []
        for value in values:
            if value is None:
                continue
            assert isinstance(value, dict) and key in value, f"{path}: '{key}' missing"
            item = value[key]
            found.extend(item if many else [item])
        values = found
    return values


def test_json_has_every_documented_field(run):
    results, files = run
    data = json.loads(files.json.read_text(), parse_constant=lambda c: pytest.fail(c))
    assert data["schema_version"] == harness.SCHEMA_VERSION == 2
    fields = documented_fields()
    assert len(fields) > 60
    for path in fields:
        lookup(data, path)
    assert data["measurements"] and data["ceilings"]
    documented_top = {path.split(".")[0].removesuffix("[]") for path in fields}
    assert set(data) == documented_top
    documented_rows = {p.split(".")[1] for p in fields if p.startswith("measurements[].")}
    assert set(data["measurements"][0]) == documented_rows


def test_plot_is_a_png(run):
    _, files = run
    assert files.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert files.plot.stat().st_size > 10_000


def test_every_backend_is_listed_and_skips_carry_reasons(run):
    results, _ = run
    names = [b.name for b in results.backends]
    assert sorted(names) == sorted({BASELINE, FAKE, "torch-fp16-sdpa"})
    for backend in results.backends:
        assert backend.status in ("ok", "skipped", "failed")
        if backend.status != "ok":
            assert backend.reason
    if not torch.cuda.is_available():
        fp16 = next(b for b in results.backends if b.name == "torch-fp16-sdpa")
        assert fp16.status == "skipped" and "needs CUDA" in fp16.reason
        assert "needs CUDA" in markdown(results)


def test_speedup_is_against_eager_fp32_of_the_same_run(run):
    results, _ = run
    for batch in (1, 2):
        base = results.measurement(BASELINE, batch)
        other = results.measurement(FAKE, batch)
        assert base is not None and other is not None
        assert base.speedup == pytest.approx(1.0)
        assert other.speedup == pytest.approx(other.pipeline.throughput / base.pipeline.throughput)
        assert other.model_speedup == pytest.approx(other.model_throughput / base.model_throughput)


def test_stages_and_derived_numbers(run):
    results, _ = run
    base = results.measurement(BASELINE, 2)
    fused = results.measurement(FAKE, 2)
    assert set(base.stages) == {"preprocess", "network", "scoring", "map"}
    assert base.stages["scoring"] is not None and fused.stages["scoring"] is None
    assert base.pipeline.iterations == 4 and len(base.pipeline.samples_ms) == 4
    stage_sum = sum(s.p50_ms for s in base.stages.values() if s is not None)
    assert 0 < stage_sum <= base.pipeline.max_ms * 4
    assert base.pipeline.throughput_min <= base.pipeline.throughput <= base.pipeline.throughput_max
    flops = results.model_info("fbclip").flops_total
    assert base.achieved_tflops == pytest.approx(flops * 2 / (base.model_p50_ms / 1e3) / 1e12)
    ceiling = results.ceilings[0]
    assert ceiling.dtype == "float32" and ceiling.tflops > 0
    assert base.ceiling_percent == pytest.approx(100 * base.achieved_tflops / ceiling.tflops)
    assert base.host_rss_peak_bytes and base.host_rss_peak_bytes > 0
    assert results.command == "pytest short bench"


def test_markdown_has_command_tables_and_device(run):
    results, files = run
    text = files.markdown.read_text()
    assert "`pytest short bench`" in text
    assert results.device.cpu_model in text
    assert "| torch-eager-fp32 | 1 |" in text
    assert "in network" in text  # fused backend: scoring not timed apart


@pytest.mark.slow
def test_real_onnxruntime_export_against_eager():
    """The integration path: export the measured model, open it with runtime.open, time it."""
    reason = bench_backends.skip_reason("onnxruntime-cpu")
    if reason:
        pytest.skip(reason)
    results = run_bench(
        short_config(backends=("onnxruntime-cpu",), iters=2, warmup=1, measure_ceiling=False)
    )
    status = {b.name: (b.status, b.reason) for b in results.backends}
    assert status == {BASELINE: ("ok", None), "onnxruntime-cpu": ("ok", None)}
    ort = next(b for b in results.backends if b.name == "onnxruntime-cpu")
    assert ort.details["provider"] == "cpu" and ort.precision == "fp32"
    row = results.measurement("onnxruntime-cpu", 2)
    assert row.stages["scoring"] is not None  # vision graph + kernel: scoring timed apart
    base = results.measurement(BASELINE, 2)
    assert row.speedup == pytest.approx(row.pipeline.throughput / base.pipeline.throughput)
    assert any("exported for this run" in note for note in results.notes)
    assert any("added: every speedup" in note for note in results.notes)


def test_failed_backend_is_reported_not_dropped(monkeypatch, tmp_path):
    def broken(name, model, artifacts):
        raise RuntimeError("provider crashed\nsecond line")

    monkeypatch.setattr(harness, "_build", broken)
    results = run_bench(
        short_config(batches=(1,), iters=1, measure_ceiling=False, backends=(BASELINE,))
    )
    (backend,) = results.backends
    assert backend.status == "failed"
    assert backend.reason == "RuntimeError: provider crashed"
    assert results.measurements == []
    files = write_results(results, tmp_path)  # nothing measured: still a report and a plot
    assert "provider crashed" in files.markdown.read_text()
    assert files.plot.read_bytes()[:4] == b"\x89PNG"


def test_unknown_backend_and_bad_settings_are_one_line_errors():
    with pytest.raises(FBClipError, match="choose from"):
        run_bench(short_config(backends=("torch-eager-fp64",)))
    with pytest.raises(FBClipError, match="--batch"):
        run_bench(short_config(batches=(0,)))


def test_default_backend_list_names_a_reason_for_everything_left_out():
    chosen, skipped = bench_backends.default_backends()
    assert BASELINE in chosen
    assert sorted(chosen + list(skipped)) == sorted(ALL_BACKENDS)
    assert all(skipped.values())
    if not torch.cuda.is_available():
        assert "torch-fp16-sdpa" in skipped and "torch-compile" in skipped


def test_stage_stats_percentiles_and_repeat_spread():
    stats = stage_stats([10.0, 10.0, 20.0, 20.0], batch=4, repeats=2)
    assert stats.p50_ms == pytest.approx(15.0)
    assert stats.throughput_max == pytest.approx(4 * 2 / 0.020)
    assert stats.throughput_min == pytest.approx(4 * 2 / 0.040)
    assert stats.iterations == 4


def test_add_speedups_uses_same_batch_baseline():
    def row(name, batch, ms):
        stats = stage_stats([ms], batch, 1)
        return harness.Measurement(
            name,
            batch,
            stats,
            {},
            ms,
            stats.throughput,
            None,
            None,
            0.0,
            None,
            None,
            None,
            None,
            None,
            "process",
            0.0,
        )

    rows = [
        row(BASELINE, 1, 10.0),
        row(BASELINE, 8, 40.0),
        row("x", 1, 5.0),
        row("x", 8, 10.0),
        row("y", 32, 1.0),
    ]
    harness.add_speedups(rows)
    assert [r.speedup for r in rows[:4]] == pytest.approx([1.0, 1.0, 2.0, 4.0])
    assert rows[4].speedup is None


def test_device_description_and_ceiling():
    info = describe_device()
    assert info.cpu_model and info.cpu_logical_cores >= 1
    assert info.versions["torch"] and re.fullmatch(r"[a-z0-9-]+", info.label)
    assert device_label(None, None, "AMD EPYC 7B13 Processor", 2) == "amd-epyc-7b13-2c"
    ceiling = measure_matmul_ceiling("cpu", torch.float32, size=128, min_seconds=0.01)
    assert ceiling.tflops > 0 and ceiling.iterations >= 3


def test_tegrastats_power_parsing():
    jp5 = "RAM 2/7MB CPU [1%@729] VDD_IN 5012mW/4980mW VDD_CPU_GPU_CV 900mW/880mW"
    assert parse_tegrastats_line(jp5) == {"VDD_IN": 5012.0, "VDD_CPU_GPU_CV": 900.0}
    jp4 = "RAM 1/3MB POM_5V_IN 3000/2950 POM_5V_GPU 400/380"
    assert parse_tegrastats_line(jp4) == {"POM_5V_IN": 3000.0, "POM_5V_GPU": 400.0}


def test_power_sampler_reads_a_tegrastats_stream(tmp_path, monkeypatch):
    fake = tmp_path / "tegrastats"
    fake.write_text(
        "#!/bin/sh\nwhile true; do echo 'RAM 1/2MB VDD_IN 4000mW/4000mW'; sleep 0.05; done\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    start = time.perf_counter()
    sampler = PowerSampler(interval_ms=50).start()
    assert sampler.active
    time.sleep(0.4)
    sampler.stop()
    assert not sampler.active and sampler.samples
    assert sampler.mean_mw(start, time.perf_counter()) == {"VDD_IN": 4000.0}
    assert sampler.mean_mw(0.0, start - 1) is None


def test_other_cpu_share_subtracts_this_process():
    from fbclip_edge.bench.device import CpuSnapshot, other_cpu_share

    cores = os.cpu_count() or 1
    start = CpuSnapshot(wall=0.0, machine_busy=10.0, process=1.0)
    end = CpuSnapshot(wall=1.0, machine_busy=10.0 + cores * 0.5 + 0.2, process=1.2)
    assert other_cpu_share(start, end) == pytest.approx(0.5)
    assert other_cpu_share(start, None) is None


def test_cli_argument_parsing():
    assert harness.parse_batches("1,8,32") == (1, 8, 32)
    assert harness.parse_backends(None) is None and harness.parse_backends("all") is None
    assert harness.parse_backends("torch-eager-fp32, tensorrt") == (BASELINE, "tensorrt")
    with pytest.raises(FBClipError, match="comma-separated"):
        harness.parse_batches("1,x")
    with pytest.raises(FBClipError, match="positive"):
        harness.parse_batches("0")
    with pytest.raises(FBClipError, match="choose from"):
        harness.parse_backends("tensorrt,onnx")


def _in_issue_setting(results, gpu_name="NVIDIA H100 80GB HBM3"):
    """The run's results relabelled as ViT-L-14-336 @ 518 on a GPU (targets' setting)."""
    from dataclasses import replace

    from fbclip_edge.bench.device import GpuInfo

    gpu = GpuInfo(0, gpu_name, 80 << 30, 132, "9.0")
    return replace(
        results,
        models=[replace(m, backbone="ViT-L-14-336", image_size=518) for m in results.models],
        device=replace(results.device, gpu=gpu),
    )


def test_targets_report_best_rows_without_verdict_outside_the_issue_setting(run):
    from fbclip_edge.bench.targets import check_targets

    results, files = run
    checks = check_targets(results)
    assert [c.goal for c in checks] == [">= 60%", "<= 5 ms", ">= 30x"]
    assert all(c.met is None for c in checks)  # tiny model on a CPU: no verdicts
    # no batch-32 row in the short run; batch-1 latency and speedup are the best rows
    assert checks[0].value is None and "no batch-32 row" in checks[0].where
    best_latency = min(m.pipeline.p50_ms for m in results.measurements if m.batch == 1)
    assert checks[1].value == best_latency
    best_speedup = max(m.speedup for m in results.measurements if m.speedup is not None)
    assert checks[2].value == best_speedup
    text = files.markdown.read_text()
    assert "## Targets (ViT-L-14-336 @ 518 on an H100)" in text
    assert "Verdicts do not apply to this run: the targets are for ViT-L-14-336 @ 518" in text


def test_target_verdicts_in_the_issue_setting(run):
    from dataclasses import replace

    from fbclip_edge.bench.report import markdown as results_markdown
    from fbclip_edge.bench.targets import check_targets

    results, _ = run
    fast = results.measurements[0]
    flops = results.model_info("fbclip").flops_total

    def row(batch, p50_ms, throughput, speedup, ceiling_tflops):
        pipeline = replace(fast.pipeline, p50_ms=p50_ms, throughput=throughput)
        return replace(
            fast,
            backend="tensorrt",
            batch=batch,
            pipeline=pipeline,
            speedup=speedup,
            ceiling_tflops=ceiling_tflops,
        )

    # 32-batch row at exactly 61% of a 1000 TFLOP/s ceiling; 4 ms at batch 1; 31x speedup
    throughput_61 = 0.61 * 1000e12 / flops
    rows = [row(32, 50.0, throughput_61, 31.0, 1000.0), row(1, 4.0, 250.0, 12.0, 1000.0)]
    good = _in_issue_setting(replace(results, measurements=rows))
    checks = check_targets(good)
    assert checks[0].value == pytest.approx(61.0)
    assert [c.met for c in checks] == [True, True, True]
    assert checks[0].where == "tensorrt, batch 32" and checks[1].where == "tensorrt, batch 1"
    slow_rows = [row(32, 50.0, throughput_61 / 2, 3.0, 1000.0), row(1, 6.5, 150.0, 2.0, 1000.0)]
    slow = _in_issue_setting(replace(results, measurements=slow_rows))
    assert [c.met for c in check_targets(slow)] == [False, False, False]
    assert "| not met |" in results_markdown(slow) and "| met |" in results_markdown(good)
    # another GPU: values shown, no verdicts
    other = _in_issue_setting(replace(results, measurements=rows), gpu_name="NVIDIA L4")
    assert [c.met for c in check_targets(other)] == [None, None, None]
    assert "the targets are for an H100" in results_markdown(other)


def test_baseline_is_retimed_and_its_drift_reported(run):
    results, files = run
    assert results.config["recheck_baseline"] is True
    assert set(results.baseline_drift) == {"fbclip"}
    assert set(results.baseline_drift["fbclip"]) == {"1", "2"}
    assert all(abs(value) < 10 for value in results.baseline_drift["fbclip"].values())
    # the re-timed pass adds no rows: one baseline row per batch, speedups against it
    assert [m.batch for m in results.measurements if m.backend == BASELINE] == [1, 2]
    assert any("timed again after the other backends" in note for note in results.notes)
    data = json.loads(files.json.read_text())
    assert data["baseline_drift"] == results.baseline_drift


def test_drift_marks_speedups_it_could_explain():
    def row(name, batch, speedup):
        stats = stage_stats([10.0], batch, 1)
        return harness.Measurement(
            name, batch, stats, {}, 10.0, stats.throughput, speedup, speedup, 0.0, None, None,
            None, None, None, "process", 0.0,
        )  # fmt: skip

    first = [row(BASELINE, 1, 1.0), row(BASELINE, 8, 1.0), row("x", 1, 1.05), row("y", 8, 1.5)]
    again = [row(BASELINE, 1, 1.0), row(BASELINE, 8, 1.0)]
    again[0].pipeline = stage_stats([10.0 / 1.08], 1, 1)  # 8% faster the second time
    drift = harness.baseline_drift(first, again)
    assert drift == {"1": pytest.approx(0.08), "8": 0.0}
    notes = harness.drift_notes(first, drift)
    assert "+8.0% at batch 1" in notes[0] and "+0.0% at batch 8" in notes[0]
    assert notes[1] == "INCONCLUSIVE (within the baseline's drift): x at batch 1 (1.05x)"
    assert harness.drift_notes(first, None) == []


def test_no_recheck_when_asked_or_alone():
    alone = run_bench(short_config(backends=(BASELINE,), batches=(1,), iters=2, repeats=1))
    assert alone.baseline_drift is None
    off = run_bench(
        short_config(backends=(BASELINE, "onnxruntime-cpu"), batches=(1,), iters=2, repeats=1,
                     recheck_baseline=False)
    )  # fmt: skip
    assert off.baseline_drift is None
    assert not any("timed again" in note for note in off.notes)


def test_terminal_report_shows_warnings(run):
    from dataclasses import replace

    from rich.console import Console

    from fbclip_edge.bench.report import terminal_report

    results, _ = run
    flagged = replace(results, notes=[*results.notes, "INCONCLUSIVE (within drift): x"])
    console = Console(width=160, record=True)
    console.print(terminal_report(flagged, 160))
    text = console.export_text()
    assert "INCONCLUSIVE (within drift): x" in text
    assert "torch-eager-fp32" in text and "timed again after" not in text


def test_gpu_session_script_parses_and_names_its_steps():
    import subprocess

    script = README.parent / "gpu-session.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    done = subprocess.run(
        ["bash", str(script), "nope"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    assert "use fetch, check, bench or wait" in done.stderr


def test_recorded_package_version_is_the_source_version():
    """An editable install keeps the metadata version it was installed with; benchmarks must
    name the code that ran."""
    from fbclip_edge.bench.device import package_versions
    from fbclip_edge.version import __version__

    assert package_versions()["fbclip_edge"] == __version__
