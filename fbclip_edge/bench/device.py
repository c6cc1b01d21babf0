"""Where a benchmark ran: CPU, GPU, Jetson board, library versions, and the measured matmul
rate that achieved TFLOP/s are quoted against.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# Python distributions whose versions decide the numbers; the first installed name wins.
_VERSION_PACKAGES: dict[str, tuple[str, ...]] = {
    "fbclip_edge": ("fbclip-edge",),
    "torch": ("torch",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "openvino": ("openvino",),
    "onnx": ("onnx",),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_libs"),
    "triton": ("triton", "pytorch-triton"),
    "open_clip": ("open_clip_torch",),
    "numpy": ("numpy",),
}
_NVIDIA_SMI_FIELDS = (
    "name",
    "driver_version",
    "clocks.max.sm",
    "clocks.max.mem",
    "clocks.sm",
    "power.limit",
)
_TOOL_TIMEOUT_S = 10.0


@dataclass
class GpuInfo:
    """The CUDA device the GPU backends ran on; clocks and driver come from nvidia-smi."""

    index: int
    name: str
    total_memory_bytes: int
    sm_count: int
    compute_capability: str
    driver: str | None = None
    clock_sm_max_mhz: float | None = None
    clock_mem_max_mhz: float | None = None
    clock_sm_now_mhz: float | None = None
    power_limit_w: float | None = None


@dataclass
class JetsonInfo:
    """Jetson boards differ by module and by power mode far more than by software."""

    model: str
    power_mode: str | None
    tegrastats: bool


@dataclass
class DeviceInfo:
    """Everything needed to tell whether two result files are comparable."""

    label: str
    cpu_model: str
    cpu_logical_cores: int
    torch_threads: int
    # Physical cores (None where cpuinfo does not say) and the ISA flags reduced precision
    # depends on (AVX-512, VNNI, bf16, AMX; fbclip_edge.runtime.cpu_features).
    cpu_physical_cores: int | None
    cpu_isa: list[str]
    host_memory_bytes: int | None
    platform: str
    python: str
    load_average_at_start: tuple[float, float, float] | None
    versions: dict[str, str | None]
    cuda: str | None
    cudnn: int | None
    gpu: GpuInfo | None = None
    jetson: JetsonInfo | None = None


@dataclass
class MatmulCeiling:
    """Best measured rate of one large square matmul: the roof achieved TFLOP/s is set against.

    Best-of rather than median because a ceiling is what the hardware can do, not what it
    usually does while other processes compete for it.
    """

    device: str
    dtype: str
    size: int
    tflops: float
    iterations: int
    note: str


def cpu_model() -> str:
    """'model name' from /proc/cpuinfo (x86), else 'Model'/'Hardware' (ARM), else platform.

    Cloud VMs often report a bare name ('AMD EPYC'); the x86 family and model numbers are
    then appended, since they tell the CPU generation (fbclip_edge.runtime.cpu_features,
    which the runtime's 'auto' matches export timings by).
    """
    from fbclip_edge.runtime.cpu_features import detect

    return detect().model


def host_memory_bytes() -> int | None:
    """MemTotal from /proc/meminfo; None where there is no procfs."""
    with contextlib.suppress(OSError, AttributeError):
        match = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        return int(match.group(1)) * 1024 if match else None
    return None


def package_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that decide the numbers (None: not installed)."""
    versions: dict[str, str | None] = {}
    for key, names in _VERSION_PACKAGES.items():
        versions[key] = None
        for name in names:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                versions[key] = importlib.metadata.version(name)
                break
    # this package's own version from its source, not from the install's metadata: an
    # editable install keeps the version it was installed with
    from fbclip_edge.version import __version__

    versions["fbclip_edge"] = __version__
    if versions["tensorrt"] is None:
        # Jetson installs TensorRT from apt: importable, but without pip metadata.
        with contextlib.suppress(Exception):
            import tensorrt

            versions["tensorrt"] = str(tensorrt.__version__)
    return versions


def _run_tool(args: list[str]) -> str | None:
    """stdout of a system tool (nvidia-smi, nvpmodel) or None when absent or failing."""
    path = shutil.which(args[0])
    if path is None:
        return None
    try:
        done = subprocess.run(  # noqa: S603 (fixed argument list, tool found on PATH)
            [path, *args[1:]], capture_output=True, text=True, timeout=_TOOL_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _number(text: str) -> float | None:
    with contextlib.suppress(ValueError):
        return float(text)
    return None


def gpu_info(index: int = 0) -> GpuInfo | None:
    """torch's device properties plus nvidia-smi's clocks and driver (absent on Jetson)."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(index)
    info = GpuInfo(
        index=index,
        name=props.name,
        total_memory_bytes=int(props.total_memory),
        sm_count=int(props.multi_processor_count),
        compute_capability=f"{props.major}.{props.minor}",
    )
    query = ",".join(_NVIDIA_SMI_FIELDS)
    out = _run_tool(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits",
                     f"--id={index}"])
    if out and out.strip():
        values = [part.strip() for part in out.strip().splitlines()[0].split(",")]
        if len(values) == len(_NVIDIA_SMI_FIELDS):
            info.driver = values[1]
            info.clock_sm_max_mhz = _number(values[2])
            info.clock_mem_max_mhz = _number(values[3])
            info.clock_sm_now_mhz = _number(values[4])
            info.power_limit_w = _number(values[5])
    return info


def jetson_info() -> JetsonInfo | None:
    """Board model from the device tree and power mode from nvpmodel; None off Jetson."""
    model_file = Path("/proc/device-tree/model")
    try:
        model = model_file.read_text(errors="replace").strip("\x00 \n")
    except OSError:
        return None
    if "jetson" not in model.lower() and not Path("/etc/nv_tegra_release").exists():
        return None
    mode_text = _run_tool(["nvpmodel", "-q"])
    power_mode = None
    if mode_text:
        match = re.search(r"NV Power Mode:\s*(.+)", mode_text)
        power_mode = match.group(1).strip() if match else mode_text.strip().splitlines()[0]
    return JetsonInfo(model, power_mode, shutil.which("tegrastats") is not None)


def device_label(gpu: GpuInfo | None, jetson: JetsonInfo | None, cpu: str, cores: int) -> str:
    """Short folder-safe name: the Jetson model, else the GPU, else the CPU and core count."""
    if jetson is not None:
        name = jetson.model
    elif gpu is not None:
        name = gpu.name
    else:
        name = f"{cpu.split(' (')[0]} {cores}c"
    for noise in ("NVIDIA", "(R)", "(TM)", "Processor", "Developer Kit", "CPU"):
        name = name.replace(noise, " ")
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown"


def load_average() -> tuple[float, float, float] | None:
    """1/5/15-minute load averages: other work on the machine skews every number."""
    with contextlib.suppress(OSError, AttributeError):
        one, five, fifteen = os.getloadavg()
        return round(one, 2), round(five, 2), round(fifteen, 2)
    return None


def describe_device() -> DeviceInfo:
    """Describe this machine once per run (a few tool calls, well under a second)."""
    from fbclip_edge.runtime.cpu_features import detect

    cpu = cpu_model()
    cores = os.cpu_count() or 1
    gpu = gpu_info()
    jetson = jetson_info()
    features = detect()
    return DeviceInfo(
        label=device_label(gpu, jetson, cpu, cores),
        cpu_model=cpu,
        cpu_logical_cores=cores,
        torch_threads=torch.get_num_threads(),
        cpu_physical_cores=features.physical_cores,
        cpu_isa=features.isa,
        host_memory_bytes=host_memory_bytes(),
        platform=platform.platform(),
        python=platform.python_version(),
        load_average_at_start=load_average(),
        versions=package_versions(),
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        gpu=gpu,
        jetson=jetson,
    )


@dataclass
class CpuSnapshot:
    """Machine-wide busy CPU seconds (/proc/stat) and this process's CPU seconds, at a time."""

    wall: float
    machine_busy: float
    process: float


def cpu_snapshot() -> CpuSnapshot | None:
    """Counters for other_cpu_share; None where /proc/stat is missing (non-Linux)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    ticks = [int(value) for value in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    busy = (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # up to steal, no guest double count
    return CpuSnapshot(time.perf_counter(), busy, time.process_time())


def other_cpu_share(start: CpuSnapshot | None, end: CpuSnapshot | None) -> float | None:
    """Share (0..1) of the machine's CPU time other processes (or the hypervisor: steal)
    used between two snapshots: the contention a measurement ran under."""
    if start is None or end is None or end.wall <= start.wall:
        return None
    others = (end.machine_busy - start.machine_busy) - (end.process - start.process)
    capacity = (end.wall - start.wall) * (os.cpu_count() or 1)
    return round(min(1.0, max(0.0, others / capacity)), 3)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_ceiling(
    device: torch.device | str,
    dtype: torch.dtype,
    size: int | None = None,
    min_seconds: float = 0.5,
) -> MatmulCeiling:
    """Best TFLOP/s of a size x size matmul in dtype on device (2 * n^3 FLOPs per product).

    Defaults: n = 1024 on CPU (tens of ms on a laptop core pair), 8192 on GPU (large enough
    to saturate tensor cores). The float32 matmul precision is left as torch has it
    ('highest', no TF32, by default), so the fp32 ceiling is true fp32; the note records it.
    """
    device = torch.device(device)
    n = size or (8192 if device.type == "cuda" else 1024)
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
    for _ in range(2):
        torch.matmul(a, b)
    _sync(device)
    best = float("inf")
    iterations = 0
    start = time.perf_counter()
    while iterations < 3 or time.perf_counter() - start < min_seconds:
        begin = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - begin)
        iterations += 1
    tflops = 2.0 * n**3 / best / 1e12
    note = f"best of {iterations} products"
    if dtype == torch.float32:
        note += f"; float32 matmul precision '{torch.get_float32_matmul_precision()}'"
    return MatmulCeiling(str(device), str(dtype).replace("torch.", ""), n, tflops, iterations, note)


_POWER_PATTERNS = (
    # JetPack 5/6: "VDD_IN 5012mW/4980mW"; JetPack 4: "POM_5V_IN 3000/2950".
    re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)mW/(\d+)mW"),
    re.compile(r"\b(POM_[A-Z0-9_]+|VDD_[A-Z0-9_]+) (\d+)/(\d+)\b"),
)


def parse_tegrastats_line(line: str) -> dict[str, float]:
    """Instantaneous power per rail in milliwatts from one tegrastats line."""
    rails: dict[str, float] = {}
    for pattern in _POWER_PATTERNS:
        for rail, now, _average in pattern.findall(line):
            rails.setdefault(rail, float(now))
    return rails


@dataclass
class PowerSample:
    """One tegrastats reading: perf_counter time and milliwatts per rail."""

    time: float
    rails: dict[str, float]


class PowerSampler:
    """Runs `tegrastats` in the background so each measurement can report its mean power.

    A no-op where tegrastats is missing (everything but Jetson), so callers need no checks.
    """

    def __init__(self, interval_ms: int = 200) -> None:
        self.interval_ms = interval_ms
        self.samples: list[PowerSample] = []
        self._process: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        """True while tegrastats is running."""
        return self._process is not None

    def start(self) -> PowerSampler:
        """Start tegrastats if it is on PATH."""
        path = shutil.which("tegrastats")
        if path is None:
            return self
        try:
            self._process = subprocess.Popen(  # noqa: S603 (fixed arguments, tool from PATH)
                [path, "--interval", str(self.interval_ms)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        except OSError:
            return self
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            rails = parse_tegrastats_line(line)
            if rails:
                self.samples.append(PowerSample(time.perf_counter(), rails))

    def stop(self) -> None:
        """Stop tegrastats (the process this sampler started, nothing else)."""
        if self._process is None:
            return
        self._process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=_TOOL_TIMEOUT_S)
        if self._thread is not None:
            self._thread.join(timeout=_TOOL_TIMEOUT_S)
        self._process = None

    def mean_mw(self, start: float, end: float) -> dict[str, float] | None:
        """Mean milliwatts per rail over samples taken in [start, end]; None without samples."""
        window = [s for s in self.samples if start <= s.time <= end]
        if not window:
            return None
        rails = {rail for sample in window for rail in sample.rails}
        return {
            rail: round(
                sum(s.rails[rail] for s in window if rail in s.rails)
                / sum(1 for s in window if rail in s.rails),
                1,
            )
            for rail in sorted(rails)
        }
