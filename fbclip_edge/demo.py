"""The main job on an embedded default: no downloads, no GPU.

For each method (FB-CLIP, AnomalyCLIP): builds it from its reference fixture when that is
next to the checkout (and checks parity with the authors' outputs), or from the built-in
tiny config with seeded random weights otherwise, then predicts on one small synthetic
inspection set and writes heat-map overlays a person can look at. FiLo runs when its
fixture is there (it needs the fixture's Grounding DINO and BERT vocabulary): on the
fixture's two frames, by category, with Grounding DINO's boxes in the overlays.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fbclip_edge.checkpoint import import_official
from fbclip_edge.clip.config import BackboneConfig
from fbclip_edge.data.synthetic import make_synthetic
from fbclip_edge.factory import create_model
from fbclip_edge.line.detector import Detector
from fbclip_edge.line.predict import PredictResult, predict_files, write_tables
from fbclip_edge.methods import AnomalyModel
from fbclip_edge.postprocess import anomaly_map
from fbclip_edge.runtime import BackendInfo, FrameBackend, TorchBackend

FIXTURE_ENV = "FBCLIP_FIXTURE"
FIXTURE_FILES = ("clip_openai_state_dict.pt", "fbclip_checkpoint.pth", "golden.pt")
DEMO_METHODS = ("fbclip", "anomalyclip", "filo")


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
        if method == "filo":
            filo = run_filo_demo(out, show_progress) if use_fixture else None
            results += [filo] if filo is not None else []
            continue
        model, source, parity = demo_model(method, use_fixture, image_size)
        detector = Detector(TorchBackend(model, device="cpu"))
        predictions = predict_files(detector, tests, out / method / "predictions", show_progress)
        results.append(DemoResult(method, source, model.config.image_size, predictions, parity))
    return results


def filo_fixture_backbone(config: dict[str, Any]) -> BackboneConfig:
    """The FiLo fixture's tiny CLIP (golden.pt's config): its attention head counts are not
    visible in the weights, so the importer is told them."""
    return BackboneConfig(
        name="filo-tiny",
        embed_dim=config["embed_dim"],
        vision={
            "image_size": config["pretrained_res"],
            "layers": config["vision_layers"],
            "width": config["vision_width"],
            "patch_size": config["patch_size"],
            "head_width": config["vision_width"] // config["vision_heads"],
        },
        text={
            "context_length": config["context_length"],
            "vocab_size": config["vocab_size"],
            "width": config["text_width"],
            "heads": config["text_heads"],
            "layers": config["text_layers"],
        },
        quick_gelu=False,
    )


def filo_fixture_backend(fixture: Path, golden: dict[str, Any]) -> FrameBackend:
    """FiLo + Grounding DINO from the fixture, through the deployment pipeline in torch."""
    from fbclip_edge.methods.filo import import_official as import_filo
    from fbclip_edge.methods.filo.descriptions import parse_descriptions
    from fbclip_edge.methods.filo.grounding import GroundingDetector, GroundingDinoArch
    from fbclip_edge.methods.filo.stages import torch_pipeline
    from fbclip_edge.runtime.filo import FiLoBackend

    model, _ = import_filo(
        fixture / "filo_checkpoint.pth",
        clip_weights=fixture / "clip_openai_state_dict.pt",
        backbone=filo_fixture_backbone(golden["config"]),
    )
    arch = GroundingDinoArch.from_reference(golden["config"]["grounding_dino"])
    detector = GroundingDetector.from_checkpoint(
        fixture / "grounding_dino_checkpoint.pth", fixture / "bert", arch
    )
    keys = ("class_word", "descriptions", "grounding_descriptions")
    table = parse_descriptions(
        {name: {k: entry[k] for k in keys} for name, entry in golden["prompts"].items()}
    )
    info = BackendInfo("torch", "cpu", "fp32", model.config.image_size)
    return FiLoBackend(torch_pipeline(model, table, detector), info)


def run_filo_demo(out: str | Path, show_progress: bool = True) -> DemoResult | None:
    """FiLo on its fixture's two frames (bottle, pcb1): parity of the final maps with the
    authors' outputs, then overlays with the boxes. None when the fixture is not there."""
    fixture = find_fixture("filo")
    if fixture is None or not (fixture / "grounding_dino_checkpoint.pth").is_file():
        return None
    from PIL import Image

    golden = torch.load(fixture / "golden.pt", map_location="cpu", weights_only=False)
    backend = filo_fixture_backend(fixture, golden)
    frames = [golden["images_uint8"][i].numpy() for i in range(len(golden["categories"]))]
    found = backend.run_frames(frames, list(golden["categories"]))
    parity = {
        "image_score": max(
            abs(r.image_score - float(golden["image_score"][i])) for i, r in enumerate(found)
        ),
        "anomaly_map": max(
            (r.anomaly_map - golden["anomaly_map"][i]).abs().max().item()
            for i, r in enumerate(found)
        ),
    }
    data = Path(out) / "data-filo"
    data.mkdir(parents=True, exist_ok=True)
    predictions = Path(out) / "filo" / "predictions"
    merged = PredictResult(out=predictions)
    for frame, category in zip(frames, golden["categories"], strict=True):
        path = data / f"{category}.png"
        Image.fromarray(frame).save(path)
        detector = Detector(backend, category=category)
        merged.rows += predict_files(detector, [path], predictions, show_progress).rows
    write_tables(merged, predictions)
    size = backend.image_size
    return DemoResult("filo", f"reference fixture {fixture}", size, merged, parity)
