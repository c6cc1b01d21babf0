"""Line-inspection API: frames in, score + full-resolution map + decision + defect mask out.

`Detector.open(artifacts)` wraps any runtime backend; preprocessing runs on the backend's
device; `stream` overlaps preprocessing of the next batch with inference of the current.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fbclip_edge.errors import FBClipError
from fbclip_edge.kernels import anomaly_map
from fbclip_edge.preprocess import preprocess, preprocess_tensor, to_rgb_uint8
from fbclip_edge.runtime.base import Backend

_DONE = object()  # end-of-stream marker from the preprocessing worker
# Probabilities: without calibration a frame is anomalous when P(abnormal) >= 0.5.
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class Thresholds:
    """Decision thresholds on the image score and on anomaly-map pixels."""

    image: float = DEFAULT_THRESHOLD
    pixel: float = DEFAULT_THRESHOLD
    calibrated: bool = False
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Detection:
    """One frame's result, at the frame's own resolution."""

    image_score: float
    anomaly_map: np.ndarray  # (H, W) float32
    is_anomalous: bool
    defect_mask: np.ndarray  # (H, W) bool, anomaly_map >= pixel threshold

    @property
    def defect_area(self) -> int:
        """Defect pixels in the frame."""
        return int(self.defect_mask.sum())


Frame = np.ndarray | Image.Image | torch.Tensor


def split_frames(frames: Frame | Sequence[Frame]) -> list[Frame]:
    """One frame or a batch (list, (B, H, W[, C]) array or tensor) -> list of frames."""
    if isinstance(frames, Image.Image):
        return [frames]
    if isinstance(frames, (np.ndarray, torch.Tensor)):
        is_batch = frames.ndim == 4 or (frames.ndim == 3 and frames.shape[-1] not in (1, 3, 4))
        return list(frames) if is_batch else [frames]
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise FBClipError("predict() got an empty batch of frames")
        return list(frames)
    raise FBClipError(f"frames must be arrays, PIL images or tensors, got {type(frames).__name__}")


def _tensor_to_rgb(frame: torch.Tensor) -> torch.Tensor:
    """uint8/uint16 (H, W[, C]) tensor -> uint8 (H, W, 3) on the same device."""
    if frame.dtype == torch.uint16 or frame.dtype == torch.int32:
        frame = (frame.to(torch.float32) / 257.0).round().clamp(0, 255).to(torch.uint8)
    if frame.dtype != torch.uint8:
        raise FBClipError(f"tensor frames must be uint8 or uint16 (H, W[, C]), got {frame.dtype}")
    if frame.ndim == 2:
        frame = frame[..., None]
    if frame.ndim != 3 or frame.shape[-1] not in (1, 3, 4):
        raise FBClipError(f"tensor frame shape {tuple(frame.shape)} is not (H, W), (H, W, 1|3|4)")
    return frame[..., :3].expand(-1, -1, 3) if frame.shape[-1] == 1 else frame[..., :3]


def preprocess_frames(
    frames: list[Frame], image_size: int, device: torch.device
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Frames -> normalized (B, 3, S, S) on `device`, plus each frame's (H, W).

    For a CPU backend this is `fbclip_edge.preprocess` (PIL bicubic, as the reference);
    for a GPU backend the uint8 frames are uploaded and resized there.
    """
    if device.type == "cpu":
        return preprocess_on_host(frames, image_size)
    return preprocess_on_device(frames, image_size, device)


