"""Line-inspection API: frames in, score + full-resolution map + decision + defect mask out.

`Detector.open(artifacts)` wraps any runtime backend; preprocessing runs on the backend's
device; `stream` overlaps preprocessing of the next batch with inference of the current.
"""

from __future__ import annotations

import json
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
from fbclip_edge.runtime.base import Backend, Box, FrameBackend, FrameResult

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
    # Methods with a box prior (FiLo): its boxes in frame pixels, the position word that
    # steered the text, and the category the frame was scored as.
    boxes: list[Box] = field(default_factory=list)
    position: str | None = None
    category: str | None = None

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


def frames_as_uint8(frames: list[Frame]) -> list[np.ndarray]:
    """Frames -> RGB uint8 (H, W, 3) host arrays (what a FrameBackend takes)."""
    return [
        _tensor_to_rgb(f).cpu().numpy() if isinstance(f, torch.Tensor) else to_rgb_uint8(f)
        for f in frames
    ]


def map_to_frame(anomaly_map: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """An (S, S) map -> the frame's (H, W): bilinear, untouched when the sizes agree."""
    if tuple(anomaly_map.shape) == size:
        return anomaly_map.float().cpu().numpy()
    resized = torch.nn.functional.interpolate(
        anomaly_map[None, None].float(), size=size, mode="bilinear", align_corners=False
    )
    return resized[0, 0].cpu().numpy()


class Detector:
    """Score frames with a backend and decide against calibrated thresholds.

    A FrameBackend (FiLo) also needs each frame's category: `category` here is the default,
    `predict(..., category=)` overrides it per call; artifacts with one category need none.
    """

    def __init__(
        self,
        backend: Backend | FrameBackend,
        thresholds: Thresholds | None = None,
        sigma: float = 4.0,
        category: str | None = None,
    ) -> None:
        self.backend = backend
        self.thresholds = thresholds or Thresholds()
        self.sigma = sigma
        if isinstance(backend, FrameBackend):
            self.device = torch.device("cpu")
            if category is not None:
                backend.check_categories(1, [category])
            elif len(backend.categories) == 1:
                category = backend.categories[0]
        elif category is not None:
            raise FBClipError(
                "category applies to artifacts of a method with category text (FiLo); "
                "drop category=, these artifacts score every frame alike"
            )
        else:
            self.device = backend.input_device
        self.category = category
        # Per-category thresholds (FiLo, `fbclip-edge calibrate --category`), else `thresholds`.
        self.category_thresholds: dict[str, Thresholds] = {}

    @classmethod
    def open(
        cls,
        artifacts: str | Path,
        backend: str = "auto",
        device: str | None = None,
        category: str | None = None,
        **options: Any,
    ) -> Detector:
        """Open an artifacts folder (see `fbclip-edge export`) with its stored calibration.

        A TensorRT backend captures a CUDA graph at batch 1 (the camera case) unless
        `cuda_graph` is given. category: the default category of FiLo artifacts.
        """
        if str(artifacts).startswith(("http://", "grpc://")):  # a `fbclip-edge serve` server
            from fbclip_edge.serve import RemoteBackend

            remote = RemoteBackend(str(artifacts), **options)
            return cls(remote, Thresholds(*remote.thresholds), category=category)
        from fbclip_edge.runtime import open as open_backend
        from fbclip_edge.runtime import open_frames

        if _manifest_method(artifacts) == "filo":
            frames = open_frames(artifacts, backend=backend, device=device, **options)
            detector = cls(frames, thresholds_from_artifacts(artifacts), category=category)
            detector.category_thresholds = category_thresholds(artifacts)
            return detector
        if category is not None:
            raise FBClipError(
                "category applies to FiLo artifacts only; drop category= for these artifacts"
            )

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

    def _categories(self, count: int, category: str | None) -> list[str]:
        name = category or self.category
        if name is None:
            assert isinstance(self.backend, FrameBackend)
            raise FBClipError(
                "these artifacts score frames by category; pass category= to Detector.open or "
                f"predict (known: {', '.join(self.backend.categories)})"
            )
        return [name] * count

    def _decide(self, result: FrameResult, size: tuple[int, int]) -> Detection:
        full = map_to_frame(result.anomaly_map, size)
        limits = self.category_thresholds.get(result.category, self.thresholds)
        return Detection(
            image_score=result.image_score,
            anomaly_map=full,
            is_anomalous=result.image_score >= limits.image,
            defect_mask=full >= limits.pixel,
            boxes=result.boxes,
            position=result.position,
            category=result.category,
        )

    def _infer_frames(self, frames: list[np.ndarray], category: str | None) -> list[Detection]:
        assert isinstance(self.backend, FrameBackend)
        categories = self._categories(len(frames), category)
        results = self.backend.run_frames(frames, categories)
        return [
            self._decide(result, (frame.shape[0], frame.shape[1]))
            for result, frame in zip(results, frames, strict=True)
        ]

    def _prepare(self, frames: list[Frame]) -> Any:
        """What the worker hands over: uint8 frames for a FrameBackend, else pixels + sizes."""
        if isinstance(self.backend, FrameBackend):
            return frames_as_uint8(frames)
        return preprocess_frames(frames, self.image_size, self.device)

    def _infer_prepared(self, item: Any, category: str | None) -> list[Detection]:
        if isinstance(self.backend, FrameBackend):
            return self._infer_frames(item, category)
        return self._infer(*item)

    def _infer(self, pixels: torch.Tensor, sizes: list[tuple[int, int]]) -> list[Detection]:
        assert isinstance(self.backend, Backend)
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

    def predict(
        self, frames: Frame | Sequence[Frame], category: str | None = None
    ) -> list[Detection]:
        """One frame or a batch -> one Detection per frame (always a list). category
        (FiLo artifacts): the frames' category, overriding the Detector's default."""
        if category is not None and not isinstance(self.backend, FrameBackend):
            raise FBClipError("category applies to FiLo artifacts only; drop category=")
        return self._infer_prepared(self._prepare(split_frames(frames)), category)

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
                    ready.put(self._prepare(chunk))
                    chunk = []
            if chunk:
                ready.put(self._prepare(chunk))
        except BaseException as error:  # raised again in the consumer
            ready.put(error)
        finally:
            ready.put(_DONE)

    def stream(
        self,
        frames: Iterable[Frame],
        batch_size: int = 1,
        prefetch: int = 2,
        category: str | None = None,
    ) -> Iterator[Detection]:
        """Yield detections in input order; a worker thread preprocesses the next batches
        while the current one runs. No frame is dropped: the queue blocks when full."""
        if category is not None and not isinstance(self.backend, FrameBackend):
            raise FBClipError("category applies to FiLo artifacts only; drop category=")
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
                yield from self._infer_prepared(item, category)
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


def _manifest_method(artifacts: str | Path) -> str:
    """The method an artifacts manifest names (FB-CLIP when unreadable: the runtime then
    reports what is wrong with the folder)."""
    from fbclip_edge.artifacts.manifest import MANIFEST

    try:
        manifest = json.loads((Path(artifacts) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "fbclip"
    return str(manifest.get("method", "fbclip")) if isinstance(manifest, dict) else "fbclip"


def _thresholds(calibration: Any) -> Thresholds:
    return Thresholds(
        calibration.image_threshold, calibration.pixel_threshold, True, calibration.as_dict()
    )


def category_thresholds(artifacts: str | Path) -> dict[str, Thresholds]:
    """Per-category calibrations stored in an artifacts manifest (FiLo)."""
    from fbclip_edge.line.thresholds import read_category_calibrations

    found = read_category_calibrations(artifacts)
    return {name: _thresholds(calibration) for name, calibration in found.items()}


def thresholds_from_artifacts(artifacts: str | Path) -> Thresholds:
    """The calibration stored in an artifacts manifest, or the uncalibrated defaults."""
    from fbclip_edge.line.thresholds import read_calibration

    calibration = read_calibration(artifacts)
    return Thresholds() if calibration is None else _thresholds(calibration)
