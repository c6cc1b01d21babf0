"""A bounded load test of a `fbclip-edge serve` server on this machine (loopback only).

N concurrent clients (threads, one connection each, like N camera PCs) each send M frames
one request at a time and wait for the answer (a closed loop: a camera sends its next frame
when the last one is scored). Reported: throughput, latency percentiles, errors, and the
batch sizes Triton formed (from its statistics, before and after). Every run is bounded:
clients x frames requests at most, and a deadline after which no client sends again.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from fbclip_edge.errors import FBClipError
from fbclip_edge.fileio import write_text_atomic
from fbclip_edge.serve import FRAMES_INPUT, MODEL, OUTPUT_SETS, Connection, Endpoint
from fbclip_edge.serve.server import ServerProcess, local_config

MAX_REQUESTS = 100_000  # per run: clients x frames
_START_TIMEOUT_S = 60.0  # for every client to connect
_VERSIONED = ("fbclip-edge", "nvidia-pytriton", "tritonclient", "torch", "onnxruntime", "numpy")


@dataclass(frozen=True)
class LoadConfig:
    """One load run against a running server."""

    url: str
    clients: int = 4
    frames: int = 16  # per client
    frame_size: tuple[int, int] = (480, 640)  # (height, width)
    maps: str = "full"  # which outputs each request names: see fbclip_edge.serve.OUTPUT_SETS
    model: str = MODEL
    max_seconds: float = 120.0

    def check(self) -> Endpoint:
        """Refuse non-loopback servers and unbounded runs before any traffic."""
        endpoint = Endpoint.parse(self.url)
        if not endpoint.is_loopback:
            raise FBClipError(
                f"the load test only targets this machine; {self.url} is not a loopback "
                "address (use 127.0.0.1 or localhost)"
            )
        if self.clients < 1 or self.frames < 1:
            raise FBClipError("clients and frames per client must be at least 1")
        if self.clients * self.frames > MAX_REQUESTS:
            raise FBClipError(
                f"{self.clients} clients x {self.frames} frames is over the {MAX_REQUESTS} "
                "requests one run may send; lower --frames"
            )
        if not 0 < self.max_seconds <= 3600:
            raise FBClipError("max_seconds must be in (0, 3600]")
        if self.maps not in OUTPUT_SETS:
            raise FBClipError(f"maps must be one of {', '.join(OUTPUT_SETS)}, not {self.maps!r}")
        if min(self.frame_size) < 1:
            raise FBClipError(f"frame size {self.frame_size} must be at least 1x1")
        return endpoint


@dataclass
class LoadResult:
    """What one run measured (latencies in ms, per request of one frame)."""

    clients: int
    frames_per_client: int
    protocol: str
    maps: str
    dynamic_batching: bool | None  # None: a server this run did not start
    sent: int
    ok: int
    errors: int
    wall_s: float
    throughput_fps: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    max_ms: float | None
    batch_sizes: dict[int, int]  # Triton executions per batch size during the run
    mean_batch: float | None
    deadline_hit: bool
    error_samples: list[str] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    return float(np.percentile(values, q)) if values else None


def batch_histogram(stats: dict[str, Any], model: str) -> dict[int, int]:
    """Executions per batch size from Triton's statistics (HTTP and gRPC JSON alike)."""
    for entry in stats.get("model_stats", []):
        if entry.get("name") != model:
            continue
        return {
            int(item["batch_size"]): int(item["compute_infer"]["count"])
            for item in entry.get("batch_stats", [])
        }
    return {}


def _settled_histogram(monitor: Connection, model: str, wait_s: float = 2.0) -> dict[int, int]:
    """The batch histogram once it stops changing: Triton records an execution's statistics
    just after sending its responses, so the last one can lag the client by a moment."""
    histogram = batch_histogram(monitor.statistics(model), model)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        time.sleep(0.1)
        again = batch_histogram(monitor.statistics(model), model)
        if again == histogram:
            break
        histogram = again
    return histogram


def _difference(after: dict[int, int], before: dict[int, int]) -> dict[int, int]:
    delta = {size: count - before.get(size, 0) for size, count in after.items()}
    return {size: count for size, count in sorted(delta.items()) if count > 0}


