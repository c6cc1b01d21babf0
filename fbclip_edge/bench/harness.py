"""The `fbclip-edge bench` runner: every backend timed the same way, stage by stage, in one run
so that speedups are quoted against an eager float32 baseline measured alongside them.

This module picks, builds and orders backends; the types live in schema.py and the timing
loop in timing.py, so bench/filo.py (imported from here, one way) shares them without a cycle.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fbclip_edge.bench.backends import (
    ALL_BACKENDS,
    BASELINE,
    EXPORTED_BACKENDS,
    build_exported_backend,
    build_torch_backend,
    default_backends,
    device_for,
    export_for_bench,
    export_plan,
    skip_reason,
)
from fbclip_edge.bench.device import (
    PowerSampler,
    describe_device,
    load_average,
    measure_matmul_ceiling,
)
from fbclip_edge.bench.isolate import ChildReport, ChildSpec, run_child
from fbclip_edge.bench.schema import (
    DEFAULT_METHODS,
    OWN_PROCESS,
    SCHEMA_VERSION,
    STAGES,
    BackendResult,
    BenchConfig,
    BenchResults,
    Measurement,
    MethodOutcome,
    ModelInfo,
    StageStats,
    config_dict,
)
from fbclip_edge.bench.timing import (
    BatchRuns,
    baseline_drift,
    measure_batches,
    one_line,
    release,
    stage_stats,
)
from fbclip_edge.errors import FBClipError
from fbclip_edge.methods import METHODS, get_method

if TYPE_CHECKING:
    from fbclip_edge.bench.backends import BenchBackend
    from fbclip_edge.bench.device import MatmulCeiling

__all__ = [  # the runner's API, and the types and helpers it re-exports from schema / timing
    "DEFAULT_METHODS",
    "FILO",
    "SCHEMA_VERSION",
    "STAGES",
    "BackendResult",
    "BenchConfig",
    "BenchResults",
    "BenchRun",
    "Measurement",
    "ModelInfo",
    "StageStats",
    "add_speedups",
    "baseline_drift",
    "bench_methods",
    "default_command",
    "drift_notes",
    "folder_methods",
    "method_name",
    "parse_backends",
    "parse_batches",
    "parse_methods",
    "resolve_methods",
    "run_bench",
    "stage_stats",
]

#: FiLo is timed by bench/filo.py: not a registered AnomalyModel (its text is per frame).
FILO = "filo"
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_batches(text: str) -> tuple[int, ...]:
    """'1,8,32' -> (1, 8, 32), or a one-line error naming the fix."""
    try:
        batches = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise FBClipError(
            f"--batch '{text}' must be comma-separated integers, e.g. 1,8,32"
        ) from None
    if not batches or min(batches) < 1:
        raise FBClipError(f"--batch '{text}' needs positive batch sizes, e.g. 1,8,32")
    return batches


def parse_methods(text: str | None) -> tuple[str, ...] | None:
    """'fbclip,anomalyclip' -> names; 'all' -> every registered one; None or '' -> None
    (the folder's method, else fbclip)."""
    if text is None or not text.strip():
        return None
    if text.strip().lower() == "all":
        return bench_methods()
    names = [method_name(part) for part in text.split(",") if part.strip()]
    return tuple(dict.fromkeys(names))


def bench_methods() -> tuple[str, ...]:
    """Every method the bench can time: the registered ones and FiLo."""
    return tuple(sorted({*METHODS, FILO}))


def method_name(text: str) -> str:
    """A registered method's name or 'filo', else a one-line error listing them all."""
    name = text.strip().lower()
    if name == FILO:
        return FILO
    if name not in METHODS:
        known = ", ".join(bench_methods())
        raise FBClipError(f"unknown method {text.strip()!r}; use one of: {known}")
    return get_method(name).name


def parse_backends(text: str | None) -> tuple[str, ...] | None:
    """'torch-eager-fp32,onnxruntime-cpu' -> names; None or 'all' -> every available one."""
    if text is None or text.strip().lower() in ("", "all", "auto"):
        return None
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in names if name not in ALL_BACKENDS]
    if unknown:
        raise FBClipError(
            f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(ALL_BACKENDS)}"
        )
    return names


