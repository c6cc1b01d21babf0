"""FiLo artifacts as a FrameBackend: the method's pipeline (four networks and the host steps
between them) on torch or onnxruntime, with boxes mapped to frame pixels.

`runtime.open` sends manifests with method 'filo' here. torch reloads the model folder the
artifacts were exported from (and checks it did not change); onnxruntime runs the exported
graphs (`runtime.filo_onnx`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fbclip_edge.artifacts.manifest import Manifest, model_folder
from fbclip_edge.artifacts.options import GraphRole
from fbclip_edge.errors import FBClipError
from fbclip_edge.methods.filo.boxes import BoxResult
from fbclip_edge.methods.filo.pipeline import FiLoPipeline
from fbclip_edge.runtime.base import BackendInfo, Box, FrameBackend, FrameResult

FILO_BACKENDS = ("auto", "torch", "onnxruntime")


def frame_boxes(found: BoxResult | None, height: int, width: int) -> list[Box]:
    """Every kept Grounding DINO box (normalised cx, cy, w, h of the frame: its input keeps
    the frame's aspect ratio, spec 1.2) in the frame's pixels, with label and anomaly flag."""
    if found is None:
        return []
    boxes = []
    for i, (cx, cy, w, h) in enumerate(found.boxes.tolist()):
        boxes.append(
            Box(
                x0=(cx - w / 2) * width,
                y0=(cy - h / 2) * height,
                x1=(cx + w / 2) * width,
                y1=(cy + h / 2) * height,
                label=found.labels[i],
                score=float(found.scores[i]),
                is_anomaly=bool(found.is_anomaly[i]),
            )
        )
    return boxes


class FiLoBackend(FrameBackend):
    """A FiLoPipeline behind the FrameBackend interface; `pipeline.times` holds the
    per-stage seconds (grounding, vision, text, score, host) for the bench."""

    def __init__(self, pipeline: FiLoPipeline, info: BackendInfo) -> None:
        self.pipeline = pipeline
        self.info = info
        self.categories = tuple(sorted(pipeline.host.table))

    def _run_frames(self, frames: list[np.ndarray], categories: list[str]) -> list[FrameResult]:
        results = self.pipeline.run_frames(frames, categories)
        return [
            FrameResult(
                image_score=r.image_score,
                anomaly_map=r.anomaly_map,
                boxes=frame_boxes(r.boxes, frame.shape[0], frame.shape[1]),
                position=r.position,
                category=r.category,
            )
            for r, frame in zip(results, frames, strict=True)
        ]


def _torch_pipeline(
    folder: Path, manifest: Manifest, device: str | None, verify: bool
) -> FiLoPipeline:
    """The model folder recorded in the manifest, refused if it changed since export."""
    from fbclip_edge.methods.filo import load_filo
    from fbclip_edge.methods.filo.stages import torch_pipeline

    model_dir = model_folder(folder, manifest, verify)
    loaded = load_filo(model_dir, device=device or "cpu")
    return torch_pipeline(loaded.model, loaded.table, loaded.detector)


def open_filo(
    folder: Path,
    manifest: Manifest,
    backend: str = "auto",
    provider: str | None = None,
    device: str | None = None,
    precision: str | None = None,
    verify: bool = True,
    threads: int | None = None,
) -> FiLoBackend:
    """FiLo artifacts on torch or onnxruntime ('auto': onnxruntime when installed)."""
    if backend not in FILO_BACKENDS:
        raise FBClipError(
            f"FiLo artifacts run on {' or '.join(FILO_BACKENDS[1:])}, not {backend!r} (its "
            "Grounding DINO and per-image text have no TensorRT or OpenVINO path yet)"
        )
    why = f"asked for {backend}"
    if backend == "auto":
        from fbclip_edge.runtime.onnxruntime import available_providers

        has_ort = bool(available_providers())
        backend = "onnxruntime" if has_ort else "torch"
        why = "onnxruntime installed" if has_ort else "onnxruntime not installed"
    if backend == "torch":
        if precision not in (None, "fp32") or provider is not None or threads is not None:
            raise FBClipError("backend='torch' for FiLo runs fp32 and takes only device")
        pipeline = _torch_pipeline(folder, manifest, device, verify)
        name, where, runs = "torch", device or "cpu", "fp32"
    else:
        from fbclip_edge.runtime.filo_onnx import open_onnx_pipeline, select_graphs

        where = provider or "cpu"
        pipeline = open_onnx_pipeline(folder, manifest, where, precision, threads, verify)
        # what runs: the vision graph's precision (fp16 on a GPU provider when exported)
        runs = select_graphs(manifest, where, precision)[GraphRole.VISION].precision.value
        name = "onnxruntime"
    info = BackendInfo(name, where, runs, manifest.image_size)
    info.details.update(method="filo", selected=why, artifacts=str(folder))
    return FiLoBackend(pipeline, info)
