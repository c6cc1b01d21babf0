"""Shared fixtures: the authors' reference outputs and the model imported from them."""

from __future__ import annotations

import os
from pathlib import Path

# CLI output is asserted on: one line width everywhere (rich wraps at the terminal's, and CI
# has none), set before the CLI's console exists.
os.environ["COLUMNS"] = "200"

import pytest  # noqa: E402
import torch  # noqa: E402

from fbclip_edge.demo import FIXTURE_FILES, find_fixture  # noqa: E402


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    """../shared/fixtures/fbclip-reference-tiny; CI sets FBCLIP_REQUIRE_FIXTURE=1 so a
    missing fixture fails instead of skipping the parity tests."""
    found = find_fixture()
    if found is None:
        message = "reference fixture not found: set FBCLIP_FIXTURE to fbclip-reference-tiny/"
        if os.environ.get("FBCLIP_REQUIRE_FIXTURE") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture(scope="session")
def golden(fixture_dir: Path) -> dict:
    return torch.load(fixture_dir / "golden.pt", map_location="cpu", weights_only=False)


@pytest.fixture(scope="session")
def clip_weights(fixture_dir: Path) -> Path:
    return fixture_dir / FIXTURE_FILES[0]


@pytest.fixture(scope="session")
def official_checkpoint(fixture_dir: Path) -> Path:
    return fixture_dir / FIXTURE_FILES[1]


@pytest.fixture(scope="session")
def reference_model(clip_weights: Path, official_checkpoint: Path):
    from fbclip_edge import import_official

    return import_official(clip_weights, official_checkpoint)


@pytest.fixture(scope="session")
def reference_intermediates(reference_model, golden):
    with torch.no_grad():
        return reference_model.forward_intermediates(golden["pixel_values"])