def add_speedups(measurements: list[Measurement]) -> None:
    """Fill speedup columns from the same method's torch-eager-fp32 row at the same batch
    (None without it)."""
    baseline = {(m.method, m.batch): m for m in measurements if m.backend == BASELINE}
    for row in measurements:
        base = baseline.get((row.method, row.batch))
        if base is None:
            row.speedup = row.model_speedup = None
            continue
        row.speedup = row.pipeline.throughput / base.pipeline.throughput
        row.model_speedup = row.model_throughput / base.model_throughput


# ---------------------------------------------------------------- the run


def _model_from_artifacts(artifacts: Path, seed: int) -> tuple[Any, str]:
    """The torch model behind an artifacts folder, for the baseline: the model folder the
    manifest names when it is still there, else the same architecture with random weights
    (speed does not depend on the weights' values)."""
    from fbclip_edge.artifacts.manifest import read_manifest
    from fbclip_edge.checkpoint import load
    from fbclip_edge.methods import get_method

    manifest = read_manifest(artifacts)
    folder = Path(manifest.model.path) if manifest.model.path else None
    if folder is not None and folder.is_dir():
        return load(folder), f"model folder {folder} (from {artifacts})"
    torch.manual_seed(seed)
    spec = get_method(manifest.method)
    config = spec.config_from_dict(manifest.model.config)
    config = dataclasses.replace(config, image_size=manifest.image_size)
    source = (
        f"{manifest.model.backbone} architecture of {artifacts}, random weights "
        f"(seed {seed}) for the torch backends"
    )
    return spec.build(config).eval(), source


def _load_model(config: BenchConfig, method: str) -> tuple[Any, str]:
    """The torch model of `method` to time (and export): a model folder, the model behind
    --artifacts, or random weights by backbone name."""
    from fbclip_edge.checkpoint import load
    from fbclip_edge.factory import create_model

    if config.model is not None:
        model, source = load(config.model), f"model folder {config.model}"
    elif config.artifacts is not None:
        model, source = _model_from_artifacts(config.artifacts, config.seed)
    else:
        size = config.image_size or 224
        model = create_model(config.backbone, image_size=size, seed=config.seed, method=method)
        return model, f"{config.backbone}, random weights (seed {config.seed})"
    if config.image_size and config.image_size != model.config.image_size:
        # Positional embeddings are resized on the fly, so any valid side runs.
        source += f" at {config.image_size} px (saved at {model.config.image_size})"
        model.config = dataclasses.replace(model.config, image_size=config.image_size)
        model.config.validate()
    return model, source


def folder_methods(model: Path | None, artifacts: Path | None) -> list[tuple[str, Path]]:
    """(method, folder) for the model folder and the artifacts folder given, in that order:
    a folder holds one method's model, so it decides what can be timed."""
    from fbclip_edge.artifacts.manifest import read_manifest
    from fbclip_edge.checkpoint import read_config
    from fbclip_edge.methods.base import method_of_folder
    from fbclip_edge.methods.filo.folder import is_filo_folder

    found = []
    if model is not None and is_filo_folder(model):
        found.append((FILO, model))
    elif model is not None:
        found.append((method_of_folder(read_config(model)[1]), model))
    if artifacts is not None:
        found.append((read_manifest(artifacts).method, artifacts))
    return found


def resolve_methods(config: BenchConfig) -> tuple[str, ...]:
    """config.methods as registry names; with a folder they must be exactly its method,
    since a folder's weights cannot stand in for another method's model."""
    if not config.methods:
        raise FBClipError(f"--method needs a method; use one of: {', '.join(bench_methods())}")
    names = tuple(dict.fromkeys(method_name(name) for name in config.methods))
    found = folder_methods(config.model, config.artifacts)
    if len({method for method, _ in found}) > 1:
        (model_method, model_dir), (art_method, art_dir) = found
        raise FBClipError(
            f"{model_dir} holds a {model_method} model but {art_dir} was exported from "
            f"{art_method}; pass folders of the same method"
        )
    if found and names != (found[0][0],):
        method, folder = found[0]
        raise FBClipError(
            f"--method {','.join(names)} disagrees with {folder}, which holds a {method} "
            f"model; drop --method or pass --method {method}"
        )
    return names


