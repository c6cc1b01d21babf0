"""The zero-shot methods behind one protocol (base.py) and their registry.

Downstream code asks `get_method(name)` for a `MethodSpec` and works with `AnomalyModel`;
nothing outside a method's package imports its internals.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fbclip_edge.errors import FBClipError
from fbclip_edge.methods.anomalyclip.spec import SPEC as ANOMALYCLIP_SPEC
from fbclip_edge.methods.base import AnomalyModel, MethodSpec, ModelOutput, ScoringRule
from fbclip_edge.methods.fbclip.spec import SPEC as FBCLIP_SPEC

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (FBCLIP_SPEC, ANOMALYCLIP_SPEC)}


def get_method(name: str) -> MethodSpec:
    """The registered method, or a one-line error listing the known ones."""
    spec = METHODS.get(str(name).lower())
    if spec is None:
        raise FBClipError(f"unknown method {name!r}; use one of: {', '.join(sorted(METHODS))}")
    return spec


def identify_checkpoint(checkpoint: Mapping[str, Any]) -> str | None:
    """Which method's published layout a loaded checkpoint has (None: none of them)."""
    for name, spec in METHODS.items():
        if spec.looks_like(checkpoint):
            return name
    return None


__all__ = [
    "METHODS",
    "AnomalyModel",
    "MethodSpec",
    "ModelOutput",
    "ScoringRule",
    "get_method",
    "identify_checkpoint",
]
