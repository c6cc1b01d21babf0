"""A camera PC's client of `fbclip-edge serve`: frames in, the local `Detection` objects out.

Two ways to the same results:

- `Detector.open("http://host:8000")`: a local Detector over the server's network (pixels
  model); this PC resizes and makes the maps. Pixels of every camera batch together.
- `RemoteDetector.connect("http://host:8000", maps=...)`: uint8 frames go to the server,
  which resizes them and makes the maps; `maps` chooses what comes back over the network.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from fbclip_edge.errors import FBClipError
from fbclip_edge.kernels import anomaly_map
from fbclip_edge.line.detector import Detection, Detector, Frame, Thresholds, split_frames
from fbclip_edge.preprocess import to_rgb_uint8
from fbclip_edge.serve import MODEL, OUTPUT_SETS, SIGMA, RemoteBackend

# What each `maps` choice brings back per frame (besides score and decision):
MAP_CHOICES = {
    "full": "anomaly map and defect mask at frame size (5 bytes a pixel)",
    "patch": "the patch-grid map; the full map and mask are rebuilt here, equal to the server's",
    "mask": "the defect mask only (1 byte a pixel); anomaly_map is empty",
    "score": "nothing: anomaly_map and defect_mask are empty",
}
_EMPTY_MAP = np.zeros((0, 0), np.float32)
_EMPTY_MASK = np.zeros((0, 0), bool)


def rgb_frame(frame: Frame) -> np.ndarray:
    """Any frame the local Detector takes -> uint8 (H, W, 3), as the wire carries it."""
    if isinstance(frame, torch.Tensor):
        frame = frame.detach().cpu().numpy()
    return to_rgb_uint8(frame)


def same_size_runs(frames: Sequence[np.ndarray], limit: int) -> Iterator[list[np.ndarray]]:
    """Consecutive frames of one size, at most `limit` at a time: one request each."""
    run: list[np.ndarray] = []
    for frame in frames:
        if run and (frame.shape != run[0].shape or len(run) == limit):
            yield run
            run = []
        run.append(frame)
    if run:
        yield run


class RemoteDetector(Detector):
    """A Detector whose frames are resized and scored on a `fbclip-edge serve` server.

    One per thread (the underlying tritonclient is not thread-safe).
    """

    def __init__(self, backend: RemoteBackend, maps: str = "full") -> None:
        if maps not in MAP_CHOICES:
            raise FBClipError(f"maps must be one of {', '.join(MAP_CHOICES)}, not {maps!r}")
        image, pixel, calibrated = backend.thresholds
        url = str(backend.connection.endpoint)
        super().__init__(backend, Thresholds(image, pixel, calibrated, {"server": url}), SIGMA)
        self.remote = backend
        self.maps = maps

    @classmethod
    def connect(
        cls, url: str, maps: str = "full", model: str = MODEL, timeout_s: float = 60.0
    ) -> RemoteDetector:
        """Connect to the server at `url` (http://host:8000 or grpc://host:8001)."""
        if maps not in MAP_CHOICES:  # before any network traffic
            raise FBClipError(f"maps must be one of {', '.join(MAP_CHOICES)}, not {maps!r}")
        return cls(RemoteBackend(url, model, timeout_s), maps)

    def predict(
        self, frames: Frame | Sequence[Frame], category: str | None = None
    ) -> list[Detection]:
        """One frame or a batch -> one Detection per frame; one request per run of frames
        of one size (up to the server's max batch)."""
        _no_category(category)
        batch = [rgb_frame(frame) for frame in split_frames(frames)]
        detections: list[Detection] = []
        for run in same_size_runs(batch, self.remote.max_batch):
            outputs = self.remote.infer_frames(np.stack(run), OUTPUT_SETS[self.maps])
            detections.extend(self._detections(outputs, run[0].shape[:2]))
        return detections

    def _detections(self, outputs: dict[str, np.ndarray], size: tuple[int, ...]) -> list[Detection]:
        scores = outputs["image_score"][:, 0]
        decisions = outputs["is_anomalous"][:, 0]
        count = len(scores)
        if self.maps == "full":
            maps, masks = list(outputs["anomaly_map"]), list(outputs["defect_mask"])
        elif self.maps == "patch":
            patch = torch.from_numpy(outputs["patch_map"].copy())[:, None]
            height, width = size
            maps = list(anomaly_map(patch, (height, width), self.sigma).float().numpy())
            masks = [m >= self.thresholds.pixel for m in maps]
        elif self.maps == "mask":
            maps, masks = [_EMPTY_MAP] * count, list(outputs["defect_mask"])
        else:
            maps, masks = [_EMPTY_MAP] * count, [_EMPTY_MASK] * count
        return [
            Detection(float(score), heat, bool(decision), mask)
            for score, decision, heat, mask in zip(scores, decisions, maps, masks, strict=True)
        ]

    def stream(
        self,
        frames: Iterable[Frame],
        batch_size: int = 1,
        prefetch: int = 2,
        category: str | None = None,
    ) -> Iterator[Detection]:
        """Yield detections in input order, `batch_size` frames per request round."""
        _no_category(category)
        if batch_size < 1:
            raise FBClipError("batch_size must be >= 1")
        chunk: list[Any] = []
        for frame in frames:
            chunk.append(frame)
            if len(chunk) == batch_size:
                yield from self.predict(chunk)
                chunk = []
        if chunk:
            yield from self.predict(chunk)

    def close(self) -> None:
        """Close the connection to the server."""
        self.remote.close()

    def __enter__(self) -> RemoteDetector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _no_category(category: str | None) -> None:
    """The server serves methods with frozen text; categories (FiLo) are not served yet."""
    if category is not None:
        raise FBClipError(
            "fbclip-edge serve does not serve FiLo's per-category text yet; drop category=, "
            "or run FiLo artifacts locally with Detector.open(artifacts, category=...)"
        )