def _select_backends(config: BenchConfig) -> tuple[list[str], dict[str, str], list[str]]:
    """(names to run, name -> skip reason, notes); the baseline is always run."""
    notes: list[str] = []
    if config.backends is None:
        chosen, skipped = default_backends()
    else:
        unknown = [n for n in config.backends if n not in ALL_BACKENDS]
        if unknown:
            raise FBClipError(
                f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(ALL_BACKENDS)}"
            )
        chosen, skipped = [], {}
        for name in ALL_BACKENDS:
            if name not in config.backends:
                continue
            reason = skip_reason(name)
            if reason is None:
                chosen.append(name)
            else:
                skipped[name] = reason
        if BASELINE not in chosen:
            chosen.insert(0, BASELINE)
            notes.append(f"{BASELINE} added: every speedup is quoted against it, in the same run")
    return chosen, skipped, notes


class _Artifacts:
    """The artifacts folder one method's exported backends open: the user's, or one export
    of that method's model per run."""

    def __init__(
        self, model: Any, config: BenchConfig, names: list[str], scratch: Path, method: str
    ) -> None:
        self.model = model
        self.config = config
        self.plan = export_plan([n for n in names if n in EXPORTED_BACKENDS], config.batches)
        self.scratch = scratch
        self.method = method
        self.made: Path | None = None
        self.export_seconds: float | None = None

    def folder(self) -> Path:
        """The folder, exporting on first use (not timed: setup, reported in the notes)."""
        if self.config.artifacts is not None:
            return self.config.artifacts
        if self.made is None:
            start = time.perf_counter()
            self.made = export_for_bench(self.model, self.config.model, self.scratch, self.plan)
            self.export_seconds = time.perf_counter() - start
        return self.made

    def note(self) -> str | None:
        """How the exported backends' folder came about, for the results' notes."""
        if self.config.artifacts is not None:
            return f"exported backends opened {self.config.artifacts}"
        if self.export_seconds is None:
            return None
        plan = self.plan
        return (
            f"exported for this run ({self.method}): {plan.precision}, targets {plan.targets}, "
            f"batch profile {plan.batch_profile}, kernel scoring; took "
            f"{self.export_seconds:.1f} s (not part of any timing)" + _parity_note(self.made)
        )


def _parity_note(artifacts: Path | None) -> str:
    """'; parity vs torch fp32 (score / map max abs): vision.onnx 6e-08 / 3e-07, ...'."""
    from fbclip_edge.artifacts.manifest import PARITY

    path = None if artifacts is None else artifacts / PARITY
    if path is None or not path.is_file():
        return ""
    rows = json.loads(path.read_text()).get("rows", [])
    parts = [
        f"{row['target']} {row['score_max_abs']:.1g} / {row['map_max_abs']:.1g}"
        for row in rows
        if row.get("score_max_abs") is not None and row.get("map_max_abs") is not None
    ]
    return f"; parity vs torch fp32 (score / map max abs): {', '.join(parts)}" if parts else ""


def _build(name: str, model: Any, artifacts: _Artifacts) -> BenchBackend:
    if name in EXPORTED_BACKENDS:
        return build_exported_backend(name, artifacts.folder())
    return build_torch_backend(name, model, device_for(name))


def default_command() -> str:
    """The command line as typed, for the results file."""
    return shlex.join(["fbclip-edge" if i == 0 else a for i, a in enumerate(sys.argv)])


@dataclass
class _Target:
    """One method's model under test, with the artifacts its exported backends open."""

    method: str
    model: Any
    artifacts: _Artifacts
    flops: int  # per image, network + scoring


