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

#: Methods whose text depends on the frame (no frozen (2, D) text, so not an AnomalyModel):
#: they come in through their staged deployment interface (methods/filo/pipeline.py) and
#: have their own entry in each command (import-official, train, export, eval, bench).
STAGED_METHODS: dict[str, str] = {
    "filo": "FiLo's text depends on each frame; it runs as staged networks "
    "(fbclip_edge.methods.filo), not as a frozen-text model"
}


def get_method(name: str) -> MethodSpec:
    """The registered method, or a one-line error listing the known ones."""
    key = str(name).lower()
    spec = METHODS.get(key)
    if spec is None and key in STAGED_METHODS:
        raise FBClipError(
            f"{STAGED_METHODS[key]}; this command takes {', '.join(sorted(METHODS))} "
            "(see the README's FiLo section for FiLo's commands)"
        )
    if spec is None:
        known = ", ".join(sorted([*METHODS, *STAGED_METHODS]))
        raise FBClipError(f"unknown method {name!r}; use one of: {known}")
    return spec


def identify_checkpoint(checkpoint: Mapping[str, Any]) -> str | None:
    """Which method's published layout a loaded checkpoint has (None: none of them)."""
    for name, spec in METHODS.items():
        if spec.looks_like(checkpoint):
            return name
    return None


__all__ = [
    "METHODS",
    "STAGED_METHODS",
    "AnomalyModel",
    "MethodSpec",
    "ModelOutput",
    "ScoringRule",
    "get_method",
    "identify_checkpoint",
]
