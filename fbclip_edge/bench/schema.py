"""The bench's data: its config and what results.json holds (schema in benchmarks/README.md).

Kept apart from harness.py (orchestration) and timing.py (how a row is measured) so that
every module that makes or reads rows, bench/filo.py and the --isolate child included,
imports the same types without importing the runner.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fbclip_edge.bench.device import DeviceInfo, MatmulCeiling

SCHEMA_VERSION = 2
DEFAULT_METHODS = ("fbclip",)
STAGES = ("preprocess", "network", "scoring", "map")
#: Measurement.host_rss_peak_scope of a row timed in its own --isolate child process.
OWN_PROCESS = "own process"
#: BenchConfig fields that are paths (strings in JSON).
_PATH_FIELDS = ("model", "artifacts")


@dataclass
class BenchConfig:
    """What to measure. The defaults finish in well under two minutes on a 2-core laptop CPU.

    model / artifacts: a model folder and/or an exported artifacts folder; with neither, a
    random-weight `backbone` model (timings do not depend on the weights' values).
    methods: registry names (fbclip_edge.methods) timed one after another in the same run,
    each on its own model of the same backbone, size and seed; with a folder, exactly the
    method it holds.
    image_size: network input side (default: the model folder's, else 224).
    backends: names from ALL_BACKENDS; None runs every backend available here.
    iters: timed iterations per backend and batch, split into `repeats` contiguous groups
    whose throughputs give the min/median/max spread. max_seconds: stop timing a backend
    and batch after this long (at least 3 iterations still run); None times all `iters`.
    input_sets: distinct frame batches cycled through so no cache sees the same input twice
    in a row. frame_size: (height, width) of the synthetic uint8 camera frames.
    preprocess: 'cpu' (PIL bicubic, the reference), 'gpu' (torch bicubic with antialias on
    the backend's CUDA device) or 'auto' (gpu for CUDA backends, cpu otherwise).
    recheck_baseline: time the eager baseline again after every other backend; the change
    (`baseline_drift`) is how far the machine itself moved while the others were timed.
    isolate: time each exported backend (all its batches) in a child process of its own that
    loads only its runtime and the artifacts, so its host RSS peak is its own (OWN_PROCESS),
    not the bench's with the eager baseline's torch model in it; off: every row in this
    process, as before.
    """

    model: Path | None = None
    artifacts: Path | None = None
    methods: tuple[str, ...] = DEFAULT_METHODS
    backbone: str = "tiny"
    image_size: int | None = None
    backends: tuple[str, ...] | None = None
    batches: tuple[int, ...] = (1, 8)
    warmup: int = 2
    iters: int = 10
    repeats: int = 5
    max_seconds: float | None = 8.0
    input_sets: int = 3
    frame_size: tuple[int, int] = (480, 640)
    preprocess: str = "auto"
    sigma: float = 4.0
    seed: int = 0
    measure_ceiling: bool = True
    recheck_baseline: bool = True
    isolate: bool = False
    command: str | None = None


@dataclass
class StageStats:
    """Latency percentiles over iterations and throughput spread over repeats of one stage."""

    iterations: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    throughput: float
    throughput_min: float
    throughput_max: float
    samples_ms: list[float]


@dataclass
class Measurement:
    """One method's model on one backend at one batch size.

    pipeline: uint8 frames on the host -> image scores and full-size anomaly maps on the host.
    stages: preprocess, network, scoring (None when the backend scores inside its graph), map.
    model_*: network + scoring, the part FLOPs are counted for.
    speedup / model_speedup: throughput over the same method's torch-eager-fp32 at the same
    batch, same run (never across methods: they do different amounts of work).
    other_cpu_share: share of the machine's CPU other processes took while this was timed.
    stages_ms: mean ms per image of each stage (means add up to at most the pipeline's);
    FiLo rows' stages are grounding, vision, text, score and host (bench/filo.py).
    """

    backend: str
    batch: int
    pipeline: StageStats
    stages: dict[str, StageStats | None]
    model_p50_ms: float
    model_throughput: float
    speedup: float | None
    model_speedup: float | None
    achieved_tflops: float
    ceiling_tflops: float | None
    ceiling_percent: float | None
    gpu_peak_allocated_bytes: int | None
    gpu_used_bytes: int | None
    host_rss_peak_bytes: int | None
    host_rss_peak_scope: str
    warmup_seconds: float
    other_cpu_share: float | None = None
    power_mw: dict[str, float] | None = None
    method: str = "fbclip"
    stages_ms: dict[str, float] | None = None


@dataclass
class BackendResult:
    """A backend's fate for one method in this run: ok, skipped (with the reason) or failed
    (with the error)."""

    name: str
    status: str
    reason: str | None = None
    device: str | None = None
    precision: str | None = None
    kernel_impl: str | None = None
    setup_seconds: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    batch_failures: dict[str, str] = field(default_factory=dict)
    method: str = "fbclip"


@dataclass
class ModelInfo:
    """One method's network as measured; FLOPs per image are the method's analytic count
    (MethodSpec.flops), so TFLOP/s compare fairly across methods."""

    method: str
    title: str
    source: str
    backbone: str
    image_size: int
    feature_layers: list[int]
    num_maps: int
    flops_backbone: int
    flops_heads: int
    flops_total: int
    stage_flops: dict[str, int] | None = None  # FiLo: per network, counted on one frame


@dataclass
class BenchResults:
    """A whole run; `results.json` is asdict() of this (schema in benchmarks/README.md)."""

    schema_version: int
    command: str
    started_at: str
    duration_seconds: float
    config: dict[str, Any]
    models: list[ModelInfo]
    device: DeviceInfo
    ceilings: list[MatmulCeiling]
    backends: list[BackendResult]
    measurements: list[Measurement]
    notes: list[str]
    load_average_at_end: tuple[float, float, float] | None = None
    baseline_drift: dict[str, dict[str, float]] | None = None

    @property
    def methods(self) -> list[str]:
        """The methods of this run, in the order they were timed."""
        return [info.method for info in self.models]

    def model_info(self, method: str) -> ModelInfo | None:
        """The measured network of `method`, if the run timed it."""
        return next((info for info in self.models if info.method == method), None)

    def measurement(
        self, backend: str, batch: int, method: str | None = None
    ) -> Measurement | None:
        """The row for method's backend at batch (method None: the run's first method)."""
        wanted = method or (self.models[0].method if self.models else None)
        for row in self.measurements:
            if row.method == wanted and row.backend == backend and row.batch == batch:
                return row
        return None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)


@dataclass
class MethodOutcome:
    """What timing one method produced, merged into the run's results."""

    info: ModelInfo
    backends: list[BackendResult]
    measurements: list[Measurement]
    drift: dict[str, float] | None
    export_note: str | None
    notes: list[str] = field(default_factory=list)


def config_dict(config: BenchConfig) -> dict[str, Any]:
    """The config as plain JSON (folders as strings): results.json's `config`."""
    data = asdict(config)
    for key in _PATH_FIELDS:
        data[key] = None if data[key] is None else str(data[key])
    return data


def config_from_dict(data: dict[str, Any]) -> BenchConfig:
    """config_dict() read back (lists to tuples, strings to folders): how an --isolate child
    gets the settings of the run that started it."""
    values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    for key in _PATH_FIELDS:
        values[key] = None if values.get(key) is None else Path(values[key])
    return BenchConfig(**values)


def measurement_from_dict(data: dict[str, Any]) -> Measurement:
    """asdict(Measurement) read back, stage statistics included (the --isolate child's rows)."""
    stages = {k: None if v is None else StageStats(**v) for k, v in data["stages"].items()}
    return Measurement(**{**data, "pipeline": StageStats(**data["pipeline"]), "stages": stages})