@dataclass
class BenchRun:
    """State shared by every method and backend of one run: ceilings, power samples."""

    config: BenchConfig
    power: PowerSampler
    say: Callable[[str], None]
    ceilings: dict[tuple[str, str], MatmulCeiling | None] = field(default_factory=dict)
    preprocess_kinds: set[str] = field(default_factory=set)

    def ceiling(self, device: torch.device, precision: str) -> MatmulCeiling | None:
        """The matmul ceiling for a device and dtype, measured once per run."""
        dtype = _DTYPES.get(precision)
        if not self.config.measure_ceiling or dtype is None:
            return None
        key = (device.type, precision)
        if key not in self.ceilings:
            self.say(f"measuring the {device.type} {precision} matmul ceiling")
            self.ceilings[key] = measure_matmul_ceiling(device, dtype)
        return self.ceilings[key]

    def method(self, method: str, chosen: list[str], skipped: dict[str, str]) -> MethodOutcome:
        """Every chosen backend on `method`'s model, baseline first, then the baseline again
        for this method's drift; the model and its export are gone when this returns."""
        if method == FILO:
            from fbclip_edge.bench.filo import filo_outcome

            return filo_outcome(self, chosen, skipped)
        model, source = _load_model(self.config, method)
        _check_artifacts(self.config, model)
        info = _model_info(model, method, source)
        results = [BackendResult(n, "skipped", r, method=method) for n, r in skipped.items()]
        rows: list[Measurement] = []
        drift = None
        with tempfile.TemporaryDirectory(prefix=f"fbclip-bench-{method}-") as scratch:
            artifacts = _Artifacts(model, self.config, chosen, Path(scratch), method)
            target = _Target(method, model, artifacts, info.flops_total)
            for name in chosen:
                result, measured = self.backend(name, target)
                results.append(result)
                rows.extend(measured)
                release()
            if self.config.recheck_baseline and len(chosen) > 1 and BASELINE in chosen:
                self.say(f"{method} {BASELINE}: timing again, for the machine's drift")
                _, again = self.backend(BASELINE, target)
                drift = baseline_drift(rows, again)
                release()
            export_note = artifacts.note()
        return MethodOutcome(info, results, rows, drift, export_note)

    def backend(self, name: str, target: _Target) -> tuple[BackendResult, list[Measurement]]:
        """Build and measure one backend at every batch size; failures become reasons."""
        if self.config.isolate and name in EXPORTED_BACKENDS:
            return self.isolated(name, target)
        label = f"{target.method} {name}"
        result = BackendResult(name, "ok", method=target.method)
        try:
            self.say(f"{label}: preparing")
            backend = _build(name, target.model, target.artifacts)
        except Exception as error:  # one broken backend must not end the run
            result.status, result.reason = "failed", one_line(error)
            self.say(f"{label}: failed ({result.reason})")
            return result, []
        result.device, result.precision = str(backend.device), backend.precision
        result.kernel_impl = backend.kernel_impl
        result.setup_seconds = backend.setup_seconds
        result.details = dict(backend.details)
        ceiling = self.ceiling(backend.device, backend.precision)
        image_size = target.model.config.image_size
        runs = measure_batches(
            backend, self.config, image_size, self.power, target.method, self.labelled(label)
        )
        return self.completed(result, runs, target, ceiling)

    def isolated(self, name: str, target: _Target) -> tuple[BackendResult, list[Measurement]]:
        """Exported backend `name` timed in a child process of its own (--isolate): the export
        happens here, once, before the child opens it; the child's rows come back whole."""
        label = f"{target.method} {name}"
        result = BackendResult(name, "ok", method=target.method)
        self.say(f"{label}: preparing")
        try:
            spec = ChildSpec(
                backend=name,
                method=target.method,
                artifacts=str(target.artifacts.folder()),
                image_size=target.model.config.image_size,
                config=config_dict(self.config),
                torch_threads=torch.get_num_threads(),
            )
            child = run_child(spec, self.labelled(label))
        except Exception as error:  # the export or the launch: this backend's failure only
            child = ChildReport(error=one_line(error))
        if child.opened is None:
            result.status, result.reason = "failed", child.error or "no report from the child"
            self.say(f"{label}: failed ({result.reason})")
            return result, []
        opened = child.opened
        result.device, result.precision = opened.device, opened.precision
        result.kernel_impl, result.setup_seconds = opened.kernel_impl, opened.setup_seconds
        result.details = dict(opened.details)
        child.fill_power(self.power)
        ceiling = self.ceiling(torch.device(opened.device), opened.precision)
        return self.completed(result, child.runs, target, ceiling)

    def labelled(self, label: str) -> Callable[[str], None]:
        """`say` with every message prefixed by the backend's label."""
        return lambda message: self.say(f"{label}: {message}")

    def completed(
        self,
        result: BackendResult,
        runs: BatchRuns,
        target: _Target,
        ceiling: MatmulCeiling | None,
    ) -> tuple[BackendResult, list[Measurement]]:
        """Batch failures into the result, compute columns into the rows; the backend fails
        when every batch did."""
        self.preprocess_kinds.update(runs.kinds)
        result.batch_failures.update(runs.failures)
        for row in runs.rows:
            row.achieved_tflops = target.flops * row.batch / (row.model_p50_ms / 1e3) / 1e12
            if ceiling is not None:
                row.ceiling_tflops = ceiling.tflops
                row.ceiling_percent = 100.0 * row.achieved_tflops / ceiling.tflops
        if len(result.batch_failures) == len(self.config.batches):
            result.status = "failed"
            result.reason = next(iter(result.batch_failures.values()))
        return result, runs.rows


