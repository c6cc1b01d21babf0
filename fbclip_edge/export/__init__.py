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

Progress = Callable[[str, int, int], None]


@dataclass
class ExportResult:
    """The written folder, its manifest and the parity report."""

    artifacts: Path
    manifest: Manifest
    parity: ParityReport | None


def _tool_versions(with_tensorrt: bool) -> dict[str, str]:
    found = {**versions(), "onnx": onnx.__version__}
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        found["onnxruntime"] = onnxruntime.__version__
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


def _parity_targets(manifest: Manifest, targets: Iterable[Target]) -> list[tuple[str, dict]]:
    """(label, runtime.open kwargs) for every built target: each ONNX graph of the scoring
    role on the best onnxruntime provider, and the engine."""
    from fbclip_edge.runtime.onnxruntime import available_providers

    role = GraphRole.VISION if manifest.scoring == Scoring.KERNEL else GraphRole.FULL
    provider = "cuda" if "cuda" in available_providers() and torch.cuda.is_available() else "cpu"
    plans: list[tuple[str, dict]] = []
    if Target.ONNX in targets:
        for spec in manifest.graphs:
            if spec.role == role:
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
    if Target.TRT in targets and manifest.engine() is not None:
        plans.append((manifest.engine().file, {"backend": "tensorrt"}))  # type: ignore[union-attr]
    return plans


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
    tolerances: dict[Precision, Tolerance] | None = None,
    workspace_gb: float = 8.0,
    optimization_level: int = 3,
    timing_cache: str | Path | None = None,
    device: str | None = None,
    progress: Progress | None = None,
) -> ExportResult:
    """Write `out` atomically: graphs, text features, map weights, engine, timing cache,
    manifest.json and parity.json; raise ParityError (nothing written) when over tolerance."""
    profile = BatchProfile.parse(batch)
    wanted = parse_precision(precision)
    chosen = parse_targets(targets)
    mode = parse_scoring(scoring)
    role = GraphRole.VISION if mode == Scoring.KERNEL else GraphRole.FULL
    with_trt = Target.TRT in chosen
    if with_trt:
        from fbclip_edge.export.tensorrt import BuildSettings, build_engine, import_tensorrt

        import_tensorrt()  # fail before minutes of export, with the install hint
    limits = {**DEFAULT_TOLERANCES, **(tolerances or {})}
    fp16 = wanted == Precision.FP16
    rows = (Target.ONNX in chosen) * (1 + fp16) + with_trt
    total = 6 + fp16 + with_trt + rows + (Target.TRITON in chosen)
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
            versions=_tool_versions(with_trt),
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
        report = _parity(
            model, staging, manifest, chosen, parity_frames, parity_labels, limits, device, step
        )
        (staging / PARITY).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        manifest.parity = PARITY
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
) -> ParityReport:
    """Reference once, then every built target through the runtime users will call."""
    from fbclip_edge.runtime.open import open as open_backend

    pixels, labels, synthetic = prepare_images(frames, labels, manifest.image_size)
    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reference = reference_outputs(model, pixels, labels, manifest.batch, where)
    model.cpu()
    rows = []
    for label, options in _parity_targets(manifest, targets):
        step(f"parity: {label}")
        backend = open_backend(staging, device=device, **options)
        tolerance = limits[Precision(backend.info.precision)]
        rows.append(compare(label, backend, pixels, reference, labels, manifest.batch, tolerance))
        del backend
    return ParityReport(
        rows, pixels.shape[0], synthetic, manifest.image_size, reference.description
    )


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
