"""One inference interface over torch, onnxruntime and TensorRT.

Every backend takes float32 (B, 3, S, S) pixels normalized as `fbclip_edge.preprocess`
makes them and returns image_score (B,) and patch_map (B, 1, g, g) as float32 torch tensors.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fbclip_edge.errors import FBClipError

if TYPE_CHECKING:
    from fbclip_edge.artifacts.manifest import Manifest


@dataclass
class BackendInfo:
    """What actually runs: reported because runtimes fall back silently (onnxruntime does)."""

    name: str
    device: str
    precision: str
    image_size: int
    details: dict[str, Any] = field(default_factory=dict)


class Backend(ABC):
    """Base class: input checking lives here so every backend refuses bad input alike."""

    info: BackendInfo
    # (min, max) batch of the artifacts a backend was opened from; None: any batch.
    batch_range: tuple[int, int] | None = None

    @property
    def image_size(self) -> int:
        """Input side S the backend was built for."""
        return self.info.image_size

    @property
    def input_device(self) -> torch.device:
        """Where `run` wants its input (and where preprocessing should happen)."""
        return torch.device("cpu")

    def check_input(self, pixel_values: torch.Tensor | np.ndarray) -> torch.Tensor:
        """float32 (B, 3, S, S) tensor or array, else a one-line error naming the fix."""
        if isinstance(pixel_values, np.ndarray):
            pixel_values = torch.from_numpy(pixel_values)
        if not isinstance(pixel_values, torch.Tensor):
            raise FBClipError(f"run() takes a tensor or array, got {type(pixel_values).__name__}")
        size = self.image_size
        if (
            pixel_values.dim() != 4
            or pixel_values.shape[1] != 3
            or tuple(pixel_values.shape[2:]) != (size, size)
        ):
            raise FBClipError(
                f"pixel_values shape {tuple(pixel_values.shape)} != (B, 3, {size}, {size}); "
                "use fbclip_edge.preprocess(frames, image_size) first"
            )
        if pixel_values.dtype != torch.float32:
            raise FBClipError(
                f"pixel_values dtype {pixel_values.dtype} != float32; use fbclip_edge.preprocess"
            )
        if pixel_values.shape[0] == 0:
            raise FBClipError("pixel_values has an empty batch")
        if self.batch_range is not None:
            low, high = self.batch_range
            batch = pixel_values.shape[0]
            if not low <= batch <= high:
                raise FBClipError(
                    f"batch {batch} is outside the batch profile {low}..{high} these artifacts "
                    f"were exported for; split the batch, or re-export with "
                    f"--batch {low}:{min(max(batch, low), high)}:{max(batch, high)}"
                )
        return pixel_values

    def run(self, pixel_values: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Checked inference: (image_score (B,), patch_map (B, 1, g, g)), float32."""
        return self._run(self.check_input(pixel_values))

    @abstractmethod
    def _run(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backend-specific inference on checked input."""


@dataclass(frozen=True)
class Box:
    """A detector box in the frame's pixels (x0, y0, x1, y1; may reach past the frame)."""

    x0: float
    y0: float
    x1: float
    y1: float
    label: str
    score: float
    is_anomaly: bool


@dataclass
class FrameResult:
    """One frame from a FrameBackend: the map at the network's S x S, boxes in frame pixels."""

    image_score: float
    anomaly_map: torch.Tensor  # (S, S) float32
    boxes: list[Box]
    position: str | None
    category: str


class FrameBackend(ABC):
    """Backends of methods whose text depends on the frame and its category (FiLo): they
    take the uint8 frames themselves (each method preprocesses them its own way, and a box
    prior reads the original frame) and a category per frame."""

    info: BackendInfo
    categories: tuple[str, ...]

    @property
    def image_size(self) -> int:
        """Side S of the anomaly maps."""
        return self.info.image_size

    def check_categories(self, count: int, categories: list[str]) -> list[str]:
        """One known category per frame, else a one-line error naming the known ones."""
        if len(categories) != count:
            raise FBClipError(f"{count} frames but {len(categories)} categories; give one each")
        for name in categories:
            if name not in self.categories:
                raise FBClipError(
                    f"category {name!r} is not in these artifacts' descriptions (known: "
                    f"{', '.join(self.categories)}); add it to the descriptions file and "
                    "re-import and re-export, or pass a known category"
                )
        return categories

    def run_frames(self, frames: list[np.ndarray], categories: list[str]) -> list[FrameResult]:
        """RGB uint8 (H, W, 3) frames and their categories -> one FrameResult each."""
        for frame in frames:
            if not (
                isinstance(frame, np.ndarray)
                and frame.dtype == np.uint8
                and frame.ndim == 3
                and frame.shape[-1] == 3
            ):
                shape = getattr(frame, "shape", None)
                raise FBClipError(
                    f"frames must be RGB uint8 (H, W, 3) arrays, got {shape} "
                    f"{getattr(frame, 'dtype', type(frame).__name__)}; use "
                    "fbclip_edge.preprocess.to_rgb_uint8"
                )
        if not frames:
            raise FBClipError("run_frames() got an empty batch of frames")
        return self._run_frames(frames, self.check_categories(len(frames), categories))

    @abstractmethod
    def _run_frames(self, frames: list[np.ndarray], categories: list[str]) -> list[FrameResult]:
        """Backend-specific inference on checked input."""


class MapScorer:
    """Projected maps (B, M, T, D) -> image_score, patch_map with the fused kernels, as the
    model's `score` does; used by backends that run only the vision graph."""

    def __init__(
        self,
        text_features: torch.Tensor,
        map_weights: torch.Tensor,
        temperature: float,
        rule: str = "logit_sum",
    ) -> None:
        self.text_features = text_features.float()
        self.map_weights = map_weights.float()
        self.temperature = float(temperature)
        self.rule = rule

    @classmethod
    def for_artifacts(cls, artifacts: Path, manifest: Manifest) -> MapScorer | None:
        """The scorer an export with kernel scoring needs; None when the graph scores itself."""
        if manifest.scoring.value != "kernel":
            return None
        text = torch.from_numpy(np.load(artifacts / manifest.text_features))
        weights = torch.from_numpy(np.load(artifacts / manifest.map_weights))
        return cls(text, weights, manifest.temperature, manifest.score_rule)

    def __call__(self, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores on the maps' device; Triton there when it is CUDA and Triton imports."""
        from fbclip_edge.kernels import score_maps

        if self.text_features.device != maps.device:
            self.text_features = self.text_features.to(maps.device)
            self.map_weights = self.map_weights.to(maps.device)
        image_score, patch_prob = score_maps(
            maps, self.text_features, self.map_weights, self.temperature, rule=self.rule
        )
        side = math.isqrt(patch_prob.shape[1])
        return image_score.float(), patch_prob.float().reshape(-1, 1, side, side)


def run_split(
    pixel_values: torch.Tensor,
    run_batch: int | None,
    infer: Callable[[torch.Tensor], list[torch.Tensor]],
    scorer: MapScorer | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run an exported graph in runs of at most run_batch images (memory), scoring its maps
    with the fused kernels when it is a vision graph, else taking its (score, map) outputs."""
    step = run_batch or pixel_values.shape[0]
    results = []
    for start in range(0, pixel_values.shape[0], step):
        outputs = infer(pixel_values[start : start + step])
        if scorer is not None:
            results.append(scorer(outputs[0]))
        else:
            results.append((outputs[0].float(), outputs[1].float()))
    if len(results) == 1:
        return results[0]
    return torch.cat([r[0] for r in results]), torch.cat([r[1] for r in results])


class TorchBackend(Backend):
    """The PyTorch model itself: the reference every exported backend is compared with."""

    def __init__(
        self,
        model: Any,
        device: str | torch.device | None = None,
        precision: str = "fp32",
        scoring_impl: str = "auto",
    ) -> None:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = {"fp32": torch.float32, "fp16": torch.float16}[precision]
        self.model = model.to(device=device).eval()
        self.dtype = dtype
        self.device = device
        self.scoring_impl = scoring_impl
        self.info = BackendInfo("torch", str(device), precision, model.config.image_size)

    @property
    def input_device(self) -> torch.device:
        """The model's device: frames are preprocessed there."""
        return self.device

    @torch.inference_mode()
    def _run(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = pixel_values.to(self.device, non_blocking=True)
        with torch.autocast(
            self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32
        ):
            maps = self.model.encode_maps(pixels)
        output = self.model.score(maps, impl=self.scoring_impl)
        return output.image_score.float(), output.patch_map.float()