@dataclass
class _Client:
    """One camera: its own connection, frames and latencies."""

    config: LoadConfig
    index: int
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    sent: int = 0

    def frames(self) -> list[np.ndarray]:
        rng = np.random.default_rng(self.index)
        height, width = self.config.frame_size
        return [rng.integers(0, 256, (1, height, width, 3), dtype=np.uint8) for _ in range(4)]

    def run(self, start: threading.Barrier, deadline: list[float]) -> None:
        frames = self.frames()
        outputs = OUTPUT_SETS[self.config.maps]
        connection = None
        try:
            connection = Connection(self.config.url, timeout_s=self.config.max_seconds)
        except FBClipError as error:
            self.errors.append(str(error))
        try:
            start.wait(timeout=_START_TIMEOUT_S)
        except threading.BrokenBarrierError:
            return
        if connection is None:
            return
        try:
            for number in range(self.config.frames):
                if time.perf_counter() > deadline[0]:
                    return
                began = time.perf_counter()
                self.sent += 1
                try:
                    connection.infer(
                        self.config.model, FRAMES_INPUT, frames[number % len(frames)], outputs
                    )
                except FBClipError as error:
                    self.errors.append(str(error))
                    continue
                self.latencies.append((time.perf_counter() - began) * 1000.0)
        finally:
            connection.close()


def run_load(config: LoadConfig, dynamic_batching: bool | None = None) -> LoadResult:
    """Run N clients x M frames against the server at config.url (bounded, loopback only)."""
    endpoint = config.check()
    monitor = Connection(config.url, timeout_s=30.0)
    try:
        before = batch_histogram(monitor.statistics(config.model), config.model)
        clients = [_Client(config, index) for index in range(config.clients)]
        start = threading.Barrier(config.clients + 1)
        deadline = [float("inf")]
        threads = [
            threading.Thread(target=c.run, args=(start, deadline), daemon=True) for c in clients
        ]
        for thread in threads:
            thread.start()
        try:
            start.wait(timeout=_START_TIMEOUT_S)
        except threading.BrokenBarrierError:
            raise FBClipError(
                f"{config.clients} clients did not connect within {_START_TIMEOUT_S:.0f} s"
            ) from None
        began = time.perf_counter()
        deadline[0] = began + config.max_seconds
        give_up = deadline[0] + config.max_seconds  # a request sent last may take its timeout
        for thread in threads:
            thread.join(timeout=max(0.0, give_up - time.perf_counter()))
        wall = time.perf_counter() - began
        after = _settled_histogram(monitor, config.model)
    finally:
        monitor.close()
    latencies = [value for client in clients for value in client.latencies]
    errors = [message for client in clients for message in client.errors]
    batches = _difference(after, before)
    executions = sum(batches.values())
    return LoadResult(
        clients=config.clients,
        frames_per_client=config.frames,
        protocol=endpoint.scheme,
        maps=config.maps,
        dynamic_batching=dynamic_batching,
        sent=sum(client.sent for client in clients),
        ok=len(latencies),
        errors=len(errors),
        wall_s=round(wall, 3),
        throughput_fps=round(len(latencies) / wall, 3) if wall > 0 else 0.0,
        p50_ms=percentile(latencies, 50),
        p90_ms=percentile(latencies, 90),
        p99_ms=percentile(latencies, 99),
        mean_ms=statistics.fmean(latencies) if latencies else None,
        max_ms=max(latencies) if latencies else None,
        batch_sizes=batches,
        mean_batch=(sum(s * n for s, n in batches.items()) / executions) if executions else None,
        deadline_hit=wall >= config.max_seconds,
        error_samples=sorted(set(errors))[:5],
    )


@dataclass(frozen=True)
class SuiteConfig:
    """Load runs over client counts, with dynamic batching on and off (one server each)."""

    artifacts: Path
    clients: tuple[int, ...] = (1, 4, 16)
    frames: int = 16
    frame_size: tuple[int, int] = (480, 640)
    maps: tuple[str, ...] = ("full",)
    protocol: str = "http"
    batching: tuple[bool, ...] = (True, False)
    max_batch: int | None = 8
    max_queue_delay_us: int = 2000
    backend: str = "auto"
    max_seconds: float = 120.0
    warmup_frames: int = 2


@dataclass
class LoadReport:
    """A recorded load test: where, what and how it ran, and every run's result."""

    started_at: str
    command: str
    machine: dict[str, Any]
    server: dict[str, Any]
    load: dict[str, Any]
    results: list[LoadResult]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (batch sizes keyed by strings, as JSON wants)."""
        data = asdict(self)
        for result in data["results"]:
            result["batch_sizes"] = {str(k): v for k, v in result["batch_sizes"].items()}
        return data


def cpu_name() -> str:
    """'model name' of /proc/cpuinfo, else the platform's processor name."""
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        found = None
    return found.group(1).strip() if found else (platform.processor() or platform.machine())


def machine_label(cpu: str, cores: int) -> str:
    """Folder-safe machine name as the benchmark folders use it, e.g. 'intel-xeon-2c'."""
    name = cpu.split(" (")[0]
    for noise in ("(R)", "(TM)", "Processor", "CPU"):
        name = name.replace(noise, " ")
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"
    return f"{slug}-{cores}c"


