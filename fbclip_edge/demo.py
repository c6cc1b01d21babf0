"""The main job on an embedded default: no downloads, no GPU.

Builds FB-CLIP from the reference fixture when it is next to the checkout (and checks
parity with the authors' outputs), or from the built-in tiny config with seeded random
weights otherwise, then predicts on a small synthetic inspection set and writes heat-map
overlays a person can look at.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fbclip_edge.checkpoint import import_official
from fbclip_edge.data.synthetic import make_synthetic
from fbclip_edge.detector import Detector
from fbclip_edge.factory import create_model
from fbclip_edge.model import FBCLIP
from fbclip_edge.postprocess import anomaly_map
from fbclip_edge.predict import PredictResult, predict_files
from fbclip_edge.runtime import TorchBackend

FIXTURE_ENV = "FBCLIP_FIXTURE"
FIXTURE_FILES = ("clip_openai_state_dict.pt", "fbclip_checkpoint.pth", "golden.pt")


def find_fixture() -> Path | None:
    """$FBCLIP_FIXTURE, or ../shared/fixtures/fbclip-reference-tiny beside the checkout."""
    candidates = [os.environ.get(FIXTURE_ENV)]
    root = Path(__file__).resolve().parents[1]
    candidates += [
        str(root.parent / "shared" / "fixtures" / "fbclip-reference-tiny"),
        str(root / "shared" / "fixtures" / "fbclip-reference-tiny"),
    ]
    for candidate in candidates:
        if candidate and all((Path(candidate) / name).is_file() for name in FIXTURE_FILES):
            return Path(candidate)
    return None


def demo_frames(count: int = 2, size: int = 256, seed: int = 0) -> list[np.ndarray]:
    """A plain textured plate, then the same plate with a dark scratch and a stain."""
    rng = np.random.default_rng(seed)
    base = (150 + 20 * rng.standard_normal((size, size, 1))).clip(0, 255)
    base = np.repeat(base, 3, axis=2) * np.array([1.0, 0.95, 0.85])
    frames = []
    for index in range(count):
        frame = base.copy()
        if index % 2:
            rows = np.arange(size // 4, 3 * size // 4)
            frame[rows, rows // 2 + size // 4] = 20
            yy, xx = np.mgrid[:size, :size]
            frame[(yy - size * 0.7) ** 2 + (xx - size * 0.3) ** 2 < (size * 0.06) ** 2] *= 0.4
        frames.append(frame.clip(0, 255).astype(np.uint8))
    return frames


@dataclass
class DemoResult:
    """What the demo ran and what it found."""

    source: str
    image_size: int
    predictions: PredictResult
    parity: dict[str, float] = field(default_factory=dict)


def fixture_parity(model: FBCLIP, fixture: Path) -> dict[str, float]:
    """Max abs difference to the authors' outputs on the fixture's two (518 px) images."""
    golden = torch.load(fixture / "golden.pt", map_location="cpu", weights_only=False)
    with torch.no_grad():
        output = model(golden["pixel_values"])
    full = anomaly_map(output.patch_map, golden["anomaly_map"].shape[-2:])
    return {
        "image_score": (output.image_score - golden["image_score"]).abs().max().item(),
        "patch_map": (output.patch_map - golden["patch_map"]).abs().max().item(),
        "anomaly_map": (full - golden["anomaly_map"]).abs().max().item(),
    }


def run_demo(
    out: str | Path = "demo-out",
    use_fixture: bool = True,
    image_size: int = 518,
    show_progress: bool = True,
) -> DemoResult:
    """Build the default model (checking parity when the fixture is there), draw a small
    synthetic inspection set, and predict on it with heat-map overlays in `out`."""
    fixture = find_fixture() if use_fixture else None
    parity: dict[str, float] = {}
    if fixture is not None:
        model = import_official(
            fixture / FIXTURE_FILES[0], fixture / FIXTURE_FILES[1], image_size=image_size
        )
        if image_size == 518:
            parity = fixture_parity(model, fixture)
        source = f"reference fixture {fixture}"
    else:
        model = create_model("tiny", image_size=image_size, seed=0)
        source = "built-in tiny config, random weights (seed 0)"
    out = Path(out)
    data = out / "data"
    make_synthetic(data, categories=2, images=3, size=224, seed=0, overwrite=True)
    tests = sorted(p / "test" for p in data.iterdir() if (p / "test").is_dir())
    detector = Detector(TorchBackend(model, device="cpu"))
    predictions = predict_files(detector, tests, out / "predictions", show_progress)
    return DemoResult(source, model.config.image_size, predictions, parity)
