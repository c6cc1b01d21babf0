"""Kernel microbenchmark: bytes moved, GB/s as a share of measured copy bandwidth, speedup.

Times score_maps and anomaly_map (impl='auto', so Triton on CUDA) against the unfused torch
reference; on CPU it runs a reduced shape so that it stays testable.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fbclip_edge.bench.device import measure_matmul_ceiling
from fbclip_edge.fileio import write_text_atomic
from fbclip_edge.kernels import (
    anomaly_map,
    anomaly_map_torch,
    backend_info,
    score_maps,
    score_maps_torch,
)

TARGET_COPY_SHARE = 0.70  # issue target for score_maps at batch 1 on an H100
TARGET_SPEEDUP = 5.0
FUSION_WORTH = 0.05  # fuse the projection into score_maps only if it could save >= 5% latency


@dataclass(frozen=True)
class BenchShape:
    """Token-map and image geometry: maps M, tokens T (CLS + g*g patches), dim D, image side."""

    name: str
    maps: int
    tokens: int
    dim: int
    image: int

    @property
    def grid(self) -> int:
        """Patch-grid side g (T - 1 = g * g)."""
        side = math.isqrt(self.tokens - 1)
        if side * side != self.tokens - 1:
            raise ValueError(f"tokens - 1 = {self.tokens - 1} is not a square patch grid")
        return side


FULL = BenchShape("ViT-L-14-336 @ 518", maps=15, tokens=1370, dim=768, image=518)
REDUCED = BenchShape("reduced (CPU)", maps=15, tokens=65, dim=64, image=64)


@dataclass(frozen=True)
class KernelCase:
    """One kernel at one batch size; times are medians in milliseconds."""

    kernel: str
    batch: int
    impl: str
    bytes_moved: int
    fused_ms: float
    torch_ms: float
    gbps: float
    copy_share: float
    speedup: float


@dataclass(frozen=True)
class ProjectionFusionBound:
    """The most that fusing the Dv -> D projection GEMM into score_maps could save, per image.

    Fusion keeps the projected maps (M x T x D) out of memory: their write and re-read go
    away, the GEMM's FLOPs stay. The saving is at most those bytes at the measured copy
    bandwidth; the network takes at least its analytic FLOPs at the measured matmul rate. Their
    ratio bounds the latency gain from above (the network never reaches the ceiling).
    """

    model: str
    bytes_saved: int
    saved_us: float
    network_gflop: float
    matmul_tflops: float
    network_floor_us: float

    @property
    def share(self) -> float:
        """Upper bound on the fraction of the network's time that fusion could remove."""
        return self.saved_us / self.network_floor_us

    @property
    def worth_fusing(self) -> bool:
        """Whether the bound reaches FUSION_WORTH of the latency (the issue's 'if the numbers
        justify it')."""
        return self.share >= FUSION_WORTH


def projection_fusion_bound(
    copy_gbps: float,
    matmul_tflops: float,
    itemsize: int,
    backbone: str = "ViT-L-14-336",
    image_size: int = 518,
) -> ProjectionFusionBound:
    """ProjectionFusionBound for one model at one resolution, from measured device rates."""
    from fbclip_edge.clip.backbone import backbone_config
    from fbclip_edge.methods.fbclip.config import FBCLIPConfig
    from fbclip_edge.methods.fbclip.flops import forward_flops

    config = FBCLIPConfig(backbone=backbone_config(backbone), image_size=image_size)
    tokens = (image_size // config.backbone.patch_size) ** 2 + 1
    projected = config.num_maps * tokens * config.backbone.embed_dim * itemsize
    flops = forward_flops(config).total
    return ProjectionFusionBound(
        model=f"{backbone} @ {image_size}",
        bytes_saved=2 * projected,
        saved_us=2 * projected / (copy_gbps * 1e9) * 1e6,
        network_gflop=flops / 1e9,
        matmul_tflops=matmul_tflops,
        network_floor_us=flops / (matmul_tflops * 1e12) * 1e6,
    )


@dataclass(frozen=True)
class KernelBenchReport:
    """A whole run: where it ran, the copy-bandwidth yardstick, and every case."""

    device: str
    device_type: str
    torch_version: str
    backend: dict[str, object]
    shape: BenchShape
    dtype: str
    copy_gbps: float
    copy_bytes: int
    iters: int
    flush_l2: bool
    cases: list[KernelCase] = field(default_factory=list)
    projection_fusion: ProjectionFusionBound | None = None

    def target_met(self) -> bool | None:
        """Issue target (score_maps, batch 1): >= 70% of copy bandwidth and >= 5x over torch.

        None where it does not apply: no batch-1 case, or not a CUDA run.
        """
        first = [c for c in self.cases if c.kernel == "score_maps" and c.batch == 1]
        if not first or self.device_type != "cuda":
            return None
        return first[0].copy_share >= TARGET_COPY_SHARE and first[0].speedup >= TARGET_SPEEDUP

    def as_dict(self) -> dict[str, object]:
        """JSON-ready dict, with the target verdict and the fusion bound's derived fields."""
        data = {**asdict(self), "target_met": self.target_met()}
        if self.projection_fusion is not None:
            bound = self.projection_fusion
            data["projection_fusion"] |= {"share": bound.share, "worth_fusing": bound.worth_fusing}
        return data


def score_bytes(batch: int, shape: BenchShape, itemsize: int) -> int:
    """Compulsory traffic of score_maps: maps and text read once, float32 outputs written."""
    maps = batch * shape.maps * shape.tokens * shape.dim * itemsize
    return maps + 2 * shape.dim * itemsize + shape.maps * 4 + batch * shape.tokens * 4


def map_bytes(batch: int, shape: BenchShape) -> int:
    """Compulsory traffic of anomaly_map: float32 patch grid read, float32 map written."""
    return batch * (shape.grid**2 + shape.image**2) * 4


def device_name(device: torch.device) -> str:
    """Human-readable device name for reports."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        memory = props.total_memory / 2**30
        return f"{props.name} (sm_{props.major}{props.minor}, {memory:.0f} GiB)"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {torch.get_num_threads()} torch threads"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], object],
    device: torch.device,
    iters: int,
    warmup: int,
    flush: torch.Tensor | None = None,
) -> float:
    """Median milliseconds of fn; CUDA events per call, with the L2 flushed before each."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type != "cuda":
        samples = []
        for _ in range(iters):
            started = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - started) * 1e3)
        return statistics.median(samples)
    events = []
    for _ in range(iters):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    _sync(device)
    return statistics.median(start.elapsed_time(end) for start, end in events)


