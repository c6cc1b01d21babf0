"""How one row is measured: frames, the stage clock, the timing loop, statistics and memory.

Shared by the runner (harness.py), FiLo's rows (filo.py) and the --isolate child, so every
row is timed by the same code whichever process runs it.
"""

from __future__ import annotations

import contextlib
import gc
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from fbclip_edge.bench.backends import BASELINE
from fbclip_edge.bench.device import cpu_snapshot, other_cpu_share
from fbclip_edge.bench.schema import STAGES, Measurement, StageStats
from fbclip_edge.errors import FBClipError
from fbclip_edge.kernels import anomaly_map
from fbclip_edge.preprocess import preprocess, preprocess_tensor

if TYPE_CHECKING:
    from fbclip_edge.bench.backends import BenchBackend
    from fbclip_edge.bench.schema import BenchConfig


class PowerReader(Protocol):
    """What measure() asks of a power source: device.PowerSampler in the bench's process, a
    window log in an --isolate child (the parent, which samples, fills power in)."""

    def mean_mw(self, start: float, end: float) -> dict[str, float] | None:
        """Mean milliwatts per rail between two perf_counter times, or None."""
        ...


# ---------------------------------------------------------------- statistics


def stage_stats(samples_ms: Sequence[float], batch: int, repeats: int) -> StageStats:
    """Percentiles over iterations; throughput (images/s) per contiguous repeat group.

    Reported throughput is the median group's; min/max show how stable the machine was.
    """
    values = np.asarray(samples_ms, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no samples")
    groups = [g for g in np.array_split(values, max(1, min(repeats, values.size))) if g.size]
    rates = sorted(batch * g.size * 1e3 / g.sum() if g.sum() > 0 else float("inf") for g in groups)
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return StageStats(
        iterations=int(values.size),
        p50_ms=float(p50),
        p90_ms=float(p90),
        p99_ms=float(p99),
        mean_ms=float(values.mean()),
        min_ms=float(values.min()),
        max_ms=float(values.max()),
        throughput=float(np.median(rates)),
        throughput_min=float(rates[0]),
        throughput_max=float(rates[-1]),
        samples_ms=[round(float(v), 4) for v in values],
    )


def baseline_drift(first: list[Measurement], again: list[Measurement]) -> dict[str, float]:
    """Per batch: the re-timed baseline's pipeline throughput over the first one's, minus 1.

    Both passes bracket every other backend of the method in time, so this is how much the
    machine alone moved (clocks, neighbours on a shared host) while the others were measured.
    """
    before = {(m.method, m.batch): m for m in first if m.backend == BASELINE}
    drift = {}
    for row in again:
        base = before.get((row.method, row.batch))
        if base is not None:
            ratio = row.pipeline.throughput / base.pipeline.throughput
            drift[str(row.batch)] = round(ratio - 1.0, 4)
    return drift


# ---------------------------------------------------------------- memory


def _status_kib(key: str) -> int | None:
    with contextlib.suppress(OSError):
        match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        return int(match.group(1)) if match else None
    return None


def reset_host_peak() -> bool:
    """Reset the process's peak RSS (Linux clear_refs '5'); False where that is impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def host_rss_peak_bytes() -> int | None:
    """VmHWM from /proc, else ru_maxrss (kilobytes on Linux, bytes on macOS)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    with contextlib.suppress(ImportError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) if sys.platform == "darwin" else int(peak) * 1024
    return None


def release() -> None:
    """Free the backend that just went out of scope before the next one is built."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def one_line(error: BaseException) -> str:
    """'Type: first line' of an error: how a failed backend or batch reads in the results."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip().rstrip(":")


# ---------------------------------------------------------------- inputs and stages


def make_frames(config: BenchConfig, batch: int) -> list[np.ndarray]:
    """`input_sets` distinct (B, H, W, 3) uint8 frame batches: camera-sized, never repeated
    back to back, so caches (CPU or GPU) cannot flatter any stage."""
    rng = np.random.default_rng(config.seed + batch)
    height, width = config.frame_size
    return [
        rng.integers(0, 256, size=(batch, height, width, 3), dtype=np.uint8)
        for _ in range(max(1, config.input_sets))
    ]


def _preprocessor(
    kind: str, image_size: int, device: torch.device
) -> tuple[str, Callable[[Any], torch.Tensor], Callable[[np.ndarray], Any]]:
    """(resolved kind, stage function, how to hold frames on the host for it)."""
    use_gpu = kind == "gpu" or (kind == "auto" and device.type == "cuda")
    if use_gpu:
        if device.type != "cuda":
            raise FBClipError("--preprocess gpu needs a CUDA backend; use cpu or auto")

        def hold(frames: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(frames).pin_memory()

        return (
            "gpu",
            lambda frames: preprocess_tensor(frames.to(device, non_blocking=True), image_size),
            hold,
        )
    return "cpu", lambda frames: preprocess(frames, image_size), lambda frames: frames


class StageClock:
    """Stage boundaries: CUDA events on GPU (device time, no extra syncs), perf_counter on CPU.

    An event recorded on an idle stream completes at once, so host-side stages still read true.
    """

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.start_time = 0.0
        self.marks: list[Any] = []

    def start(self) -> None:
        """Begin an iteration."""
        self.marks = []
        self.start_time = time.perf_counter()
        self.mark()

    def mark(self) -> None:
        """End the current stage."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def finish(self) -> tuple[list[float], float]:
        """(stage durations in ms, wall-clock ms of the whole iteration)."""
        pairs = list(zip(self.marks, self.marks[1:], strict=False))
        if self.cuda:
            torch.cuda.synchronize()
            wall = (time.perf_counter() - self.start_time) * 1e3
            return [start.elapsed_time(end) for start, end in pairs], wall
        wall = (time.perf_counter() - self.start_time) * 1e3
        return [(end - start) * 1e3 for start, end in pairs], wall


@dataclass
class _Samples:
    pipeline: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})


def _iteration(
    backend: BenchBackend,
    pre: Callable[[Any], torch.Tensor],
    frames: Any,
    config: BenchConfig,
    clock: StageClock,
) -> tuple[dict[str, float], float]:
    """One uint8-frames -> host scores and maps pass, timed per stage."""
    clock.start()
    pixels = pre(frames)
    clock.mark()
    out = backend.network(pixels)
    clock.mark()
    if backend.scoring is not None:
        out = backend.scoring(out)
        clock.mark()
    image_score, patch_map = out
    maps = anomaly_map(patch_map, config.frame_size, config.sigma, impl=backend.kernel_impl)
    maps.cpu()
    image_score.cpu()
    clock.mark()
    durations, wall = clock.finish()
    names = [s for s in STAGES if s != "scoring" or backend.scoring is not None]
    return dict(zip(names, durations, strict=True)), wall


MIN_ITERATIONS = 3


def out_of_time(config: BenchConfig, done: int, elapsed: float) -> bool:
    """Stop early once max_seconds is spent, but never below MIN_ITERATIONS (or iters):
    slow backends get fewer samples instead of blowing the run's budget."""
    if config.max_seconds is None or done < min(config.iters, MIN_ITERATIONS):
        return False
    return elapsed > config.max_seconds


def measure(
    backend: BenchBackend,
    batch: int,
    config: BenchConfig,
    image_size: int,
    power: PowerReader,
    method: str,
) -> tuple[Measurement, str]:
    """Warm up, then time `config.iters` iterations of one backend at one batch size."""
    kind, pre, hold = _preprocessor(config.preprocess, image_size, backend.device)
    inputs = [hold(frames) for frames in make_frames(config, batch)]
    cuda = backend.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_scope = "backend+batch" if reset_host_peak() else "process"
    clock = StageClock(cuda)
    samples = _Samples()
    with torch.inference_mode():
        warm_start = time.perf_counter()
        for index in range(config.warmup):
            _iteration(backend, pre, inputs[index % len(inputs)], config, clock)
        warmup_seconds = time.perf_counter() - warm_start
        window_start = time.perf_counter()
        cpu_start = cpu_snapshot()
        for index in range(config.iters):
            stages, wall = _iteration(backend, pre, inputs[index % len(inputs)], config, clock)
            samples.pipeline.append(wall)
            for name, value in stages.items():
                samples.stages[name].append(value)
            if out_of_time(config, index + 1, time.perf_counter() - window_start):
                break
        window_end = time.perf_counter()
        cpu_end = cpu_snapshot()
    stats = {
        name: stage_stats(values, batch, config.repeats) if values else None
        for name, values in samples.stages.items()
    }
    network = samples.stages["network"]
    scoring = samples.stages["scoring"] or [0.0] * len(network)
    model_samples = [n + s for n, s in zip(network, scoring, strict=True)]
    model = stage_stats(model_samples, batch, config.repeats)
    gpu_peak = gpu_used = None
    if cuda:
        gpu_peak = int(torch.cuda.max_memory_allocated())
        free, total = torch.cuda.mem_get_info()
        gpu_used = int(total - free)
    row = Measurement(
        backend=backend.name,
        batch=batch,
        pipeline=stage_stats(samples.pipeline, batch, config.repeats),
        stages=stats,
        model_p50_ms=model.p50_ms,
        model_throughput=model.throughput,
        speedup=None,
        model_speedup=None,
        achieved_tflops=0.0,
        ceiling_tflops=None,
        ceiling_percent=None,
        gpu_peak_allocated_bytes=gpu_peak,
        gpu_used_bytes=gpu_used,
        host_rss_peak_bytes=host_rss_peak_bytes(),
        host_rss_peak_scope=rss_scope,
        warmup_seconds=warmup_seconds,
        other_cpu_share=other_cpu_share(cpu_start, cpu_end),
        power_mw=power.mean_mw(window_start, window_end),
        method=method,
        stages_ms={name: float(np.mean(v)) / batch for name, v in samples.stages.items() if v},
    )
    return row, kind


@dataclass
class BatchRuns:
    """One backend timed at every batch size: its rows, the batches that failed (batch ->
    one-line reason) and the preprocess kinds that ran."""

    rows: list[Measurement] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    kinds: set[str] = field(default_factory=set)


def measure_batches(
    backend: BenchBackend,
    config: BenchConfig,
    image_size: int,
    power: PowerReader,
    method: str,
    say: Callable[[str], None],
) -> BatchRuns:
    """measure() at each of config.batches in turn; a batch that fails (e.g. out of memory
    at the largest) becomes its reason and the next one still runs. The bench's process and
    the --isolate child both time through here, so their rows are measured alike."""
    runs = BatchRuns()
    for batch in config.batches:
        say(f"batch {batch}")
        try:
            row, kind = measure(backend, batch, config, image_size, power, method)
        except Exception as error:  # one batch must not end the backend
            runs.failures[str(batch)] = one_line(error)
            say(f"batch {batch} failed ({one_line(error)})")
            continue
        runs.kinds.add(kind)
        runs.rows.append(row)
    return runs
