"""`fbclip-edge bench --isolate`: each exported backend timed in a child process of its own.

The bench keeps the eager baseline's torch model loaded while it times the other backends, so
an exported row measured beside it peaks with that model in its RSS; issue #14 asks for each
exported row's own peak. The child, `python -m fbclip_edge.bench.isolate SPEC REPORT`, opens
only that backend's runtime on the artifacts the parent made (it never exports), times every
batch with timing.py's code (the same frames, seed, warm-up, iterations and caps), and writes
its rows as JSON; their RSS peak is the child's VmHWM, scope OWN_PROCESS. Whatever ends the
child early (an exception, a crash, the OOM killer) becomes the backend's one-line reason.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fbclip_edge.bench.backends import build_exported_backend
from fbclip_edge.bench.schema import OWN_PROCESS, config_from_dict, measurement_from_dict
from fbclip_edge.bench.timing import BatchRuns, measure_batches, one_line
from fbclip_edge.fileio import write_text_atomic

if TYPE_CHECKING:
    from fbclip_edge.bench.timing import PowerReader

CHILD_MODULE = "fbclip_edge.bench.isolate"
#: Marks the child's progress lines among whatever its runtime prints.
PROGRESS = "fbclip-bench-progress: "
#: Output lines kept for the reason when a child dies without a report.
TAIL_LINES = 20
MAX_REASON = 240


@dataclass
class ChildSpec:
    """What a child times: one exported backend of one method on the parent's artifacts."""

    backend: str
    method: str
    artifacts: str
    image_size: int
    config: dict[str, Any]  # schema.config_dict of the run
    torch_threads: int  # the anomaly map and kernel scoring run in torch, as in the parent


@dataclass
class Opened:
    """The opened backend's facts, for the run's BackendResult."""

    device: str
    precision: str
    kernel_impl: str
    setup_seconds: float
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChildReport:
    """What came back: the backend's facts and rows, or why there are none.

    windows: each row's timing window (perf_counter, the system's monotonic clock on Linux,
    so the parent's power sampler can average over it).
    """

    opened: Opened | None = None
    runs: BatchRuns = field(default_factory=BatchRuns)
    windows: list[tuple[float, float]] = field(default_factory=list)
    error: str | None = None

    def fill_power(self, power: PowerReader) -> None:
        """Mean power per row from the parent's sampler (the child samples nothing)."""
        if len(self.windows) != len(self.runs.rows):
            return
        for row, (start, end) in zip(self.runs.rows, self.windows, strict=True):
            row.power_mw = power.mean_mw(start, end)


# ---------------------------------------------------------------- the parent's side


def child_argv(spec: Path, report: Path) -> list[str]:
    """The child's command line: this interpreter, this module."""
    return [sys.executable, "-m", CHILD_MODULE, str(spec), str(report)]


def run_child(spec: ChildSpec, say: Callable[[str], None]) -> ChildReport:
    """Time spec's backend in a fresh process; its progress lines go to `say` as they come."""
    with tempfile.TemporaryDirectory(prefix="fbclip-bench-child-") as folder:
        spec_path, report_path = Path(folder, "spec.json"), Path(folder, "report.json")
        spec_path.write_text(json.dumps(asdict(spec)), encoding="utf-8")
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        with subprocess.Popen(  # noqa: S603 - our interpreter and module, paths we made
            child_argv(spec_path, report_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        ) as process:
            assert process.stdout is not None
            for line in process.stdout:
                if line.startswith(PROGRESS):
                    say(line[len(PROGRESS) :].strip())
                elif line.strip():
                    tail.append(line.strip())
            code = process.wait()
        if report_path.is_file():
            return read_report(report_path)
        return ChildReport(error=crash_reason(code, tail))


def crash_reason(code: int, tail: Sequence[str]) -> str:
    """One line for a child that ended without a report: the signal or exit status, and its
    last output line (a Python traceback's is the exception)."""
    last = tail[-1] if tail else ""
    if code < 0:
        name = _signal_name(-code)
        hint = " (out of memory? the OOM killer sends it)" if -code == signal.SIGKILL else ""
        reason = f"--isolate child killed by {name}{hint}"
        reason += f"; last output: {last}" if last else ""
    elif last:
        reason = f"{last} (--isolate child, exit status {code})"
    else:
        reason = f"--isolate child exited with status {code} without a report"
    return reason[:MAX_REASON]


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def read_report(path: Path) -> ChildReport:
    """A child's report file; an unreadable one is the backend's failure, not the run's."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        opened = None if data["opened"] is None else Opened(**data["opened"])
        runs = BatchRuns(
            rows=[measurement_from_dict(row) for row in data["rows"]],
            failures=dict(data["failures"]),
            kinds=set(data["kinds"]),
        )
        windows = [(float(start), float(end)) for start, end in data["windows"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return ChildReport(error=f"unreadable --isolate child report ({one_line(error)})")
    return ChildReport(opened, runs, windows, data["error"])


def report_dict(report: ChildReport) -> dict[str, Any]:
    """ChildReport as JSON-ready data (read back by read_report)."""
    return {
        "opened": None if report.opened is None else asdict(report.opened),
        "rows": [asdict(row) for row in report.runs.rows],
        "failures": report.runs.failures,
        "kinds": sorted(report.runs.kinds),
        "windows": report.windows,
        "error": report.error,
    }


# ---------------------------------------------------------------- the child's side


@dataclass
class WindowLog:
    """measure()'s power source in the child: keeps each row's timing window for the parent
    (which runs the sampler) and reports no power itself."""

    windows: list[tuple[float, float]] = field(default_factory=list)

    def mean_mw(self, start: float, end: float) -> dict[str, float] | None:
        """Record the window; power comes later, from the parent."""
        self.windows.append((start, end))
        return None


def time_backend(spec: ChildSpec, say: Callable[[str], None]) -> ChildReport:
    """Open spec's backend on the parent's artifacts and time it at every batch size."""
    torch.set_num_threads(spec.torch_threads)
    config = config_from_dict(spec.config)
    try:
        backend = build_exported_backend(spec.backend, Path(spec.artifacts))
    except Exception as error:  # the parent reports it as the backend's reason
        return ChildReport(error=one_line(error))
    opened = Opened(
        str(backend.device),
        backend.precision,
        backend.kernel_impl,
        backend.setup_seconds,
        {key: str(value) for key, value in backend.details.items()},
    )
    log = WindowLog()
    runs = measure_batches(backend, config, spec.image_size, log, spec.method, say)
    for row in runs.rows:
        row.host_rss_peak_scope = OWN_PROCESS
    return ChildReport(opened, runs, log.windows)


def _progress(message: str) -> None:
    print(PROGRESS + message, flush=True)


def main(argv: Sequence[str]) -> int:
    """`python -m fbclip_edge.bench.isolate SPEC REPORT`: time SPEC's backend, write REPORT."""
    if len(argv) != 2:
        print("usage: python -m fbclip_edge.bench.isolate SPEC.json REPORT.json", file=sys.stderr)
        return 2
    spec_path, report_path = (Path(arg) for arg in argv)
    spec = ChildSpec(**json.loads(spec_path.read_text(encoding="utf-8")))
    report = time_backend(spec, _progress)
    write_text_atomic(report_path, json.dumps(report_dict(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