def copy_bandwidth(device: torch.device, nbytes: int, iters: int = 10) -> float:
    """Device-to-device copy GB/s (read + write counted), the achievable-bandwidth yardstick."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, iters, warmup=2)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _copy_size(device: torch.device) -> int:
    if device.type != "cuda":
        return 32 * 2**20
    free, _ = torch.cuda.mem_get_info(device)
    return int(min(2**30, free // 8))


def _flush_buffer(device: torch.device, flush_l2: bool) -> torch.Tensor | None:
    """A buffer twice the L2 size: zeroing it evicts the inputs left by the previous call."""
    if device.type != "cuda" or not flush_l2:
        return None
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 * 2**20
    return torch.empty(2 * l2, dtype=torch.uint8, device=device)


def run_kernel_bench(
    device: str | torch.device | None = None,
    batches: Sequence[int] | None = None,
    shape: BenchShape | None = None,
    dtype: torch.dtype | None = None,
    iters: int | None = None,
    flush_l2: bool = True,
) -> KernelBenchReport:
    """Benchmark both kernels at each batch size; defaults: the full issue setup on CUDA
    (batches 1, 8, 32, fp16 maps), a reduced float32 one on CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    on_cuda = dev.type == "cuda"
    batches = tuple(batches or ((1, 8, 32) if on_cuda else (1, 2)))
    shape = shape or (FULL if on_cuda else REDUCED)
    dtype = dtype or (torch.float16 if on_cuda else torch.float32)
    iters = iters or (50 if on_cuda else 3)
    warmup = 5 if on_cuda else 1
    info = backend_info(dev)
    copy_bytes = _copy_size(dev)
    copy_gbps = copy_bandwidth(dev, copy_bytes)
    flush = _flush_buffer(dev, flush_l2)
    itemsize = torch.empty((), dtype=dtype).element_size()
    matmul = measure_matmul_ceiling(dev, dtype)
    report = KernelBenchReport(
        device_name(dev),
        dev.type,
        torch.__version__,
        info.as_dict(),
        shape,
        str(dtype).removeprefix("torch."),
        copy_gbps,
        copy_bytes,
        iters,
        flush is not None,
        projection_fusion=projection_fusion_bound(copy_gbps, matmul.tflops, itemsize),
    )
    gen = torch.Generator(device=dev).manual_seed(0)
    timing = _Timing(dev, iters, warmup, flush, copy_gbps, info.impl)
    for batch in batches:
        report.cases.append(_bench_score(timing, batch, shape, dtype, gen))
        report.cases.append(_bench_map(timing, batch, shape, gen))
        if on_cuda:
            torch.cuda.empty_cache()
    return report


@dataclass(frozen=True)
class _Timing:
    """How every case of one run is timed and scored."""

    device: torch.device
    iters: int
    warmup: int
    flush: torch.Tensor | None
    copy_gbps: float
    impl: str

    def case(
        self,
        kernel: str,
        batch: int,
        nbytes: int,
        fused: Callable[[], object],
        plain: Callable[[], object],
    ) -> KernelCase:
        """Time the fused call and the unfused torch one on the same inputs."""
        fused_ms = time_ms(fused, self.device, self.iters, self.warmup, self.flush)
        torch_ms = time_ms(plain, self.device, self.iters, self.warmup, self.flush)
        gbps = nbytes / (fused_ms * 1e-3) / 1e9
        return KernelCase(
            kernel,
            batch,
            self.impl,
            nbytes,
            fused_ms,
            torch_ms,
            gbps,
            gbps / self.copy_gbps,
            torch_ms / fused_ms,
        )


