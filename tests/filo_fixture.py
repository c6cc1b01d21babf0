"""The FiLo reference fixture (filo-reference-tiny) as ready objects, for the deployment tests:
the golden tensors, the imported model, the Grounding DINO port and the descriptions table."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from fbclip_edge.clip.config import BackboneConfig
from fbclip_edge.demo import filo_fixture_backbone, find_fixture
from fbclip_edge.methods.filo import FiLo, import_official
from fbclip_edge.methods.filo.descriptions import CategoryData, parse_descriptions

ENV = "FILO_FIXTURE"
DESCRIPTION_KEYS = ("class_word", "descriptions", "grounding_descriptions")


def fixture_dir() -> Path:
    """The fixture folder, or a skip (a failure when FBCLIP_REQUIRE_FIXTURE=1)."""
    found = find_fixture("filo")
    if found is None or not (found / "grounding_dino_checkpoint.pth").is_file():
        message = f"FiLo reference fixture not found: set {ENV} to filo-reference-tiny/"
        if os.environ.get("FBCLIP_REQUIRE_FIXTURE") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return found


def load_golden(folder: Path) -> dict[str, Any]:
    return torch.load(folder / "golden.pt", map_location="cpu", weights_only=False)


def backbone(config: dict[str, Any]) -> BackboneConfig:
    """The tiny CLIP of the fixture: head counts are not visible in the weights."""
    return filo_fixture_backbone(config)


def load_model(folder: Path, golden: dict[str, Any]) -> FiLo:
    model, _ = import_official(
        folder / "filo_checkpoint.pth",
        clip_weights=folder / "clip_openai_state_dict.pt",
        backbone=backbone(golden["config"]),
    )
    return model


def descriptions_json(golden: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The fixture's categories as a descriptions file's content."""
    return {
        name: {k: entry[k] for k in DESCRIPTION_KEYS} for name, entry in golden["prompts"].items()
    }


def write_descriptions(golden: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(descriptions_json(golden), indent=1), encoding="utf-8")
    return path


def table(golden: dict[str, Any]) -> dict[str, CategoryData]:
    return parse_descriptions(descriptions_json(golden))


def grounding_detector(folder: Path, golden: dict[str, Any]) -> Any:
    from fbclip_edge.methods.filo.grounding import GroundingDetector, GroundingDinoArch

    arch = GroundingDinoArch.from_reference(golden["config"]["grounding_dino"])
    return GroundingDetector.from_checkpoint(
        folder / "grounding_dino_checkpoint.pth", folder / "bert", arch
    )
