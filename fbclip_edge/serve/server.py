"""`fbclip-edge serve`: one real Triton Inference Server (nvidia-pytriton) around the runtime
backend of an artifacts folder.

Frame sizes and dynamic batching: frames travel as uint8 (B, H, W, 3) with H and W free (-1).
Triton's dynamic batcher only merges requests whose free dims agree, so one execution holds
frames of one size: they are resized together here (one preprocess, one network call for the
whole batch) and their maps made in one call. Cameras of different resolutions batch per
resolution; the pixels model, of fixed shape (3, S, S), batches every camera together.

Bad requests: Triton itself refuses a wrong dtype, rank or channel count, an oversized batch
and unknown models, per request, before batching. The checks made here (empty or oversized
frames) depend only on the frame shape, so a refused request shares its execution only with
requests refused for the same reason: pytriton fails every request of an execution whose
callable raises, and this keeps good requests out of that.

Stopping: SIGTERM (or SIGINT) stops Triton, which answers every request already received,
queued ones included, refuses new ones and exits; it also waits for clients' open HTTP
connections, up to its exit timeout.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import numpy as np
import torch

from fbclip_edge.errors import FBClipError
from fbclip_edge.kernels import anomaly_map
from fbclip_edge.line.detector import Thresholds, preprocess_frames, thresholds_from_artifacts
from fbclip_edge.runtime import Backend
from fbclip_edge.runtime import open as open_backend
from fbclip_edge.serve import (
    FRAMES_INPUT,
    MAP_OUTPUTS,
    MODEL,
    OUTPUTS,
    PIXELS_INPUT,
    SIGMA,
    pixels_model,
)

# Endpoints that need pytriton's access token: everything that changes the server. Statistics
# stay open (read-only; the load test reads the batch sizes Triton formed from them).
RESTRICTED_ENDPOINTS = ["shared-memory", "model-repository", "trace", "logging"]
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Triton's exit waits for open HTTP connections (idle keep-alive ones too) and requests in
# flight up to its exit timeout; pytriton kills it at 30 s, so the timeout stays below that.
MAX_EXIT_TIMEOUT_S = 25
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _libpython_of_stub(stub: Path) -> str | None:
    """The libpython the dynamic loader gives Triton's Python backend stub ('' if none);
    None when it cannot be told (no ldd)."""
    ldd = shutil.which("ldd")
    if ldd is None:
        return None
    try:
        listing = subprocess.run(  # noqa: S603 - fixed arguments, a file of the pytriton wheel
            [ldd, str(stub)], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"libpython\S*\s*=>\s*(\S+)", listing)
    if match is None:
        return None
    return "" if match.group(1) == "not" else match.group(1)


def _own_libpython() -> str | None:
    """The libpython this process runs on, when the interpreter is a shared build."""
    with contextlib.suppress(OSError):
        found = re.search(r"(/\S*libpython[^/\s]*\.so[^/\s]*)", Path("/proc/self/maps").read_text())
        return found.group(1) if found else None
    return None


def unavailable_reason() -> str | None:
    """Why a Triton server cannot run from this Python, with the fix; None when it can.

    Triton's Python backend stub is a separate program linked to the system libpython: it
    fails with a Python built elsewhere (pyenv's), so that case is caught here, up front.
    """
    if importlib.util.find_spec("pytriton") is None:
        return "nvidia-pytriton is not installed; pip install 'fbclip-edge[serve]' (Linux x86-64)"
    if importlib.util.find_spec("tritonclient") is None:
        return "tritonclient is not installed; pip install 'fbclip-edge[serve]'"
    if int(np.__version__.split(".")[0]) >= 2:
        return f"pytriton needs numpy < 2, not numpy {np.__version__}; pip install 'numpy<2'"
    from pytriton.utils.distribution import get_stub_path

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = Path(get_stub_path(version))
    if not stub.is_file():
        return f"pytriton has no Python backend stub for Python {version}; use Python 3.8-3.13"
    loaded, own = _libpython_of_stub(stub), _own_libpython()
    fix = "make the venv from the system CPython (e.g. /usr/bin/python3.11 -m venv .venv)"
    if loaded == "":
        return f"Triton's Python backend stub finds no libpython{version} on this machine; {fix}"
    if loaded and own and os.path.realpath(loaded) != os.path.realpath(own):
        return f"Triton's Python backend stub loads {loaded}, not this Python's {own}; {fix}"
    return None


@dataclass(frozen=True)
class ServeConfig:
    """Everything `fbclip-edge serve` takes. max_batch None: the export's largest batch."""

    artifacts: Path
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int | None = None
    max_queue_delay_us: int = 2000
    dynamic_batching: bool = True
    instances: int = 1
    backend: str = "auto"
    model_name: str = MODEL
    max_frame_side: int = 4096
    exit_timeout_s: int = 20

    def check(self) -> None:
        """Refuse settings Triton would reject later, with the option to change."""
        ports = {"--http-port": self.http_port, "--grpc-port": self.grpc_port}
        ports["--metrics-port"] = self.metrics_port
        for option, port in ports.items():
            if not 0 < port < 65536:
                raise FBClipError(f"{option} {port} is not a TCP port (1-65535)")
        if len(set(ports.values())) != len(ports):
            raise FBClipError("--http-port, --grpc-port and --metrics-port must differ")
        if self.max_batch is not None and self.max_batch < 1:
            raise FBClipError(f"--max-batch {self.max_batch} must be at least 1")
        if self.max_queue_delay_us < 0:
            raise FBClipError(f"--max-queue-delay-us {self.max_queue_delay_us} must be >= 0")
        if self.instances < 1:
            raise FBClipError(f"--instances {self.instances} must be at least 1")
        if self.max_frame_side < 1:
            raise FBClipError(f"--max-frame-side {self.max_frame_side} must be at least 1")
        if not 1 <= self.exit_timeout_s <= MAX_EXIT_TIMEOUT_S:
            raise FBClipError(
                f"--exit-timeout-s {self.exit_timeout_s} must be 1-{MAX_EXIT_TIMEOUT_S} "
                "(pytriton kills a Triton that takes over 30 s to exit)"
            )
        if not _NAME.match(self.model_name):
            raise FBClipError(
                f"--model-name {self.model_name!r} may hold letters, digits, '.', '_', '-' only"
            )

    def cli_args(self) -> list[str]:
        """The `fbclip-edge serve` arguments that start a server with this config."""
        args = [str(self.artifacts), "--host", self.host]
        args += ["--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port)]
        args += ["--metrics-port", str(self.metrics_port)]
        if self.max_batch is not None:
            args += ["--max-batch", str(self.max_batch)]
        args += ["--max-queue-delay-us", str(self.max_queue_delay_us)]
        args += ["--dynamic-batching" if self.dynamic_batching else "--no-dynamic-batching"]
        args += ["--instances", str(self.instances), "--backend", self.backend]
        args += ["--model-name", self.model_name, "--max-frame-side", str(self.max_frame_side)]
        args += ["--exit-timeout-s", str(self.exit_timeout_s)]
        return args

    @property
    def urls(self) -> ServerUrls:
        """Where the server answers (a 0.0.0.0 bind is reached on 127.0.0.1 from here)."""
        wildcard = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}  # noqa: S104
        host = wildcard.get(self.host, self.host)
        host = f"[{host}]" if ":" in host else host
        return ServerUrls(
            f"http://{host}:{self.http_port}",
            f"grpc://{host}:{self.grpc_port}",
            f"http://{host}:{self.metrics_port}/metrics",
        )


@dataclass(frozen=True)
class ServerUrls:
    """The three endpoints of one server."""

    http: str
    grpc: str
    metrics: str


def check_frames(frames: np.ndarray, max_side: int) -> None:
    """Frames (B, H, W, 3) within the size limit, else a one-line error for that client.

    Depends on H and W only (not on B: Triton refuses empty batches itself), so it refuses
    every request of an execution alike; see the module docstring for why that matters.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise FBClipError(f"frames shape {frames.shape} is not (B, H, W, 3)")
    height, width = frames.shape[1:3]
    if min(height, width) < 1:
        raise FBClipError(f"frame {height}x{width} is empty; send frames of at least 1x1 px")
    if max(height, width) > max_side:
        raise FBClipError(
            f"frame {height}x{width} is larger than this server's limit of {max_side} px a "
            "side; resize it on the camera PC, or restart the server with a larger "
            "--max-frame-side"
        )


def _spans(counts: Sequence[int]) -> list[range]:
    """Rows of the concatenated batch that belong to each request."""
    starts = np.cumsum([0, *counts])
    return [range(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:], strict=True)]


class Instance:
    """One model instance: its own backend (a TensorRT context serves one thread at a time),
    shared by the frames and the pixels model under a lock."""

    def __init__(self, backend: Backend, thresholds: Thresholds, max_frame_side: int) -> None:
        self.backend = backend
        self.thresholds = thresholds
        self.max_frame_side = max_frame_side
        self.lock = threading.Lock()
        self.device = backend.input_device
        low = backend.batch_range[0] if backend.batch_range else 1
        self.min_batch = max(1, low)

    def warm_up(self) -> int:
        """Run the network once (first calls are slow); the patch grid side g."""
        size = self.backend.image_size
        _, patch = self._run(torch.zeros(1, 3, size, size, device=self.device))
        return int(patch.shape[-1])

    def _run(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """backend.run, padding a batch below the export's smallest batch."""
        count = pixels.shape[0]
        if count < self.min_batch:
            pad = pixels[-1:].expand(self.min_batch - count, -1, -1, -1)
            pixels = torch.cat([pixels, pad])
        with self.lock:
            score, patch = self.backend.run(pixels)
        return score[:count], patch[:count]

    def frames(self, requests: list[Any]) -> list[dict[str, np.ndarray]]:
        """pytriton callable of the frames model: all requests of one execution at once."""
        arrays = [np.asarray(request[FRAMES_INPUT]) for request in requests]
        for array in arrays:
            check_frames(array, self.max_frame_side)
        batch = [frame for array in arrays for frame in array]
        pixels, sizes = preprocess_frames(batch, self.backend.image_size, self.device)
        shapes = [(int(a.shape[1]), int(a.shape[2])) for a in arrays]
        return self._answer(requests, [len(a) for a in arrays], shapes, pixels, sizes)

    def pixels(self, requests: list[Any]) -> list[dict[str, np.ndarray]]:
        """pytriton callable of the pixels model; maps come back at S x S."""
        arrays = [np.asarray(request[PIXELS_INPUT], dtype=np.float32) for request in requests]
        pixels = torch.from_numpy(np.concatenate(arrays)).to(self.device)
        side = self.backend.image_size
        shapes = [(side, side)] * len(arrays)
        sizes = [(side, side)] * pixels.shape[0]
        return self._answer(requests, [len(a) for a in arrays], shapes, pixels, sizes)

    def _maps(
        self, patch: torch.Tensor, sizes: Sequence[tuple[int, int]], rows: Sequence[int]
    ) -> dict[int, np.ndarray]:
        """Full-resolution maps of `rows`: one anomaly_map call per frame size, as Detector."""
        groups: dict[tuple[int, int], list[int]] = {}
        for row in rows:
            height, width = sizes[row]
            groups.setdefault((int(height), int(width)), []).append(row)
        maps: dict[int, np.ndarray] = {}
        for size, members in groups.items():
            full = anomaly_map(patch[members].to(self.device), size, SIGMA)
            maps.update(zip(members, full.float().cpu().numpy(), strict=True))
        return maps

    def _answer(
        self,
        requests: list[Any],
        counts: list[int],
        shapes: list[tuple[int, int]],
        pixels: torch.Tensor,
        sizes: Sequence[tuple[int, int]],
    ) -> list[dict[str, np.ndarray]]:
        """Run the batch once; give each request the outputs it named (all if none)."""
        if pixels.shape[0] == 0:
            raise FBClipError("the requests hold no frames; send at least one")
        score, patch = self._run(pixels)
        scores = score.float().cpu().numpy()
        patches = patch.float().cpu().numpy()[:, 0]
        wanted = [set(request.requested_output_names or OUTPUTS) for request in requests]
        spans = _spans(counts)
        map_rows = [
            row
            for span, names in zip(spans, wanted, strict=True)
            if names & MAP_OUTPUTS
            for row in span
        ]
        maps = self._maps(patch, sizes, map_rows) if map_rows else {}
        answers = []
        for span, names, shape in zip(spans, wanted, shapes, strict=True):
            rows = list(span)
            frame_maps = None
            if names & MAP_OUTPUTS:
                frame_maps = np.zeros((0, *shape), np.float32)
                if rows:
                    frame_maps = np.stack([maps[row] for row in rows])
            answers.append(self._response(names, scores[rows], patches[rows], frame_maps))
        return answers

    def _response(
        self, names: set[str], scores: np.ndarray, patches: np.ndarray, maps: np.ndarray | None
    ) -> dict[str, np.ndarray]:
        """One request's outputs, only those it named. As in Detector, the score is compared
        with the image threshold in double precision and map pixels in float32."""
        limits = self.thresholds
        response: dict[str, np.ndarray] = {}
        if "image_score" in names:
            response["image_score"] = scores[:, None]
        if "is_anomalous" in names:
            response["is_anomalous"] = scores[:, None].astype(np.float64) >= limits.image
        if maps is not None and "anomaly_map" in names:
            response["anomaly_map"] = maps
        if maps is not None and "defect_mask" in names:
            response["defect_mask"] = maps >= limits.pixel
        if "patch_map" in names:
            response["patch_map"] = patches
        if "thresholds" in names:
            row = np.array([limits.image, limits.pixel, float(limits.calibrated)], np.float64)
            response["thresholds"] = np.tile(row, (len(scores), 1))
        return response


def _output_tensors(grid: int) -> list[Any]:
    from pytriton.model_config import Tensor

    return [
        Tensor(name="image_score", dtype=np.float32, shape=(1,)),
        Tensor(name="is_anomalous", dtype=np.bool_, shape=(1,)),
        Tensor(name="anomaly_map", dtype=np.float32, shape=(-1, -1)),
        Tensor(name="defect_mask", dtype=np.bool_, shape=(-1, -1)),
        Tensor(name="patch_map", dtype=np.float32, shape=(grid, grid)),
        Tensor(name="thresholds", dtype=np.float64, shape=(3,)),  # exact, as the manifest
    ]


def _check_port_free(host: str, port: int, option: str) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise FBClipError(
                f"cannot listen on {host}:{port} ({error.strerror}); pass another {option}"
            ) from None


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct TCP ports free on `host` right now (for tests and load tests)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class Server:
    """A Triton server in this process: `start()`, `stop()`, or `serve_forever()` (blocks,
    stops on SIGTERM or SIGINT)."""

    config: ServeConfig
    instances: list[Instance] = field(default_factory=list)
    max_batch: int = 0
    _triton: Any = None

    @property
    def urls(self) -> ServerUrls:
        """Where the server answers."""
        return self.config.urls

    @property
    def backend_info(self) -> str:
        """What runs the network, e.g. 'onnxruntime cpu fp32, 224 px'."""
        info = self.instances[0].backend.info
        return f"{info.name} {info.device} {info.precision}, {info.image_size} px"

    def _open(self) -> tuple[int, int]:
        """Open one backend per instance; (max_batch, patch grid side)."""
        config = self.config
        thresholds = thresholds_from_artifacts(config.artifacts)
        for _ in range(config.instances):
            backend = open_backend(config.artifacts, backend=config.backend)
            self.instances.append(Instance(backend, thresholds, config.max_frame_side))
        low, high = self.instances[0].backend.batch_range or (1, config.max_batch or 8)
        max_batch = config.max_batch or high
        if max_batch > high:
            raise FBClipError(
                f"--max-batch {max_batch} is above the largest batch ({high}) these artifacts "
                f"were exported for; pass --max-batch {high}, or re-export with --batch "
                f"{low}:{max_batch}:{max_batch}"
            )
        grid = self.instances[0].warm_up()
        for instance in self.instances[1:]:
            instance.warm_up()
        return max_batch, grid

    def start(self) -> Server:
        """Open the backends, bind both models and start Triton; returns when it is ready."""
        reason = unavailable_reason()
        if reason is not None:
            raise FBClipError(reason)
        config = self.config
        config.check()
        for option, port in (
            ("--http-port", config.http_port),
            ("--grpc-port", config.grpc_port),
            ("--metrics-port", config.metrics_port),
        ):
            _check_port_free(config.host, port, option)
        self.instances = []
        self.max_batch, grid = self._open()
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

        size = self.instances[0].backend.image_size
        batcher = DynamicBatcher(max_queue_delay_microseconds=config.max_queue_delay_us)
        model_config = ModelConfig(max_batch_size=self.max_batch, batcher=batcher)
        if not config.dynamic_batching:
            model_config.batcher = None  # Triton's default scheduler: one request per execution
        triton_config = TritonConfig(
            http_address=config.host,
            http_port=config.http_port,
            grpc_address=config.host,
            grpc_port=config.grpc_port,
            metrics_address=config.host,
            metrics_port=config.metrics_port,
            exit_timeout_secs=config.exit_timeout_s,
            allow_gpu_metrics=torch.cuda.is_available(),
        )
        security = TritonSecurityConfig(restricted_endpoints=RESTRICTED_ENDPOINTS)
        triton = Triton(config=triton_config, security_config=security)
        outputs = _output_tensors(grid)
        models = (
            (
                config.model_name,
                [i.frames for i in self.instances],
                Tensor(name=FRAMES_INPUT, dtype=np.uint8, shape=(-1, -1, 3)),
            ),
            (
                pixels_model(config.model_name),
                [i.pixels for i in self.instances],
                Tensor(name=PIXELS_INPUT, dtype=np.float32, shape=(3, size, size)),
            ),
        )
        for name, functions, tensor in models:
            triton.bind(
                model_name=name,
                infer_func=functions,
                inputs=[tensor],
                outputs=outputs,
                config=model_config,
                strict=True,
            )
        try:
            triton.run()
        except Exception as error:
            triton.stop()
            raise FBClipError(f"Triton did not start: {error}; see its log above") from None
        self._triton = triton
        return self

    @property
    def alive(self) -> bool:
        """True while Triton runs."""
        return self._triton is not None and bool(self._triton.is_alive())

    def stop(self) -> None:
        """Stop Triton after it has answered the requests it received (idempotent)."""
        triton, self._triton = self._triton, None
        if triton is not None:
            triton.stop()

    def serve_forever(
        self, on_ready: Callable[[Server], None] | None = None, poll_s: float = 0.5
    ) -> None:
        """Start (unless started), call on_ready, block until SIGTERM or SIGINT, then stop
        without dropping requests in flight. The handlers go in first, so a SIGTERM during
        the start stops the server once it is up instead of orphaning Triton."""
        stop = threading.Event()

        def request_stop(signum: int, frame: FrameType | None) -> None:
            stop.set()

        try:
            previous = {sig: signal.signal(sig, request_stop) for sig in STOP_SIGNALS}
        except ValueError:
            raise FBClipError(
                "serve_forever() handles SIGTERM and must run in the main thread; "
                "elsewhere call start() and stop()"
            ) from None
        try:
            if self._triton is None:
                self.start()
            if on_ready is not None:
                on_ready(self)
            while not stop.wait(poll_s):
                if not self.alive:
                    raise FBClipError("the Triton server exited on its own; see its log above")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.stop()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class ServerProcess:
    """`fbclip-edge serve` as a child process (load tests, tests): `start()` waits until
    Triton is ready, `stop()` sends SIGTERM and waits for a clean exit."""

    def __init__(self, config: ServeConfig, log: Path) -> None:
        self.config = config
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def urls(self) -> ServerUrls:
        """Where the server answers."""
        return self.config.urls

    def log_tail(self, lines: int = 15) -> str:
        """The end of the server's log (for error messages)."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def _ready(self) -> bool:
        """Both models ready (the server reports ready before pytriton has loaded them)."""
        name = self.config.model_name
        for path in (f"v2/models/{name}/ready", f"v2/models/{pixels_model(name)}/ready"):
            try:
                with urllib.request.urlopen(f"{self.urls.http}/{path}", timeout=2) as answer:  # noqa: S310
                    if int(answer.status) != 200:
                        return False
            except OSError:
                return False
        return True

    def spawn(self) -> ServerProcess:
        """Start the child process and return at once (see wait_ready)."""
        command = [sys.executable, "-m", "fbclip_edge", "serve", *self.config.cli_args()]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(  # noqa: S603 - this Python, our own CLI
                command, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> ServerProcess:
        """Wait (bounded) until both models answer ready; the log tail if the server died."""
        if self.process is None:
            self.spawn()
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while not self._ready():
            if self.process.poll() is not None:
                raise FBClipError(
                    f"fbclip-edge serve exited with status {self.process.returncode}:\n"
                    + self.log_tail()
                )
            if time.monotonic() > deadline:
                self.stop()
                raise FBClipError(f"fbclip-edge serve was not ready after {timeout_s:.0f} s")
            time.sleep(0.2)
        return self

    def start(self, timeout_s: float = 120.0) -> ServerProcess:
        """Spawn the server and wait until it is ready."""
        return self.spawn().wait_ready(timeout_s)

    def signal_stop(self) -> None:
        """Send SIGTERM (the server drains, then exits); returns at once."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM, then wait for the exit status (SIGKILL after timeout_s)."""
        if self.process is None:
            return None
        self.signal_stop()
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=10)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def local_config(artifacts: Path, **settings: Any) -> ServeConfig:
    """A loopback ServeConfig on three free ports (tests and load tests)."""
    http, grpc, metrics = free_ports(3)
    config = ServeConfig(Path(artifacts), http_port=http, grpc_port=grpc, metrics_port=metrics)
    return replace(config, **settings)