def _model_info(model: Any, method: str, source: str) -> ModelInfo:
    """The measured network, with FLOPs from the method's own analytic count."""
    spec = get_method(method)
    flops = spec.flops(model.config)
    return ModelInfo(
        method=spec.name,
        title=spec.title,
        source=source,
        backbone=model.config.backbone.name,
        image_size=model.config.image_size,
        feature_layers=list(model.config.feature_layers),
        num_maps=model.config.num_maps,
        flops_backbone=flops.backbone,
        flops_heads=flops.heads,
        flops_total=flops.total,
    )


def _check_artifacts(config: BenchConfig, model: Any) -> None:
    """--artifacts and the torch model must agree on the input size, or speedups compare
    different amounts of work."""
    if config.artifacts is None:
        return
    from fbclip_edge.artifacts.manifest import read_manifest

    size = read_manifest(config.artifacts).image_size
    if size != model.config.image_size:
        raise FBClipError(
            f"{config.artifacts} was exported at {size} px but the torch model runs at "
            f"{model.config.image_size} px; pass --image-size {size} or re-export"
        )


def _check(config: BenchConfig) -> None:
    if not config.batches or min(config.batches) < 1:
        raise FBClipError("--batch needs positive batch sizes, e.g. 1,8,32")
    if config.iters < 1 or config.warmup < 0 or config.repeats < 1:
        raise FBClipError("--iters and --repeats must be >= 1 and --warmup >= 0")
    if config.preprocess not in ("auto", "cpu", "gpu"):
        raise FBClipError(f"--preprocess {config.preprocess!r}: choose auto, cpu or gpu")


def run_bench(config: BenchConfig, log: Callable[[str], None] | None = None) -> BenchResults:
    """Measure every selected backend at every batch size for every method; never drops a
    backend silently.

    Methods run one after another, each with its own eager baseline first, so every speedup
    is against the same model; backends run one at a time and each is released before the
    next, so none measures in another's memory pressure.
    """
    _check(config)
    methods = resolve_methods(config)
    started = time.perf_counter()
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    device_info = describe_device()
    chosen, skipped, notes = _select_backends(config)
    outcomes: list[MethodOutcome] = []
    power = PowerSampler().start()
    run = BenchRun(config, power, log or (lambda _message: None))
    try:
        for method in methods:
            outcomes.append(run.method(method, chosen, skipped))
            release()
    finally:
        power.stop()
    measurements = [row for outcome in outcomes for row in outcome.measurements]
    add_speedups(measurements)
    notes.extend(o.export_note for o in outcomes if o.export_note)
    notes.extend(note for o in outcomes for note in o.notes)
    notes.extend(_standard_notes(run.preprocess_kinds))
    notes.extend(_isolate_notes(config))
    notes.extend(_contention_notes(measurements))
    drift = {o.info.method: o.drift for o in outcomes if o.drift is not None}
    for outcome in outcomes:
        label = outcome.info.method if len(methods) > 1 else None
        notes.extend(drift_notes(outcome.measurements, outcome.drift, label))
    return BenchResults(
        schema_version=SCHEMA_VERSION,
        command=config.command or default_command(),
        started_at=started_at,
        duration_seconds=time.perf_counter() - started,
        config=config_dict(config),
        models=[outcome.info for outcome in outcomes],
        device=device_info,
        ceilings=[c for c in run.ceilings.values() if c is not None],
        backends=_ordered([b for outcome in outcomes for b in outcome.backends], methods),
        measurements=measurements,
        notes=notes,
        load_average_at_end=load_average(),
        baseline_drift=drift or None,
    )


