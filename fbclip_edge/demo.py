"""The main job on an embedded default: no downloads, no GPU.

For each method (FB-CLIP, AnomalyCLIP): builds it from its reference fixture when that is
next to the checkout (and checks parity with the authors' outputs), or from the built-in
tiny config with seeded random weights otherwise, then predicts on one small synthetic
inspection set and writes heat-map overlays a person can look at.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fbclip_edge.checkpoint import import_official
from fbclip_edge.data.synthetic import make_synthetic
from fbclip_edge.factory import create_model
from fbclip_edge.line.detector import Detector
from fbclip_edge.line.predict import PredictResult, predict_files
from fbclip_edge.methods import AnomalyModel
from fbclip_edge.postprocess import anomaly_map
from fbclip_edge.runtime import TorchBackend

FIXTURE_ENV = "FBCLIP_FIXTURE"
FIXTURE_FILES = ("clip_openai_state_dict.pt", "fbclip_checkpoint.pth", "golden.pt")
DEMO_METHODS = ("fbclip", "anomalyclip")


def fixture_files(method: str = "fbclip") -> tuple[str, str, str]:
    """CLIP weights, the method's published-format checkpoint and the golden outputs."""
    return ("clip_openai_state_dict.pt", f"{method}_checkpoint.pth", "golden.pt")


def find_fixture(method: str = "fbclip") -> Path | None:
    """$<METHOD>_FIXTURE (FBCLIP_FIXTURE, ANOMALYCLIP_FIXTURE), or
    ../shared/fixtures/<method>-reference-tiny beside the checkout."""
    candidates = [os.environ.get(f"{method.upper()}_FIXTURE")]
    root = Path(__file__).resolve().parents[1]
    candidates += [
        str(root.parent / "shared" / "fixtures" / f"{method}-reference-tiny"),
        str(root / "shared" / "fixtures" / f"{method}-reference-tiny"),
    ]
    for candidate in candidates:
        if candidate and all((Path(candidate) / n).is_file() for n in fixture_files(method)):
            return Path(candidate)
    return None


@dataclass
class DemoResult:
    """What the demo ran and what it found."""

    method: str
    source: str
    image_size: int
    predictions: PredictResult
    parity: dict[str, float] = field(default_factory=dict)


def fixture_parity(model: AnomalyModel, fixture: Path) -> dict[str, float]:
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


def demo_model(method: str, use_fixture: bool, image_size: int) -> tuple[AnomalyModel, str, dict]:
    """The method's model from its reference fixture (with parity) or tiny random weights."""
    fixture = find_fixture(method) if use_fixture else None
    if fixture is None:
        model = create_model("tiny", image_size=image_size, seed=0, method=method)
        return model, "built-in tiny config, random weights (seed 0)", {}
    clip, checkpoint, _ = fixture_files(method)
    model = import_official(
        fixture / clip, fixture / checkpoint, image_size=image_size, method=method
    )
    parity = fixture_parity(model, fixture) if image_size == 518 else {}
    return model, f"reference fixture {fixture}", parity


def run_demo(
    out: str | Path = "demo-out",
    use_fixture: bool = True,
    image_size: int = 518,
    show_progress: bool = True,
    methods: tuple[str, ...] = DEMO_METHODS,
) -> list[DemoResult]:
    """For each method: build the default model (checking parity when its fixture is there),
    then predict on one small synthetic inspection set with heat-map overlays in
    `out/<method>/predictions`."""
    out = Path(out)
    data = out / "data"
    make_synthetic(data, categories=2, images=3, size=224, seed=0, overwrite=True)
    tests = sorted(p / "test" for p in data.iterdir() if (p / "test").is_dir())
    results = []
    for method in methods:
        model, source, parity = demo_model(method, use_fixture, image_size)
        detector = Detector(TorchBackend(model, device="cpu"))
        predictions = predict_files(detector, tests, out / method / "predictions", show_progress)
        results.append(DemoResult(method, source, model.config.image_size, predictions, parity))
    return results
