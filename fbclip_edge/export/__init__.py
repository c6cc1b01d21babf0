"""Export a model folder to a self-describing artifacts folder: ONNX, engines, parity report.

Library entry: `export_artifacts(model_dir, out, ...)`; the CLI's `export` command wraps it.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from fbclip_edge.artifacts.manifest import (
    MAP_WEIGHTS,
    PARITY,
    TEXT_FEATURES,
    TIMING_CACHE,
    CpuTiming,
    Manifest,
    ModelRef,
    read_manifest,
    record_files,
    sha256_file,
    write_manifest,
)
from fbclip_edge.artifacts.options import (
    DEFAULT_TOLERANCES,
    BatchProfile,
    GraphRole,
    Precision,
    Scoring,
    Target,
    Tolerance,
    parse_precision,
    parse_scoring,
    parse_targets,
)
from fbclip_edge.checkpoint import WEIGHTS_FILE, atomic_directory, load, versions
from fbclip_edge.errors import FBClipError
from fbclip_edge.export.onnx_graph import (
    OPSET,
    export_graphs,
    export_mixed_precision,
    unsupported_by_tensorrt,
)
from fbclip_edge.export.parity import (
    ParityError,
    ParityReport,
    compare,
    parity_table,
    prepare_images,
    read_parity_images,
    reference_outputs,
)
from fbclip_edge.export.triton_repo import write_triton_repository
from fbclip_edge.methods import AnomalyModel
from fbclip_edge.preprocess import preprocess

Progress = Callable[[str, int, int], None]


@dataclass
class ExportResult:
    """The written folder, its manifest and the parity report."""

    artifacts: Path
    manifest: Manifest
    parity: ParityReport | None


def _tool_versions(with_tensorrt: bool, with_openvino: bool = False) -> dict[str, str]:
    found = {**versions(), "onnx": onnx.__version__}
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        found["onnxruntime"] = onnxruntime.__version__
    if with_openvino:
        import openvino

        found["openvino"] = str(openvino.get_version())
    if with_tensorrt:
        import tensorrt

        found["tensorrt"] = str(tensorrt.__version__)
    return found


class _Steps:
    """Numbered progress callbacks: (description, steps done, total)."""

    def __init__(self, callback: Progress | None, total: int) -> None:
        self.callback, self.total, self.done = callback, total, 0

    def __call__(self, description: str) -> None:
        if self.callback is not None:
            self.callback(description, self.done, self.total)
        self.done += 1

    def finish(self) -> None:
        if self.callback is not None:
            self.callback("done", self.total, self.total)

    def detail(self) -> Progress | None:
        """A callback for a long step's own progress (int8 calibration frames): the text
        changes, the step count stays that of the running step."""
        callback = self.callback
        if callback is None:
            return None
        return lambda text, _done, _total: callback(text, self.done - 1, self.total)


def _cpu_parity_targets(manifest: Manifest, role: GraphRole) -> list[tuple[str, dict]]:
    """The CPU precision's runs: int8 on onnxruntime and (when installed) OpenVINO, bf16 on
    OpenVINO (the float32 graph compiled to bf16)."""
    from fbclip_edge.runtime.openvino import openvino_available

    plans: list[tuple[str, dict]] = []
    precision = manifest.precision.value
    if manifest.precision == Precision.INT8:
        spec = manifest.graph(role, Precision.INT8)
        assert spec is not None  # export_artifacts wrote it
        plans.append((spec.file, {"backend": "onnxruntime", "provider": "cpu"}))
        if openvino_available():
            plans.append((f"{spec.file} (openvino)", {"backend": "openvino", "device": "cpu"}))
    elif manifest.precision == Precision.BF16:
        spec = manifest.graph(role)
        assert spec is not None
        plans.append((f"{spec.file} (openvino bf16)", {"backend": "openvino", "device": "cpu"}))
    return [(label, {**options, "precision": precision}) for label, options in plans]


def _parity_targets(manifest: Manifest, targets: Iterable[Target]) -> list[tuple[str, dict]]:
    """(label, runtime.open kwargs) for every built target: each ONNX graph of the scoring
    role on the best onnxruntime provider, the CPU precision's runs, and the engine."""
    from fbclip_edge.runtime.onnxruntime import available_providers

    role = GraphRole.VISION if manifest.scoring == Scoring.KERNEL else GraphRole.FULL
    provider = "cuda" if "cuda" in available_providers() and torch.cuda.is_available() else "cpu"
    plans: list[tuple[str, dict]] = []
    if Target.ONNX in targets:
        for spec in manifest.graphs:
            if spec.role == role and not spec.precision.cpu_only:
                plans.append(
                    (
                        spec.file,
                        {
                            "backend": "onnxruntime",
                            "provider": provider,
                            "precision": spec.precision.value,
                        },
                    )
                )
    plans += _cpu_parity_targets(manifest, role)
    if Target.TRT in targets and manifest.engine() is not None:
        plans.append((manifest.engine().file, {"backend": "tensorrt"}))  # type: ignore[union-attr]
    return plans