def _ordered(results: list[BackendResult], methods: tuple[str, ...]) -> list[BackendResult]:
    """Backends grouped by method (in run order), each group in ALL_BACKENDS order."""
    order = {name: index for index, name in enumerate(ALL_BACKENDS)}
    rank = {method: index for index, method in enumerate(methods)}
    return sorted(results, key=lambda r: (rank.get(r.method, 0), order.get(r.name, len(order))))


def drift_notes(
    measurements: list[Measurement], drift: dict[str, float] | None, method: str | None = None
) -> list[str]:
    """Say how far the baseline moved, and which speedups that drift could explain; with
    `method`, only that method's rows count and the notes name it (multi-method runs)."""
    if not drift:
        return []
    rows = [m for m in measurements if method is None or m.method == method]
    moved = ", ".join(f"{value:+.1%} at batch {batch}" for batch, value in drift.items())
    whose = f" for {method}" if method else ""
    notes = [
        f"{BASELINE} timed again after the other backends{whose}: its throughput moved "
        f"{moved}; a speedup within that band of 1.00x is not conclusive on this machine"
    ]
    prefix = f"{method} " if method else ""
    unclear = [
        f"{prefix}{m.backend} at batch {m.batch} ({m.speedup:.2f}x)"
        for m in rows
        if m.backend != BASELINE
        and m.speedup is not None
        and str(m.batch) in drift
        and abs(m.speedup - 1.0) <= abs(drift[str(m.batch)])
    ]
    if unclear:
        notes.append("INCONCLUSIVE (within the baseline's drift): " + "; ".join(unclear))
    return notes


def _standard_notes(preprocess_kinds: set[str]) -> list[str]:
    notes = [
        "pipeline = uint8 frames on the host -> image scores and full-size anomaly maps back "
        "on the host, one batch in flight (no overlap between stages)",
        "network includes the host-to-device copy of the pixels; scoring is timed apart where "
        "the backend runs it after the network (torch backends, kernel-scoring exports)",
    ]
    if "cpu" in preprocess_kinds:
        notes.append("preprocess cpu: PIL bicubic resize + normalize (the reference path)")
    if "gpu" in preprocess_kinds:
        notes.append(
            "preprocess gpu: torch bicubic resize with antialias on the GPU; close to "
            "but not bit-equal with PIL's"
        )
    return notes


def _isolate_notes(config: BenchConfig) -> list[str]:
    """Which rows ran where, so their RSS columns are read right."""
    if not config.isolate:
        return []
    return [
        "isolate: each exported backend ran in a child process of its own (python -m "
        "fbclip_edge.bench.isolate) holding only its runtime and the artifacts, so its rows' "
        f"host RSS peak is that process's (scope '{OWN_PROCESS}'); the torch backends and "
        "FiLo's rows ran in the bench's process, beside the eager model"
    ]


CONTENTION_WARNING = 0.10


def _contention_notes(measurements: list[Measurement]) -> list[str]:
    """Say so when other processes took a noticeable share of the CPU during timing."""
    shares = [(m.other_cpu_share, m) for m in measurements if m.other_cpu_share is not None]
    if not shares:
        return []
    worst, row = max(shares, key=lambda pair: pair[0])
    if worst < CONTENTION_WARNING:
        return [f"other processes used at most {worst:.0%} of the CPU while timing"]
    return [
        f"CONTENTION: other processes used up to {worst:.0%} of the CPU while timing "
        f"({row.method} {row.backend}, batch {row.batch}); those numbers are slower and "
        "noisier than on a quiet machine: compare rows with the 'other CPU' column in mind"
    ]