def _load_average() -> list[float]:
    """1/5/15-minute load: other work on the machine (here, up to 2 cores) skews every number."""
    return [round(value, 2) for value in os.getloadavg()]


def describe_machine() -> dict[str, Any]:
    """CPU, cores, platform, load and library versions: what decides the numbers."""
    versions: dict[str, str | None] = {}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    cpu, cores = cpu_name(), os.cpu_count() or 1
    return {
        "label": machine_label(cpu, cores),
        "cpu_model": cpu,
        "cpu_logical_cores": cores,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": _load_average(),
        "versions": versions,
    }


def _load_settings(
    clients: tuple[int, ...],
    frames: int,
    size: tuple[int, int],
    maps: tuple[str, ...],
    protocol: str,
) -> dict[str, Any]:
    return {
        "clients": list(clients),
        "frames_per_client": frames,
        "frame_size": list(size),
        "maps": list(maps),
        "outputs": {name: list(OUTPUT_SETS[name]) for name in maps},
        "protocol": protocol,
    }


def _start_servers(
    config: SuiteConfig, scratch: Path, stack: contextlib.ExitStack
) -> dict[bool, str]:
    """One loopback server per batching mode, started side by side; the URL of each."""
    servers: dict[bool, ServerProcess] = {}
    for batching in config.batching:
        serve = local_config(
            config.artifacts,
            backend=config.backend,
            max_batch=config.max_batch,
            max_queue_delay_us=config.max_queue_delay_us,
            dynamic_batching=batching,
        )
        log = scratch / f"serve-{'on' if batching else 'off'}.log"
        servers[batching] = ServerProcess(serve, log).spawn()
        stack.callback(servers[batching].stop)
    for server in servers.values():
        server.wait_ready()
    scheme = "grpc" if config.protocol == "grpc" else "http"
    return {batching: getattr(s.urls, scheme) for batching, s in servers.items()}


def run_suite(
    config: SuiteConfig, command: str = "", log: Callable[[str], None] | None = None
) -> LoadReport:
    """Start a loopback server per batching mode (child processes, stopped by SIGTERM), warm
    them up, and run every output choice and client count against each. The runs alternate
    between the servers, so drifts in the machine's load hit both modes alike."""
    say = log or (lambda message: None)
    if not (Path(config.artifacts) / "manifest.json").is_file():
        raise FBClipError(
            f"{config.artifacts} is not an artifacts folder (no manifest.json); "
            "make one with `fbclip-edge export`"
        )
    for maps in config.maps:  # refuse bad settings before starting servers
        probe = LoadConfig("http://127.0.0.1:8000", max(config.clients), config.frames)
        replace(
            probe, frame_size=config.frame_size, maps=maps, max_seconds=config.max_seconds
        ).check()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    machine = describe_machine()
    results: list[LoadResult] = []
    with tempfile.TemporaryDirectory(prefix="fbclip-loadtest-") as scratch:
        with contextlib.ExitStack() as stack:
            say("starting the servers")
            urls = _start_servers(config, Path(scratch), stack)
            for maps in config.maps:
                for url in urls.values():
                    run_load(LoadConfig(url, 1, config.warmup_frames, config.frame_size, maps))
                for clients in config.clients:
                    for batching, url in urls.items():
                        mode = "on" if batching else "off"
                        say(f"batching {mode}, {maps}: {clients} clients x {config.frames} frames")
                        load = LoadConfig(
                            url,
                            clients,
                            config.frames,
                            config.frame_size,
                            maps,
                            max_seconds=config.max_seconds,
                        )
                        results.append(run_load(load, batching))
    load_settings = _load_settings(
        config.clients, config.frames, config.frame_size, config.maps, config.protocol
    )
    load_settings.update(
        max_seconds_per_run=config.max_seconds,
        warmup_frames=config.warmup_frames,
        order="runs alternate between the servers (dynamic batching on, off) per client count",
    )
    server_info = {
        "artifacts": str(config.artifacts),
        "backend": config.backend,
        "max_batch": config.max_batch,
        "max_queue_delay_us": config.max_queue_delay_us,
        "instances": 1,
        **export_summary(config.artifacts),
    }
    machine["load_average_at_end"] = _load_average()
    return LoadReport(started, command, machine, server_info, load_settings, results)