def _check_cpu_precision(
    wanted: Precision, chosen: tuple[Target, ...], targets: object
) -> tuple[Target, ...]:
    """bf16 and int8 are gated on this CPU, so it must have their instructions, and they
    build no engine: 'auto' targets drop trt, an explicit trt is an error."""
    from fbclip_edge.runtime.cpu_features import detect
    from fbclip_edge.runtime.openvino import openvino_available

    if not wanted.cpu_only:
        return chosen
    refusal = detect().refusal(
        wanted,
        "export on a CPU that has them (the parity check runs what deploys), or use "
        "--precision fp32",
    )
    if refusal is not None:
        raise FBClipError(refusal)
    if wanted == Precision.BF16 and not openvino_available():
        raise FBClipError(
            "--precision bf16 runs on OpenVINO (onnxruntime's CPU provider has no bf16 "
            "kernels); install fbclip-edge[openvino], or use --precision int8 or fp32"
        )
    if Target.TRT not in chosen:
        return chosen
    if "auto" not in str(targets).lower():
        raise FBClipError(
            f"--precision {wanted.value} is a CPU precision (onnxruntime, OpenVINO) and "
            "TensorRT builds fp16 or fp32 engines; drop trt from --targets, or use --precision fp16"
        )
    return tuple(target for target in chosen if target != Target.TRT)


def _calibration_pixels(
    calibration: Sequence[np.ndarray] | None,
    frames: Sequence[np.ndarray] | None,
    labels: Sequence[int] | None,
    image_size: int,
) -> torch.Tensor:
    """Good frames for int8 calibration: the given ones, else the parity frames labelled
    good (every one when unlabelled), the synthetic plain plates by default."""
    if calibration is not None:
        if not len(calibration):
            raise FBClipError("no calibration frames given; pass a folder of good images")
        return preprocess(list(calibration), image_size)
    pixels, known, _ = prepare_images(frames, labels, image_size)
    good = [index for index, label in enumerate(known or []) if label == 0]
    return pixels[good] if good else pixels


def export_artifacts(
    model_dir: str | Path,
    out: str | Path,
    *,
    image_size: int | None = None,
    batch: str | BatchProfile = "1:8:32",
    precision: str | Precision = "fp16",
    targets: str | Iterable[str | Target] = "auto",
    scoring: str | Scoring = "kernel",
    parity_frames: Sequence[np.ndarray] | None = None,
    parity_labels: Sequence[int] | None = None,
    calibration_frames: Sequence[np.ndarray] | None = None,
    tolerances: dict[Precision, Tolerance] | None = None,
    workspace_gb: float = 8.0,
    optimization_level: int = 3,
    timing_cache: str | Path | None = None,
    device: str | None = None,
    progress: Progress | None = None,
) -> ExportResult:
    """Write `out` atomically: graphs, text features, map weights, engine, timing cache,
    manifest.json and parity.json; raise ParityError (nothing written) when over tolerance.

    precision bf16 and int8 are CPU precisions, gated on this CPU (see Precision): int8
    adds `<role>.int8.onnx`, calibrated on `calibration_frames` (good frames; default: the
    parity frames labelled good), run by onnxruntime and OpenVINO; bf16 adds no graph and
    is OpenVINO's run of the float32 graph. Their parity runs are also timed, and the
    times stored in the manifest (`cpu_timing`) for runtime.open's 'auto'.
    """
    profile = BatchProfile.parse(batch)
    wanted = parse_precision(precision)
    chosen = _check_cpu_precision(wanted, parse_targets(targets), targets)
    mode = parse_scoring(scoring)
    role = GraphRole.VISION if mode == Scoring.KERNEL else GraphRole.FULL
    with_trt = Target.TRT in chosen
    if with_trt:
        from fbclip_edge.export.tensorrt import BuildSettings, build_engine, import_tensorrt

        import_tensorrt()  # fail before minutes of export, with the install hint
    limits = {**DEFAULT_TOLERANCES, **(tolerances or {})}
    fp16, int8 = wanted == Precision.FP16, wanted == Precision.INT8
    with_openvino = wanted.cpu_only and _openvino_installed()
    rows = (Target.ONNX in chosen) * (1 + fp16) + with_trt + int8 + with_openvino
    total = 6 + fp16 + int8 + with_trt + rows + (Target.TRITON in chosen)
    step = _Steps(progress, total)
    out = Path(out)
    old_cache = Path(timing_cache) if timing_cache else out / TIMING_CACHE

    step("load model")
    folder = Path(model_dir)
    model = load(folder, image_size=image_size)
    config = model.config
    weights_sha = sha256_file(folder / WEIGHTS_FILE)
    with atomic_directory(out) as staging:
        step("write text features and map weights")
        with torch.no_grad():
            np.save(staging / TEXT_FEATURES, model.text_features.detach().float().cpu().numpy())
            np.save(staging / MAP_WEIGHTS, model.map_weights().detach().float().cpu().numpy())
        step("export vision.onnx and full.onnx")
        graphs = list(export_graphs(model, staging))
        build_from = next(g for g in graphs if g.role == role)
        if fp16:
            step(f"mixed-precision {role.value}.fp16.onnx")
            build_from = export_mixed_precision(build_from, staging)
            graphs.append(build_from)
        if int8:
            from fbclip_edge.export.quantize import quantize_int8

            step(f"int8 {role.value}.int8.onnx: calibrate on good frames, quantize")
            pixels = _calibration_pixels(
                calibration_frames, parity_frames, parity_labels, config.image_size
            )
            graphs.append(quantize_int8(build_from, staging, pixels, step.detail()))
        engines = []
        if with_trt:
            rejected = unsupported_by_tensorrt(build_from.ops)
            if rejected:
                raise FBClipError(
                    f"{build_from.file} uses operators TensorRT cannot parse: "
                    f"{', '.join(rejected)}; use --targets onnx"
                )
            step(f"build TensorRT {wanted.value} engine (minutes for ViT-L)")
            settings = BuildSettings(
                profile, wanted, int(workspace_gb * (1 << 30)), optimization_level
            )
            gpu = torch.device(device or "cuda")
            engines.append(
                build_engine(
                    build_from, staging, settings, config.image_size, old_cache, gpu.index or 0
                )
            )
        step("write manifest")
        manifest = Manifest(
            model=ModelRef(
                str(folder.resolve()),
                weights_sha,
                config.backbone.name,
                json.loads(json.dumps(config.to_dict())),
            ),
            image_size=config.image_size,
            patch_size=config.backbone.patch_size,
            grid_size=config.grid_size,
            num_maps=config.num_maps,
            tokens=config.grid_size**2 + 1,
            embed_dim=config.backbone.embed_dim,
            temperature=float(model.scoring.temperature),
            precision=wanted,
            scoring=mode,
            opset=OPSET,
            batch=profile,
            graphs=graphs,
            engines=engines,
            files={},
            versions=_tool_versions(with_trt, with_openvino),
            timing_cache=TIMING_CACHE if engines else None,
            method=model.method,
            score_rule=model.scoring.kind,
        )
        names = [TEXT_FEATURES, MAP_WEIGHTS]
        names += [name for g in graphs for name in (g.file, *g.data_files)]
        names += [e.file for e in engines] + ([TIMING_CACHE] if engines else [])
        if Target.TRITON in chosen:
            step("Triton model repository")
            names += write_triton_repository(manifest, staging)
        record_files(manifest, staging, names)
        write_manifest(manifest, staging)
        read_manifest(staging)  # round trip: what we wrote is what runtimes will read

        step("parity: float32 PyTorch reference")
        report, timing = _parity(
            model, staging, manifest, chosen, parity_frames, parity_labels, limits, device, step
        )
        (staging / PARITY).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        manifest.parity = PARITY
        manifest.cpu_timing = timing
        record_files(manifest, staging, [PARITY])
        write_manifest(manifest, staging)
        if not report.passed:
            raise ParityError(report)
        step("move into place")
    step.finish()
    return ExportResult(out, read_manifest(out), report)