def preprocess_on_host(
    frames: list[Frame], image_size: int
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The reference path: PIL bicubic on the host (GPU tensors are copied back first)."""
    arrays = [
        _tensor_to_rgb(f).cpu().numpy() if isinstance(f, torch.Tensor) else to_rgb_uint8(f)
        for f in frames
    ]
    return preprocess(arrays, image_size), [(a.shape[0], a.shape[1]) for a in arrays]


def preprocess_on_device(
    frames: list[Frame], image_size: int, device: torch.device
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """uint8 frames uploaded as they are, resized and normalized on `device`
    (torch bicubic with antialias: close to PIL, and no host-side resize per frame)."""
    batch, sizes = [], []
    for frame in frames:
        rgb = frame if isinstance(frame, torch.Tensor) else torch.from_numpy(to_rgb_uint8(frame))
        rgb = _tensor_to_rgb(rgb).to(device, non_blocking=True)
        sizes.append((int(rgb.shape[0]), int(rgb.shape[1])))
        batch.append(preprocess_tensor(rgb[None], image_size))
    return torch.cat(batch), sizes


class Detector:
    """Score frames with a backend and decide against calibrated thresholds."""

    def __init__(
        self, backend: Backend, thresholds: Thresholds | None = None, sigma: float = 4.0
    ) -> None:
        self.backend = backend
        self.thresholds = thresholds or Thresholds()
        self.sigma = sigma
        self.device = backend.input_device

    @classmethod
    def open(
        cls, artifacts: str | Path, backend: str = "auto", device: str | None = None, **options: Any
    ) -> Detector:
        """Open an artifacts folder (see `fbclip-edge export`) with its stored calibration.

        A TensorRT backend captures a CUDA graph at batch 1 (the camera case) unless
        `cuda_graph` is given.
        """
        if str(artifacts).startswith(("http://", "grpc://")):  # a `fbclip-edge serve` server
            from fbclip_edge.serve import RemoteBackend

            remote = RemoteBackend(str(artifacts), **options)
            return cls(remote, Thresholds(*remote.thresholds))
        from fbclip_edge.runtime import open as open_backend

        runtime = open_backend(artifacts, backend=backend, device=device, **options)
        capture = getattr(runtime, "enable_cuda_graph", None)
        low, _ = getattr(runtime, "batch_range", None) or (1, 1)
        if capture is not None and "cuda_graph" not in options and low <= 1:
            capture(1)
        return cls(runtime, thresholds_from_artifacts(artifacts))

    @property
    def image_size(self) -> int:
        """Network input side S."""
        return self.backend.image_size

    def _infer(self, pixels: torch.Tensor, sizes: list[tuple[int, int]]) -> list[Detection]:
        image_score, patch_map = self.backend.run(pixels)
        scores = image_score.float().cpu().tolist()  # one transfer for the batch
        patch_map = patch_map.to(self.device)
        maps: dict[int, np.ndarray] = {}
        # One anomaly_map call (and one device-to-host copy) per distinct frame size: a camera
        # batch is usually a single size, so that is one launch for the whole batch.
        for size, indices in _group_by_size(sizes).items():
            rows = patch_map if len(indices) == len(sizes) else patch_map[indices]
            full = anomaly_map(rows, size, self.sigma).float().cpu().numpy()
            maps.update(zip(indices, full, strict=True))
        image, pixel = self.thresholds.image, self.thresholds.pixel
        return [
            Detection(score, maps[index], score >= image, maps[index] >= pixel)
            for index, score in enumerate(scores)
        ]

    def predict(self, frames: Frame | Sequence[Frame]) -> list[Detection]:
        """One frame or a batch -> one Detection per frame (always a list)."""
        batch = split_frames(frames)
        pixels, sizes = preprocess_frames(batch, self.image_size, self.device)
        return self._infer(pixels, sizes)

    def _produce(
        self,
        frames: Iterable[Frame],
        batch_size: int,
        ready: queue.Queue[Any],
        stop: threading.Event,
    ) -> None:
        """Worker: preprocess batches into `ready`; errors are handed over, then _DONE."""
        try:
            chunk: list[Frame] = []
            for frame in frames:
                if stop.is_set():
                    return
                chunk.append(frame)
                if len(chunk) == batch_size:
                    ready.put(preprocess_frames(chunk, self.image_size, self.device))
                    chunk = []
            if chunk:
                ready.put(preprocess_frames(chunk, self.image_size, self.device))
        except BaseException as error:  # raised again in the consumer
            ready.put(error)
        finally:
            ready.put(_DONE)

    def stream(
        self, frames: Iterable[Frame], batch_size: int = 1, prefetch: int = 2
    ) -> Iterator[Detection]:
        """Yield detections in input order; a worker thread preprocesses the next batches
        while the current one runs. No frame is dropped: the queue blocks when full."""
        if batch_size < 1:
            raise FBClipError("batch_size must be >= 1")
        ready: queue.Queue[Any] = queue.Queue(maxsize=max(1, prefetch))
        stop = threading.Event()
        worker = threading.Thread(
            target=self._produce,
            args=(frames, batch_size, ready, stop),
            name="fbclip-preprocess",
            daemon=True,
        )
        worker.start()
        try:
            while (item := ready.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield from self._infer(*item)
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    ready.get_nowait()
                except queue.Empty:
                    worker.join(timeout=0.05)


def _group_by_size(sizes: Sequence[tuple[int, int]]) -> dict[tuple[int, int], list[int]]:
    """Batch indices per distinct (height, width), in first-seen order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(sizes):
        groups.setdefault(size, []).append(index)
    return groups


def thresholds_from_artifacts(artifacts: str | Path) -> Thresholds:
    """The calibration stored in an artifacts manifest, or the uncalibrated defaults."""
    from fbclip_edge.line.thresholds import read_calibration

    calibration = read_calibration(artifacts)
    if calibration is None:
        return Thresholds()
    return Thresholds(
        calibration.image_threshold, calibration.pixel_threshold, True, calibration.as_dict()
    )