def _bench_score(
    timing: _Timing, batch: int, shape: BenchShape, dtype: torch.dtype, gen: torch.Generator
) -> KernelCase:
    dev = timing.device
    maps = torch.randn(batch, shape.maps, shape.tokens, shape.dim, device=dev, generator=gen)
    maps = maps.to(dtype)
    text = torch.randn(2, shape.dim, device=dev, generator=gen).to(dtype)
    weights = torch.rand(shape.maps, device=dev, generator=gen).softmax(0)
    return timing.case(
        "score_maps",
        batch,
        score_bytes(batch, shape, maps.element_size()),
        lambda: score_maps(maps, text, weights),
        lambda: score_maps_torch(maps, text, weights),
    )


def _bench_map(timing: _Timing, batch: int, shape: BenchShape, gen: torch.Generator) -> KernelCase:
    grid = torch.rand(batch, shape.grid**2, device=timing.device, generator=gen)
    size = (shape.image, shape.image)
    return timing.case(
        "anomaly_map",
        batch,
        map_bytes(batch, shape),
        lambda: anomaly_map(grid, size),
        lambda: anomaly_map_torch(grid, size),
    )


def markdown(report: KernelBenchReport) -> str:
    """The report as a Markdown page: context lines, then one table row per case."""
    shape = report.shape
    verdict = {True: "met", False: "not met", None: "not applicable"}[report.target_met()]
    lines = [
        "# Kernel microbenchmark",
        "",
        f"- device: {report.device}, torch {report.torch_version}",
        f"- auto implementation: {report.backend['impl']} ({report.backend['reason']})",
        f"- shape: {shape.name}: M={shape.maps}, T={shape.tokens}, D={shape.dim}, "
        f"grid {shape.grid}x{shape.grid} -> {shape.image}x{shape.image}, maps {report.dtype}",
        f"- copy bandwidth: {report.copy_gbps:.1f} GB/s "
        f"(device-to-device copy of {report.copy_bytes / 2**20:.0f} MiB, read + write)",
        f"- median of {report.iters} calls"
        + (", L2 flushed before each" if report.flush_l2 else ""),
        f"- H100 target (CUDA, score_maps at batch 1: >= {TARGET_COPY_SHARE:.0%} of copy "
        f"bandwidth and >= {TARGET_SPEEDUP:g}x over torch): {verdict}",
        "",
        "| kernel | batch | impl | MB moved | time (us) | GB/s | of copy BW | torch (us) "
        "| speedup |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in report.cases:
        lines.append(
            f"| {c.kernel} | {c.batch} | {c.impl} | {c.bytes_moved / 1e6:.2f} | "
            f"{c.fused_ms * 1e3:.1f} | {c.gbps:.1f} | {c.copy_share:.0%} | "
            f"{c.torch_ms * 1e3:.1f} | {c.speedup:.2f}x |"
        )
    if report.projection_fusion is not None:
        lines += ["", *_fusion_lines(report.projection_fusion, report.dtype)]
    return "\n".join(lines) + "\n"


def _duration(us: float) -> str:
    """Microseconds as us, ms or s, whichever reads best."""
    if us < 1e3:
        return f"{us:.1f} us"
    return f"{us / 1e3:.2f} ms" if us < 1e6 else f"{us / 1e6:.2f} s"


def _fusion_lines(bound: ProjectionFusionBound, dtype: str) -> list[str]:
    verdict = "worth building" if bound.worth_fusing else "not worth building"
    return [
        "## Fusing the Dv -> D projection into score_maps (stretch goal)",
        "",
        f"For {bound.model} with {dtype} maps, fusion would save the projected maps' write and "
        f"re-read: {bound.bytes_saved / 1e6:.1f} MB per image, at most {_duration(bound.saved_us)} "
        f"at the copy bandwidth above. The network needs {bound.network_gflop:.1f} GFLOP per "
        f"image, at least {_duration(bound.network_floor_us)} at this device's measured "
        f"{bound.matmul_tflops:.2f} TFLOP/s {dtype} matmul rate. So fusion could shorten an "
        f"image's network time by at most {bound.share:.2%}: {verdict} "
        f"(threshold {FUSION_WORTH:.0%}).",
    ]


def write_kernel_bench(report: KernelBenchReport, out_dir: str | Path) -> tuple[Path, Path]:
    """Write kernels.json and kernels.md into out_dir (created); returns both paths."""
    out = Path(out_dir)
    json_path, md_path = out / "kernels.json", out / "kernels.md"
    write_text_atomic(json_path, json.dumps(report.as_dict(), indent=2) + "\n")
    write_text_atomic(md_path, markdown(report))
    return json_path, md_path