def _parity(
    model: AnomalyModel,
    staging: Path,
    manifest: Manifest,
    targets: tuple[Target, ...],
    frames: Sequence[np.ndarray] | None,
    labels: Sequence[int] | None,
    limits: dict[Precision, Tolerance],
    device: str | None,
    step: Callable[[str], None],
) -> tuple[ParityReport, CpuTiming | None]:
    """Reference once, then every built target through the runtime users will call; the
    CPU runs' times per image, for runtime.open's 'auto'."""
    from fbclip_edge.runtime.cpu_features import detect
    from fbclip_edge.runtime.open import open as open_backend

    pixels, labels, synthetic = prepare_images(frames, labels, manifest.image_size)
    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reference = reference_outputs(model, pixels, labels, manifest.batch, where)
    model.cpu()
    rows = []
    times: dict[str, float] = {}
    for label, options in _parity_targets(manifest, targets):
        step(f"parity: {label}")
        backend = open_backend(staging, **{"device": device, **options})
        tolerance = limits[Precision(backend.info.precision)]
        row = compare(label, backend, pixels, reference, labels, manifest.batch, tolerance)
        rows.append(row)
        if backend.info.device == "cpu" and row.ms_per_image is not None:
            times[f"{backend.info.name} {backend.info.precision}"] = round(row.ms_per_image, 4)
        del backend
    report = ParityReport(
        rows, pixels.shape[0], synthetic, manifest.image_size, reference.description
    )
    cpu = detect()
    batch = min(max(2, manifest.batch.min), manifest.batch.max)
    timing = CpuTiming(cpu.model, cpu.logical_cores, batch, times) if times else None
    return report, timing


def _openvino_installed() -> bool:
    """OpenVINO importable (the runtime module is imported lazily, like every runtime)."""
    from fbclip_edge.runtime.openvino import openvino_available

    return openvino_available()


__all__ = [
    "BatchProfile",
    "ExportResult",
    "GraphRole",
    "ParityError",
    "ParityReport",
    "Precision",
    "Scoring",
    "Target",
    "Tolerance",
    "export_artifacts",
    "parity_table",
    "read_parity_images",
]