def run_existing(
    url: str,
    clients: tuple[int, ...],
    frames: int,
    frame_size: tuple[int, int],
    maps: tuple[str, ...],
    model: str = MODEL,
    max_seconds: float = 120.0,
    command: str = "",
) -> LoadReport:
    """Every output choice and client count against a server already running here."""
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    machine = describe_machine()
    results = [
        run_load(LoadConfig(url, count, frames, frame_size, choice, model, max_seconds))
        for choice in maps
        for count in clients
    ]
    machine["load_average_at_end"] = _load_average()
    settings = _load_settings(clients, frames, frame_size, maps, Endpoint.parse(url).scheme)
    settings.update(max_seconds_per_run=max_seconds, warmup_frames=0)
    return LoadReport(started, command, machine, {"url": url, "model": model}, settings, results)


def export_summary(artifacts: Path) -> dict[str, Any]:
    """Backbone, input size and precision of an export (from its manifest), for the report."""
    try:
        manifest = json.loads((Path(artifacts) / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    return {
        "backbone": model.get("backbone"),
        "image_size": manifest.get("image_size"),
        "precision": manifest.get("precision"),
        "method": manifest.get("method"),
    }


def model_label(artifacts: Path) -> str:
    """The backbone an export was made from ('tiny', 'ViT-L-14-336' -> 'vit-l-14-336')."""
    name = str(export_summary(artifacts).get("backbone") or "model")
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "model"


def default_out_dir(
    report: LoadReport, model: str, root: str | Path = "benchmarks/results"
) -> Path:
    """<root>/<machine>-<date>/serve-<model>/, next to the benchmark runs of that day."""
    return Path(root) / f"{report.machine['label']}-{report.started_at[:10]}" / f"serve-{model}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def report_markdown(report: LoadReport) -> str:
    """The results.md text: setting, then one table row per run."""
    machine, load, server = report.machine, report.load, report.server
    height, width = load["frame_size"]
    outputs = "; ".join(f"{name}: {', '.join(names)}" for name, names in load["outputs"].items())
    lines = [
        "# fbclip-edge serve: load test",
        "",
        f"Command: `{report.command or 'fbclip-edge loadtest'}`  ",
        f"Date: {report.started_at}  ",
        f"Machine: {machine['cpu_model']}, {machine['cpu_logical_cores']} logical cores, "
        f"{machine['platform']}; load average (1/5/15 min) at start "
        f"{machine['load_average_at_start']}, at end {machine.get('load_average_at_end')}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v) + "  ",
        f"Model: {server.get('backbone', '?')} @ {server.get('image_size', '?')} px, "
        f"{server.get('method') or 'fbclip'}, {server.get('precision', '?')} export  ",
        f"Server: `fbclip-edge serve` on loopback, backend {server.get('backend')}, max batch "
        f"{server.get('max_batch')}, max queue delay {server.get('max_queue_delay_us')} us, "
        f"{server.get('instances')} instance; server and clients share this machine  ",
        f"Load: each client sends {load['frames_per_client']} frames of {width}x{height} uint8, "
        f"one per request, the next when the last is answered, over {load['protocol']}; "
        f"{load['warmup_frames']} warm-up frames first. Outputs asked for: {outputs}  ",
        f"Order: {load.get('order', 'as listed')}",
        "",
        "| dynamic batching | outputs | clients | frames ok | errors | img/s | p50 ms | p90 ms "
        "| p99 ms | mean batch | batches formed (size: count) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {name: index for index, name in enumerate(load["maps"])}
    rows = sorted(
        report.results,
        key=lambda r: (r.dynamic_batching is not True, order.get(r.maps, 0), r.clients),
    )
    for r in rows:
        mode = {True: "on", False: "off", None: "as configured"}[r.dynamic_batching]
        formed = ", ".join(f"{size}: {count}" for size, count in r.batch_sizes.items()) or "-"
        mean = "-" if r.mean_batch is None else f"{r.mean_batch:.2f}"
        lines.append(
            f"| {mode} | {r.maps} | {r.clients} | {r.ok}/{r.sent} | {r.errors} "
            f"| {r.throughput_fps:.2f} "
            f"| {_ms(r.p50_ms)} | {_ms(r.p90_ms)} | {_ms(r.p99_ms)} | {mean} | {formed} |"
        )
    if any(r.error_samples for r in report.results):
        lines += ["", "Errors seen:", ""]
        samples = sorted({s for r in report.results for s in r.error_samples})
        lines += [f"- {sample}" for sample in samples]
    return "\n".join(lines) + "\n"


def write_report(report: LoadReport, out: str | Path) -> tuple[Path, Path]:
    """Write results.json and results.md into `out` (atomically)."""
    folder = Path(out)
    text = json.dumps(report.to_dict(), indent=1, allow_nan=False) + "\n"
    json_path = write_text_atomic(folder / "results.json", text)
    return json_path, write_text_atomic(folder / "results.md", report_markdown(report))
