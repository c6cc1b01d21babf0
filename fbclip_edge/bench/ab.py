"""Interleaved A/B: backends whose bench rows fell inside the machine's drift, timed in
alternating rounds in one process on the same weights and pixels.

The harness times backends one after another, so a slow drift of the machine (a noisy
neighbour, thermal state) can land on one row and not the other; alternating the backends
round by round, each round's best of `repeats` runs of network + scoring, spreads the drift
over all of them. `fbclip-edge bench-ab` writes ab.json and ab.md.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from fbclip_edge.errors import FBClipError
from fbclip_edge.fileio import write_text_atomic

#: backend name -> (runtime backend, precision) opened from one export (exported rows) or
#: the model itself (torch).
AB_BACKENDS: dict[str, tuple[str, str]] = {
    "torch-eager-fp32": ("torch", "fp32"),
    "onnxruntime-cpu": ("onnxruntime", "fp32"),
    "openvino-cpu-fp32": ("openvino", "fp32"),
    "openvino-cpu-bf16": ("openvino", "bf16"),
}


@dataclass(frozen=True)
class ABConfig:
    """What to alternate: backends of one random-weight model, batch, rounds, repeats."""

    backends: tuple[str, ...]
    backbone: str = "ViT-B-16"
    image_size: int = 224
    method: str = "fbclip"
    batch: int = 1
    rounds: int = 4
    repeats: int = 2
    seed: int = 0


@dataclass
class ABResult:
    """Per backend, the best seconds per image of each round, in round order."""

    config: ABConfig
    seconds_per_image: dict[str, list[float]]
    order: list[list[str]]  # the backend order of each round (rotated)
    device: dict[str, object]
    created: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds")
    )

    def images_per_second(self, backend: str) -> list[float]:
        return [1.0 / s for s in self.seconds_per_image[backend]]

    def wins(self, backend: str, over: str) -> int:
        """Rounds in which `backend` was faster than `over`."""
        pairs = zip(self.seconds_per_image[backend], self.seconds_per_image[over], strict=True)
        return sum(a < b for a, b in pairs)


def check_backends(names: tuple[str, ...]) -> None:
    """At least two known backends, else a one-line error listing them."""
    unknown = [n for n in names if n not in AB_BACKENDS]
    if unknown or len(names) < 2:
        raise FBClipError(
            f"bench-ab alternates two or more of {', '.join(AB_BACKENDS)}; got "
            f"{', '.join(names) or 'none'}"
        )


def _runners(
    config: ABConfig, scratch: Path, log: Callable[[str], None]
) -> dict[str, Callable[[torch.Tensor], object]]:
    """One callable per backend: the random-weight model itself, and its fp32 export opened
    by each exported runtime (bf16: OpenVINO's bf16 run of the fp32 graph)."""
    from fbclip_edge.checkpoint import save_model
    from fbclip_edge.export import export_artifacts
    from fbclip_edge.factory import create_model
    from fbclip_edge.runtime import TorchBackend
    from fbclip_edge.runtime import open as open_backend

    model = create_model(
        config.backbone, image_size=config.image_size, seed=config.seed, method=config.method
    ).eval()
    runners: dict[str, Callable[[torch.Tensor], object]] = {}
    exported = [n for n in config.backends if AB_BACKENDS[n][0] != "torch"]
    if exported:
        log("exporting the fp32 graph once for the exported backends (not timed)")
        save_model(model, scratch / "model")
        export_artifacts(
            scratch / "model",
            scratch / "artifacts",
            precision="fp32",
            targets="onnx",
            batch=f"1:{config.batch}:{config.batch}",
        )
    for name in config.backends:
        kind, precision = AB_BACKENDS[name]
        if kind == "torch":
            runners[name] = TorchBackend(model, device="cpu").run
        else:
            runners[name] = open_backend(
                scratch / "artifacts", backend=kind, precision=precision
            ).run
    return runners


def _best_of(run: Callable[[torch.Tensor], object], pixels: torch.Tensor, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(pixels)
        best = min(best, time.perf_counter() - start)
    return best


def run_ab(config: ABConfig, log: Callable[[str], None] | None = None) -> ABResult:
    """Warm every backend once, then `rounds` rounds, each backend's best of `repeats`
    (network + scoring on the same pixels), the order rotated every round."""
    from fbclip_edge.bench.device import describe_device

    check_backends(config.backends)
    say = log or (lambda text: None)
    generator = torch.Generator().manual_seed(config.seed)
    size = config.image_size
    pixels = torch.randn(config.batch, 3, size, size, generator=generator)
    with tempfile.TemporaryDirectory(prefix="fbclip-ab-") as scratch:
        runners = _runners(config, Path(scratch), say)
        for name, run in runners.items():
            say(f"warm-up {name}")
            run(pixels)
        names = list(config.backends)
        times: dict[str, list[float]] = {name: [] for name in names}
        order = []
        for index in range(config.rounds):
            rotated = names[index % len(names) :] + names[: index % len(names)]
            order.append(rotated)
            for name in rotated:
                seconds = _best_of(runners[name], pixels, config.repeats) / config.batch
                times[name].append(seconds)
                say(f"round {index + 1}/{config.rounds} {name}: {1 / seconds:.3f} img/s")
    return ABResult(config, times, order, asdict(describe_device()))


def device_line(device: dict[str, object]) -> str:
    """CPU model, cores, ISA flags and versions: what the A/B ran on."""
    isa = device.get("cpu_isa")
    versions = device.get("versions")
    flags = " ".join(str(flag) for flag in isa) if isinstance(isa, list) else "-"
    shown = ""
    if isinstance(versions, dict):
        shown = ", ".join(f"{name} {version}" for name, version in versions.items() if version)
    cores = device.get("cpu_logical_cores")
    return f"{device.get('cpu_model')}, {cores} logical cores, ISA {flags}; {shown}"


def ab_markdown(result: ABResult) -> str:
    """A table of img/s per round with the median, and round wins against the first."""
    config = result.config
    names = list(config.backends)
    first = names[0]
    rounds = " | ".join(f"round {i + 1}" for i in range(config.rounds))
    lines = [
        f"# Interleaved A/B: {config.method} {config.backbone} @ {config.image_size}, "
        f"batch {config.batch}",
        "",
        f"Date: {result.created}; {config.rounds} rounds, order rotated each round, each "
        f"backend's best of {config.repeats} runs of network + scoring per round (img/s).",
        "",
        f"Device: {device_line(result.device)}",
        "",
        f"| backend | {rounds} | median | rounds faster than {first} |",
        "|---|" + "---|" * (config.rounds + 2),
    ]
    for name in names:
        rates = result.images_per_second(name)
        cells = " | ".join(f"{r:.3f}" for r in rates)
        wins = "-" if name == first else f"{result.wins(name, first)} of {config.rounds}"
        lines.append(f"| {name} | {cells} | {statistics.median(rates):.3f} | {wins} |")
    return "\n".join(lines) + "\n"


def write_ab(result: ABResult, out: Path) -> tuple[Path, Path]:
    """ab.json (config, per-round seconds, orders, device) and ab.md, atomically."""
    payload = {
        "config": asdict(result.config),
        "seconds_per_image": result.seconds_per_image,
        "order": result.order,
        "device": result.device,
        "created": result.created,
    }
    json_path = write_text_atomic(out / "ab.json", json.dumps(payload, indent=2, default=str))
    return json_path, write_text_atomic(out / "ab.md", ab_markdown(result))
