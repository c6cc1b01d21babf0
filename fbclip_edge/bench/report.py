"""Benchmark output: results.json (schema in benchmarks/README.md), results.md, results.png
and the terminal table, all from one BenchResults.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from fbclip_edge.bench import targets
from fbclip_edge.bench.schema import BenchResults, Measurement, ModelInfo
from fbclip_edge.fileio import write_atomic, write_text_atomic

JSON_NAME = "results.json"
MARKDOWN_NAME = "results.md"
PLOT_NAME = "results.png"


@dataclass
class ResultFiles:
    """Paths written by write_results."""

    json: Path
    markdown: Path
    plot: Path


def _finite(value: Any) -> Any:
    """NaN/inf -> None, recursively: strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def results_json(results: BenchResults) -> str:
    """The results.json text (strict JSON, stable key order)."""
    return json.dumps(_finite(results.to_dict()), indent=1, allow_nan=False) + "\n"


def _fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}{suffix}"


def _ms(value: float | None) -> str:
    """Milliseconds with precision that suits the magnitude."""
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def _rate(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _stage_ms(row: Measurement, stage: str) -> str:
    stats = row.stages.get(stage)
    return "in network" if stats is None else _ms(stats.p50_ms)


def _memory(row: Measurement) -> str:
    """GPU peak where there is one (what limits batch size there), else host RSS peak."""
    if row.gpu_peak_allocated_bytes is not None:
        return f"{_mib(row.gpu_peak_allocated_bytes)} GPU"
    return f"{_mib(row.host_rss_peak_bytes)} RSS"


def _columns(row: Measurement) -> dict[str, str]:
    """Every summary cell of one row, keyed by column name."""
    pipe = row.pipeline
    return {
        "method": row.method,
        "backend": row.backend,
        "batch": str(row.batch),
        "iters": str(pipe.iterations),
        "img/s": _rate(pipe.throughput),
        "img/s min-max": f"{_rate(pipe.throughput_min)}-{_rate(pipe.throughput_max)}",
        "p50 ms": _ms(pipe.p50_ms),
        "p90 ms": _ms(pipe.p90_ms),
        "p99 ms": _ms(pipe.p99_ms),
        "speedup": _fmt(row.speedup, 2, "x"),
        "model img/s": _rate(row.model_throughput),
        "model speedup": _fmt(row.model_speedup, 2, "x"),
        "TFLOP/s": _fmt(row.achieved_tflops, 3),
        "% ceiling": _fmt(row.ceiling_percent, 1, "%"),
        "GPU peak MiB": _mib(row.gpu_peak_allocated_bytes),
        "RSS peak MiB": _mib(row.host_rss_peak_bytes),
        "memory MiB": _memory(row),
        "other CPU": _fmt(None if row.other_cpu_share is None else 100 * row.other_cpu_share,
                          0, "%"),
    }


# Markdown shows everything; the terminal drops columns from the end of TERMINAL_DROP_ORDER
# until the table fits the console.
SUMMARY_HEADER = ["method", "backend", "batch", "iters", "img/s", "img/s min-max", "p50 ms",
                  "p90 ms", "p99 ms", "speedup", "model img/s", "model speedup", "TFLOP/s",
                  "% ceiling", "GPU peak MiB", "RSS peak MiB", "other CPU"]
TERMINAL_HEADER = ["method", "backend", "batch", "img/s", "img/s min-max", "p50 ms", "p99 ms",
                   "speedup", "model img/s", "model speedup", "TFLOP/s", "% ceiling",
                   "memory MiB"]
TERMINAL_DROP_ORDER = ["img/s min-max", "TFLOP/s", "memory MiB", "model img/s", "p99 ms",
                       "% ceiling"]


def summary_rows(results: BenchResults, header: list[str] = SUMMARY_HEADER) -> list[list[str]]:
    """One row per method, backend and batch: the numbers people choose a backend by."""
    return [[_columns(row)[name] for name in header] for row in results.measurements]


def fitting_header(results: BenchResults, width: int) -> list[str]:
    """TERMINAL_HEADER minus the least important columns until the table fits `width`."""
    header = list(TERMINAL_HEADER)
    cells = [_columns(row) for row in results.measurements]

    def column_width(name: str) -> int:  # rich wraps headers at spaces, never cells here
        return max([len(word) for word in name.split()] + [len(cell[name]) for cell in cells])

    def table_width(columns: list[str]) -> int:
        return sum(column_width(name) for name in columns) + 3 * len(columns) + 1

    for name in TERMINAL_DROP_ORDER:
        if table_width(header) <= width:
            break
        header.remove(name)
    return header


STAGE_HEADER = ["method", "backend", "batch", "preprocess", "network", "scoring", "map",
                "pipeline"]


def stage_rows(results: BenchResults) -> list[list[str]]:
    """p50 milliseconds per stage: where the time goes (FiLo rows have their own table)."""
    return [
        [row.method, row.backend, str(row.batch),
         *(_stage_ms(row, s) for s in ("preprocess", "network", "scoring", "map")),
         _ms(row.pipeline.p50_ms)]
        for row in results.measurements
        if not is_filo_row(row)
    ]


FILO_STAGES = ("grounding", "vision", "text", "score", "host")
FILO_STAGE_HEADER = ["method", "backend", "batch", *FILO_STAGES, "other", "pipeline"]


def is_filo_row(row: Measurement) -> bool:
    """FiLo rows time grounding ... host (bench/filo.py) instead of preprocess ... map."""
    return "grounding" in row.stages


def filo_stage_rows(results: BenchResults) -> list[list[str]]:
    """Mean ms per image per FiLo stage; 'other' is the pipeline's rest (result conversion)."""
    rows = []
    for row in results.measurements:
        if not is_filo_row(row):
            continue
        per_image = row.stages_ms or {}
        total = row.pipeline.mean_ms / row.batch
        other = total - sum(per_image.get(stage, 0.0) for stage in FILO_STAGES)
        rows.append([row.method, row.backend, str(row.batch),
                     *(_ms(per_image.get(stage)) for stage in FILO_STAGES),
                     _ms(max(other, 0.0)), _ms(total)])
    return rows


NOT_MEASURED_HEADER = ["method", "backend", "status", "reason"]


def not_measured(results: BenchResults) -> list[tuple[str, str, str, str]]:
    """(methods, backend, status, reason) for skipped or failed backends and failed batch
    sizes; one line for what every method shares (a backend skipped on this machine)."""
    found: dict[tuple[str, str, str], list[str]] = {}
    for backend in results.backends:
        if backend.status != "ok":
            key = (backend.name, backend.status, backend.reason or "")
            found.setdefault(key, []).append(backend.method)
        for batch, reason in backend.batch_failures.items() if backend.status == "ok" else ():
            found.setdefault((backend.name, f"failed at batch {batch}", reason), []).append(
                backend.method)
    return [(", ".join(methods), *key) for key, methods in found.items()]


def isa_summary(flags: list[str]) -> str:
    """'AVX-512 VNNI BF16 AMX'-style marks of the reduced-precision instructions present."""
    marks = (
        ("AVX-512", {"avx512f"}),
        ("VNNI", {"avx512_vnni", "avx_vnni", "amx_int8"}),
        ("BF16", {"avx512_bf16", "amx_bf16"}),
        ("AMX", {"amx_tile"}),
    )
    found = [name for name, wanted in marks if wanted & set(flags)]
    return " ".join(found) or ("AVX2" if "avx2" in flags else "no AVX2")


def device_line(results: BenchResults) -> str:
    """One line naming the hardware, for titles and summaries."""
    device = results.device
    cpu = (
        f"{device.cpu_model} ({device.cpu_logical_cores} logical cores, "
        f"{isa_summary(device.cpu_isa)})"
    )
    if device.jetson is not None:
        return f"{device.jetson.model}, power mode {device.jetson.power_mode or '?'}; {cpu}"
    if device.gpu is not None:
        return f"{device.gpu.name} ({device.gpu.total_memory_bytes / 2**30:.0f} GiB); {cpu}"
    return cpu


def _gflop(flops: int) -> str:
    return f"{flops / 1e9:.3g}"


def model_line(results: BenchResults) -> str:
    """Backbone, input size, where the weights came from and each method's FLOPs per image."""
    if not results.models:
        return "no model"
    first = results.models[0]
    sources = "; ".join(dict.fromkeys(info.source for info in results.models))
    flops = ", ".join(f"{info.method} {_gflop(info.flops_total)}" for info in results.models)
    return f"{first.backbone} @ {first.image_size} px, {sources}; GFLOP per image: {flops}"


MODELS_HEADER = ["method", "name", "source", "feature layers", "maps", "GFLOP backbone",
                 "GFLOP heads", "GFLOP total"]


def _model_row(info: ModelInfo) -> list[str]:
    return [info.method, info.title, info.source, ",".join(map(str, info.feature_layers)),
            str(info.num_maps), _gflop(info.flops_backbone), _gflop(info.flops_heads),
            _gflop(info.flops_total)]


def terminal_report(results: BenchResults, width: int = 200) -> Group:
    """What `fbclip-edge bench` prints: the summary table (as many columns as fit `width`),
    then what was not measured and why."""
    title = f"{model_line(results)}\n{device_line(results)}"
    header = fitting_header(results, width)
    table = Table(title=title, title_justify="left")
    for name in header:
        text = name in ("method", "backend")
        table.add_column(name, no_wrap=text, justify="left" if text else "right")
    for row in summary_rows(results, header):
        table.add_row(*row)
    parts: list[Table | Text] = [table]
    filo = filo_stage_rows(results)
    if filo:
        stages = Table(title="FiLo stages (mean ms per image)", title_justify="left")
        for name in FILO_STAGE_HEADER:
            text = name in ("method", "backend")
            stages.add_column(name, no_wrap=text, justify="left" if text else "right")
        for cells in filo:
            stages.add_row(*cells)
        parts.append(stages)
    missing = not_measured(results)
    if missing:
        skipped = Table(*NOT_MEASURED_HEADER, title="Not measured", title_justify="left")
        for methods, name, status, reason in missing:
            skipped.add_row(methods, name, f"[yellow]{status}[/]", reason)
        parts.append(skipped)
    parts += [Text(note, style="yellow") for note in warnings(results)]
    return Group(*parts)


WARNING_PREFIXES = ("CONTENTION", "INCONCLUSIVE")


def warnings(results: BenchResults) -> list[str]:
    """Notes that change how the numbers should be read (contention, drift), for the terminal."""
    return [note for note in results.notes if note.startswith(WARNING_PREFIXES)]


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.extend("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"
                 for row in rows)
    return lines


def _environment_lines(results: BenchResults) -> list[str]:
    device = results.device
    physical = device.cpu_physical_cores or "?"
    lines = [f"- CPU: {device.cpu_model}, {device.cpu_logical_cores} logical cores "
             f"({physical} physical), ISA {' '.join(device.cpu_isa) or 'none reported'}, torch "
             f"threads {device.torch_threads}, load average (1/5/15 min) at start "
             f"{device.load_average_at_start}, at end {results.load_average_at_end}"]
    if device.gpu is not None:
        gpu = device.gpu
        lines.append(
            f"- GPU: {gpu.name}, {gpu.total_memory_bytes / 2**30:.1f} GiB, {gpu.sm_count} SMs, "
            f"sm_{gpu.compute_capability.replace('.', '')}, max clocks SM {gpu.clock_sm_max_mhz} / "
            f"memory {gpu.clock_mem_max_mhz} MHz, driver {gpu.driver}, CUDA {device.cuda}"
        )
    if device.jetson is not None:
        lines.append(f"- Jetson: {device.jetson.model}, power mode {device.jetson.power_mode}")
    versions = ", ".join(f"{k} {v}" for k, v in device.versions.items() if v)
    lines.append(f"- Versions: {versions}; {device.platform}")
    for ceiling in results.ceilings:
        lines.append(f"- Matmul ceiling {ceiling.device} {ceiling.dtype}: {ceiling.tflops:.3f} "
                     f"TFLOP/s ({ceiling.size}x{ceiling.size}, {ceiling.note})")
    return lines


def _cap(config: dict[str, Any]) -> str:
    seconds = config.get("max_seconds")
    return "" if seconds is None else f", stopping after {seconds:g} s (at least 3)"


def markdown(results: BenchResults) -> str:
    """results.md: command, hardware, the summary and stage tables, what did not run, notes."""
    config = results.config
    first = results.models[0] if results.models else None
    model = f"{first.backbone} @ {first.image_size} px" if first else "no model"
    lines = [
        f"# fbclip-edge bench: {', '.join(results.methods)}, {model} on {results.device.label}",
        "",
        f"Command: `{results.command}`  ",
        f"Date: {results.started_at}, {results.duration_seconds:.0f} s in all  ",
        f"Model: {model_line(results)}  ",
        f"Timing: {config['warmup']} warm-up + up to {config['iters']} timed iterations per "
        f"backend and batch{_cap(config)} (column iters), in up to {config['repeats']} repeats; "
        f"{config['input_sets']} rotated inputs of "
        f"{config['frame_size'][1]}x{config['frame_size'][0]} uint8 frames",
        "",
        "## Models",
        "",
        "Same backbone, input size and seed for every method; FLOPs per image from each "
        "method's analytic count.",
        "",
        *_md_table(MODELS_HEADER, [_model_row(info) for info in results.models]),
        "",
        "## Device",
        "",
        *_environment_lines(results),
        "",
        "## Throughput and latency",
        "",
        "Speedups are against the same method's torch-eager-fp32 at the same batch in this run "
        "(never across methods). \"model\" is network + scoring, the part the FLOPs count "
        "covers.",
        "",
        *_md_table(SUMMARY_HEADER, summary_rows(results)),
        "",
        *_stage_lines(results),
        *_filo_lines(results),
        *targets.markdown_lines(results),
    ]
    missing = not_measured(results)
    if missing:
        lines += ["## Not measured", "",
                  *_md_table(NOT_MEASURED_HEADER, [list(m) for m in missing]), ""]
    lines += ["## Notes", "", *(f"- {note}" for note in results.notes), ""]
    return "\n".join(lines)


def _stage_lines(results: BenchResults) -> list[str]:
    """The preprocess/network/scoring/map table, unless every row is FiLo's."""
    rows = stage_rows(results)
    if not rows:
        return []
    return ["## Stages (p50 ms per batch)", "", *_md_table(STAGE_HEADER, rows), ""]


def _filo_lines(results: BenchResults) -> list[str]:
    """The FiLo stage table, when the run timed FiLo."""
    rows = filo_stage_rows(results)
    if not rows:
        return []
    return ["## FiLo stages (mean ms per image)", "",
            "Grounding DINO and text run once per frame, vision and score once per batch; "
            "\"other\" is what the pipeline spent outside its stages (result conversion).", "",
            *_md_table(FILO_STAGE_HEADER, rows), ""]


HATCHES = ("", "//", "\\\\", "xx", "..", "oo", "--", "++")


@dataclass(frozen=True)
class _Series:
    """One method on one backend: a bar in every batch group of the plot."""

    method: str
    backend: str
    rows: dict[int, Measurement]


def _series(results: BenchResults) -> list[_Series]:
    """Every (method, backend) pair measured, methods in run order, then backends."""
    keys = dict.fromkeys((m.method, m.backend) for m in results.measurements)
    return [
        _Series(method, backend, {m.batch: m for m in results.measurements
                                  if m.method == method and m.backend == backend})
        for method, backend in keys
    ]


def _styles(results: BenchResults) -> tuple[dict[str, Any], dict[str, str]]:
    """(method -> colour, backend -> hatch): colour tells methods apart, hatch backends."""
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10")
    methods = list(dict.fromkeys([*results.methods, *(m.method for m in results.measurements)]))
    backends = list(dict.fromkeys(m.backend for m in results.measurements))
    return ({name: colors(index % 10) for index, name in enumerate(methods)},
            {name: HATCHES[index % len(HATCHES)] for index, name in enumerate(backends)})


def _spread_is_wide(values: list[float]) -> bool:
    """Log scale when CPU and GPU rows (or batch 1 and 32) would flatten each other."""
    positive = [v for v in values if v > 0]
    return bool(positive) and max(positive) > 20 * min(positive)


def _throughput_panel(axis: Any, results: BenchResults, series: list[_Series],
                      colors: dict[str, Any], hatches: dict[str, str]) -> None:
    """Grouped bars: pipeline img/s per batch, one bar per method and backend, with the
    model-only (network + scoring) rate as a black tick on each bar."""
    batches = sorted({m.batch for m in results.measurements})
    width = 0.8 / max(1, len(series))
    for index, item in enumerate(series):
        offset = (index - (len(series) - 1) / 2) * width
        spots = [(position + offset, item.rows[batch])
                 for position, batch in enumerate(batches) if batch in item.rows]
        xs = [x for x, _ in spots]
        axis.bar(xs, [row.pipeline.throughput for _, row in spots], width,
                 color=colors[item.method], hatch=hatches[item.backend], edgecolor="black",
                 linewidth=0.5)
        axis.scatter(xs, [row.model_throughput for _, row in spots], marker="_", s=120,
                     color="black", zorder=3)
    axis.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    if _spread_is_wide([m.pipeline.throughput for m in results.measurements]
                       + [m.model_throughput for m in results.measurements]):
        axis.set_yscale("log")
    axis.set_ylabel("images / s")
    axis.set_title("Throughput (bars: whole pipeline, black tick: model)")
    axis.grid(True, axis="y", which="both", alpha=0.3)


def _latency_panel(axis: Any, results: BenchResults, series: list[_Series],
                   colors: dict[str, Any], hatches: dict[str, str]) -> None:
    """Pipeline latency distribution of every method and backend at the smallest batch."""
    smallest = min((m.batch for m in results.measurements), default=1)
    shown = [item for item in series if smallest in item.rows]
    if shown:
        boxes = axis.boxplot([item.rows[smallest].pipeline.samples_ms for item in shown],
                             patch_artist=True, showfliers=True,
                             medianprops={"color": "black"})  # visible on any face colour
        for box, item in zip(boxes["boxes"], shown, strict=True):
            box.set_facecolor(colors[item.method])
            box.set_hatch(hatches[item.backend])
        axis.set_xticks(range(1, len(shown) + 1),
                        [f"{item.method}\n{item.backend}" for item in shown],
                        rotation=20, ha="right", fontsize=8)
        if _spread_is_wide([v for item in shown for v in item.rows[smallest].pipeline.samples_ms]):
            axis.set_yscale("log")
    axis.set_ylabel("pipeline latency (ms)")
    axis.set_title(f"Latency distribution at batch {smallest}")
    axis.grid(True, axis="y", alpha=0.3)


def plot(results: BenchResults, path: Path) -> Path:
    """PNG comparing methods and backends: grouped throughput bars per batch (colour per
    method, hatch per backend) and the latency distribution at the smallest batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    series = _series(results)
    colors, hatches = _styles(results)
    figure, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5), constrained_layout=True)
    _throughput_panel(left, results, series, colors, hatches)
    _latency_panel(right, results, series, colors, hatches)
    handles = [Patch(facecolor=color, edgecolor="black", label=method)
               for method, color in colors.items()]
    handles += [Patch(facecolor="white", edgecolor="black", hatch=hatch, label=backend)
                for backend, hatch in hatches.items()]
    if handles:
        left.legend(handles=handles, fontsize=8)
    figure.suptitle(f"{model_line(results)}\n{device_line(results)}", fontsize=10)
    figure.savefig(path, dpi=110, format="png")
    plt.close(figure)
    return path


def write_results(results: BenchResults, out_dir: str | Path) -> ResultFiles:
    """Write results.json, results.md and results.png into out_dir (created if needed)."""
    out = Path(out_dir)
    files = ResultFiles(out / JSON_NAME, out / MARKDOWN_NAME, out / PLOT_NAME)
    write_text_atomic(files.json, results_json(results))
    write_text_atomic(files.markdown, markdown(results))
    write_atomic(files.plot, lambda temporary: plot(results, temporary))
    return files


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def default_out_dir(results: BenchResults, root: str | Path = "benchmarks/results") -> Path:
    """<root>/<device>-<date>/<backbone>-<size>[-<methods>]/: recorded runs of one machine
    and day share a folder, one subfolder per model; FB-CLIP-only runs keep the name they
    had before methods, others name their methods so they never overwrite it."""
    first = results.models[0]
    name = f"{_slug(first.backbone)}-{first.image_size}"
    if results.methods != ["fbclip"]:
        name += "-" + "-".join(_slug(method) for method in results.methods)
    return Path(root) / f"{results.device.label}-{results.started_at[:10]}" / name


def recorded_runs_table(root: str | Path = "benchmarks/results") -> str:
    """Markdown rows summarizing every results.json under root (for benchmarks/README.md):
    pipeline img/s and speedup per method, backend and batch, and the worst contention.
    Reads schema 1 (FB-CLIP only, one `model`) and schema 2 (`models`, rows with `method`)."""
    rows = []
    for path in sorted(Path(root).glob("*/*/" + JSON_NAME)):
        data = json.loads(path.read_text())
        if "measurements" not in data:  # another tool's results (e.g. the serve load test)
            continue
        models = {m.get("method", "fbclip"): m for m in data.get("models") or [data["model"]]}
        measured = [{"method": "fbclip", **m} for m in data["measurements"]]
        device = data["device"]
        hardware = device["gpu"]["name"] if device.get("gpu") else (
            f"{device['cpu_model']}, {device['cpu_logical_cores']} cores")
        batches = sorted({m["batch"] for m in measured})
        for method, backend in dict.fromkeys((m["method"], m["backend"]) for m in measured):
            model = models.get(method) or next(iter(models.values()))
            cells = []
            shares = []
            for batch in batches:
                row = next((m for m in measured if m["method"] == method
                            and m["backend"] == backend and m["batch"] == batch), None)
                if row is None:
                    cells.append("-")
                    continue
                cells.append(f"b{batch}: {_rate(row['pipeline']['throughput'])} img/s "
                             f"({_fmt(row['speedup'], 2, 'x')})")
                shares.append(row.get("other_cpu_share") or 0.0)
            folder = path.parent.relative_to(Path(root))
            rows.append([f"[{folder}](results/{folder.as_posix()}/{MARKDOWN_NAME})", hardware,
                         f"{method} {model['backbone']} @ {model['image_size']}", backend,
                         "; ".join(cells), f"{max(shares, default=0.0):.0%}"])
    header = ["run", "device", "model", "backend", "pipeline throughput (speedup vs eager fp32)",
              "other CPU"]
    return "\n".join(_md_table(header, rows))
