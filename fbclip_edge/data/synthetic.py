"""Procedural MVTec-layout anomaly dataset (textures and objects with exact defect masks).

The project's test and demo data: numpy/PIL only, deterministic per seed, seconds to make.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from fbclip_edge.data.image_io import read_image, read_mask
from fbclip_edge.data.layouts import Sample, load_dataset
from fbclip_edge.errors import FBClipError

Style = dict[str, Any]
Rng = np.random.Generator
MANIFEST = "synthetic.json"


@dataclass
class Scene:
    """A clean rendering plus what defects need: where they may go and what lies beneath."""

    image: np.ndarray  # float32 (H, W, 3) in [0, 1]
    support: np.ndarray  # bool (H, W): the surface a defect may touch (object or whole texture)
    backdrop: np.ndarray  # float32 (H, W, 3): what a missing piece reveals


@dataclass(frozen=True)
class Family:
    """A category generator: a per-category style, a per-image drawing, its defect kinds."""

    name: str
    kind: str  # "texture" or "object"
    defects: tuple[str, ...]
    style: Callable[[Rng], Style]
    draw: Callable[[Style, Rng, int], Scene]


# --------------------------------------------------------------------------- noise and colour


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return y, x


def _lattice(rng: Rng, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Value noise at continuous lattice coordinates (smoothstep-interpolated random grid)."""
    u0, v0 = np.floor(u), np.floor(v)
    iu = (u0 - u0.min()).astype(np.intp)
    iv = (v0 - v0.min()).astype(np.intp)
    grid = rng.random((int(iv.max()) + 2, int(iu.max()) + 2), dtype=np.float32)
    fu, fv = u - u0, v - v0
    fu, fv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)
    top = grid[iv, iu] + (grid[iv, iu + 1] - grid[iv, iu]) * fu
    bottom = grid[iv + 1, iu] + (grid[iv + 1, iu + 1] - grid[iv + 1, iu]) * fu
    return top + (bottom - top) * fv


def _fractal(rng: Rng, u: np.ndarray, v: np.ndarray, octaves: int = 3) -> np.ndarray:
    """Sum of octaves stretched to [0, 1], so thresholds mean the same for every image."""
    total = np.zeros_like(u)
    for octave in range(octaves):
        total += _lattice(rng, u * 2**octave, v * 2**octave) * 0.5**octave
    low, high = float(total.min()), float(total.max())
    return (total - low) / max(high - low, 1e-6)


def _rotate(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    return x * c + y * s, -x * s + y * c


def _mix(t: np.ndarray, c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
    return c0 + t[..., None] * (c1 - c0)


def _color(rng: Rng, choices: list[tuple[float, float, float]], jitter: float = 0.04) -> np.ndarray:
    base = np.asarray(choices[int(rng.integers(len(choices)))], dtype=np.float32)
    return np.clip(base + rng.normal(0, jitter, 3), 0, 1).astype(np.float32)


def _luma(color: np.ndarray) -> np.ndarray:
    return color @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)


def _flat(size: int, color: np.ndarray) -> np.ndarray:
    return np.broadcast_to(color, (size, size, 3)).astype(np.float32)


# --------------------------------------------------------------------------- backgrounds

_BACKGROUNDS = [
    (0.05, 0.05, 0.06),
    (0.18, 0.18, 0.2),
    (0.92, 0.92, 0.9),
    (0.75, 0.8, 0.85),
    (0.85, 0.78, 0.62),
    (0.12, 0.3, 0.18),
    (0.45, 0.45, 0.47),
    (0.2, 0.22, 0.35),
]


def _background_style(rng: Rng, object_luma: float) -> Style:
    """A backdrop that contrasts with the object so a missing piece is plainly visible."""
    far = [c for c in _BACKGROUNDS if abs(float(_luma(np.asarray(c))) - object_luma) > 0.3]
    return {
        "bg_color": _color(rng, far or _BACKGROUNDS, 0.03),
        "bg_kind": ["plain", "gradient", "felt", "vignette"][int(rng.integers(4))],
        "bg_angle": float(rng.uniform(0, 2 * np.pi)),
    }


def _background(style: Style, rng: Rng, size: int) -> np.ndarray:
    y, x = _grid(size)
    kind, color = style["bg_kind"], style["bg_color"] * np.float32(rng.uniform(0.94, 1.06))
    if kind == "gradient":
        u, _ = _rotate(x - size / 2, y - size / 2, style["bg_angle"])
        t = 0.85 + 0.3 * (u / size)
    elif kind == "felt":
        t = 0.88 + 0.24 * _fractal(rng, x / 1.5, y / 1.5, 2)
    elif kind == "vignette":
        t = 1.1 - 0.5 * (((x - size / 2) ** 2 + (y - size / 2) ** 2) / (size / 2) ** 2)
    else:
        t = 0.97 + 0.06 * _fractal(rng, x / size * 3, y / size * 3, 2)
    return np.clip(color * t[..., None], 0, 1)


def _center(rng: Rng, size: int, spread: float = 0.03) -> tuple[float, float]:
    dx, dy = rng.normal(0, spread * size, 2)
    return size / 2 + float(dx), size / 2 + float(dy)


def _object_scene(obj: np.ndarray, inside: np.ndarray, style: Style, rng: Rng) -> Scene:
    backdrop = _background(style, rng, inside.shape[0])
    image = np.where(inside[..., None], obj, backdrop)
    return Scene(image.astype(np.float32), inside, backdrop)


def _texture_scene(image: np.ndarray, rng: Rng, backdrop: np.ndarray | None = None) -> Scene:
    """Textures have no object: the whole image is surface, below it a dark torn underlay."""
    size = image.shape[0]
    if backdrop is None:
        y, x = _grid(size)
        under = 0.07 + 0.08 * _fractal(rng, x / 3, y / 3, 2)
        backdrop = np.repeat(under[..., None], 3, axis=2) * np.array([1.0, 0.95, 0.9], np.float32)
    return Scene(np.clip(image, 0, 1).astype(np.float32), np.ones((size, size), bool), backdrop)


# --------------------------------------------------------------------------- texture families


def _wood_style(rng: Rng) -> Style:
    light, dark = [
        ((0.86, 0.7, 0.48), (0.6, 0.4, 0.22)),
        ((0.55, 0.36, 0.22), (0.28, 0.16, 0.09)),
        ((0.78, 0.6, 0.4), (0.5, 0.33, 0.19)),
    ][int(rng.integers(3))]
    return {
        "light": _color(rng, [light], 0.03),
        "dark": _color(rng, [dark], 0.03),
        "angle": float(rng.choice([0.0, np.pi / 2]) + rng.normal(0, 0.05)),
        "rings": float(rng.uniform(5, 12)),
        "warp": float(rng.uniform(1.0, 2.5)),
    }


def _draw_wood(style: Style, rng: Rng, size: int) -> Scene:
    y, x = _grid(size)
    u, v = _rotate(x, y, style["angle"] + rng.normal(0, 0.03))
    warp = _fractal(rng, u / size * 2, v / size * 3, 3)
    rings = v / size * style["rings"] + warp * style["warp"] + rng.uniform(0, 1)
    t = (0.5 + 0.5 * np.sin(2 * np.pi * rings)) ** 1.6
    fibers = _fractal(rng, u / size * 3, v / size * 110, 2)
    return _texture_scene(_mix(0.65 * t + 0.35 * fibers, style["light"], style["dark"]), rng)


def _carpet_style(rng: Rng) -> Style:
    colors = [
        (0.55, 0.12, 0.12),
        (0.2, 0.3, 0.55),
        (0.55, 0.5, 0.4),
        (0.3, 0.45, 0.3),
        (0.45, 0.45, 0.48),
    ]
    return {"color": _color(rng, colors), "threads": float(rng.uniform(18, 30))}


def _draw_carpet(style: Style, rng: Rng, size: int) -> Scene:
    y, x = _grid(size)
    u, v = _rotate(x + rng.uniform(0, 50), y + rng.uniform(0, 50), rng.normal(0, 0.03))
    period = size / style["threads"]
    cu, cv = u / period, v / period
    over = (np.floor(cu) + np.floor(cv)) % 2 == 0
    weave = np.where(over, np.sin(np.pi * (cv % 1)), np.sin(np.pi * (cu % 1))) ** 0.7
    fuzz = _fractal(rng, x / 1.5, y / 1.5, 2)
    low = _fractal(rng, x / size * 3, y / size * 3, 2)
    t = 0.45 + 0.45 * weave * (0.75 + 0.25 * fuzz) + 0.15 * low
    return _texture_scene(style["color"] * t[..., None] * 1.25, rng)


def _leather_style(rng: Rng) -> Style:
    colors = [(0.45, 0.28, 0.16), (0.14, 0.13, 0.12), (0.62, 0.47, 0.32), (0.5, 0.14, 0.1)]
    return {"color": _color(rng, colors), "scale": float(rng.uniform(4, 8))}


def _draw_leather(style: Style, rng: Rng, size: int) -> Scene:
    y, x = _grid(size)
    s = style["scale"] / size
    creases = (1 - np.abs(2 * _fractal(rng, x * s, y * s, 4) - 1)) ** 10
    pores = _fractal(rng, x / 1.6, y / 1.6, 1) ** 3
    low = _fractal(rng, x / size * 2, y / size * 2, 2)
    value = 0.85 + 0.25 * low - 0.45 * creases - 0.2 * pores
    return _texture_scene(style["color"] * value[..., None] * 1.1, rng)


def _tile_style(rng: Rng) -> Style:
    bases = [(0.88, 0.87, 0.84), (0.78, 0.7, 0.58), (0.6, 0.6, 0.62), (0.72, 0.38, 0.25)]
    speckles = [(0.15, 0.15, 0.17), (0.5, 0.35, 0.25), (0.95, 0.95, 0.95), (0.35, 0.42, 0.5)]
    return {
        "base": _color(rng, bases),
        "grout": _color(rng, [(0.55, 0.55, 0.55), (0.25, 0.24, 0.23), (0.92, 0.9, 0.86)]),
        "speckle_a": _color(rng, speckles),
        "speckle_b": _color(rng, speckles),
        "tiles": float(rng.uniform(2.5, 4.5)),
        "density": float(rng.uniform(0.7, 0.82)),
    }


def _draw_tile(style: Style, rng: Rng, size: int) -> Scene:
    y, x = _grid(size)
    period = size / style["tiles"]
    px, py = x + rng.uniform(0, period), y + rng.uniform(0, period)
    grout_width = max(2.0, size / 90)
    grout = ((px % period) < grout_width) | ((py % period) < grout_width)
    ti, tj = (px // period).astype(np.intp), (py // period).astype(np.intp)
    shade = 1 + rng.normal(0, 0.04, (ti.max() + 1, tj.max() + 1)).astype(np.float32)
    image = style["base"] * shade[ti, tj][..., None]
    dots_a = _fractal(rng, x / 2.2, y / 2.2, 1) > style["density"]
    dots_b = _fractal(rng, x / 1.8, y / 1.8, 1) > style["density"] + 0.05
    image = np.where(dots_a[..., None], style["speckle_a"], image)
    image = np.where(dots_b[..., None], style["speckle_b"], image)
    image = np.where(grout[..., None], style["grout"], image)
    return _texture_scene(image, rng)


def _metal_style(rng: Rng) -> Style:
    return {
        "tint": _color(rng, [(0.62, 0.63, 0.66), (0.7, 0.68, 0.62), (0.55, 0.6, 0.68)], 0.03),
        "angle": float(rng.uniform(0, np.pi)),
        "dimples": bool(rng.random() < 0.5),
        "pitch": float(rng.uniform(20, 32)),
    }


def _draw_metal(style: Style, rng: Rng, size: int) -> Scene:
    y, x = _grid(size)
    u, v = _rotate(x, y, style["angle"] + rng.normal(0, 0.02))
    streaks = _fractal(rng, u / size * 2, v / 0.9, 3)
    low = _fractal(rng, x / size * 2, y / size * 2, 2)
    band_axis, _ = _rotate(x, y, style["angle"] + np.pi / 2)
    band = np.exp(-(((band_axis / size) - rng.uniform(0.2, 0.8)) ** 2) / 0.03)
    value = 0.72 + 0.22 * (streaks - 0.5) + 0.1 * low + 0.18 * band
    if style["dimples"]:
        pitch = size / style["pitch"] * 3
        dx, dy = (x % pitch) - pitch / 2, (y % pitch) - pitch / 2
        dimple = np.clip(1 - (dx**2 + dy**2) / (pitch * 0.22) ** 2, 0, 1)
        value = value + 0.25 * dimple * np.sign(dx + dy) * 0.5
    return _texture_scene(style["tint"] * value[..., None], rng)


def _grid_style(rng: Rng) -> Style:
    return {
        "wire": _color(rng, [(0.7, 0.7, 0.72), (0.62, 0.55, 0.4), (0.45, 0.47, 0.5)]),
        "back": _color(rng, [(0.1, 0.1, 0.11), (0.22, 0.2, 0.18)], 0.02),
        "cells": float(rng.uniform(9, 15)),
        "width": float(rng.uniform(0.18, 0.3)),
    }


def _draw_grid(style: Style, rng: Rng, size: int) -> Scene:
    y, x = _grid(size)
    period = size / style["cells"]
    u, v = _rotate(x, y, rng.normal(0, 0.03))
    wave = 1.5 * np.sin(2 * np.pi * v / (period * 4) + rng.uniform(0, 6))
    cu, cv = ((u + wave) / period) % 1 - 0.5, (v / period) % 1 - 0.5
    half = style["width"] / 2
    profile = np.maximum(np.clip(1 - np.abs(cu) / half, 0, 1), np.clip(1 - np.abs(cv) / half, 0, 1))
    back = style["back"] * (0.7 + 0.6 * _fractal(rng, x / 3, y / 3, 2))[..., None]
    wire = style["wire"] * (0.55 + 0.45 * np.sqrt(profile))[..., None]
    image = np.where((profile > 0)[..., None], wire, back)
    # A torn-out patch shows the deeper, shadowed layer: darker than the gaps between wires.
    return _texture_scene(image, rng, backdrop=(back * 0.4).astype(np.float32))


# --------------------------------------------------------------------------- object families


def _bottle_style(rng: Rng) -> Style:
    glass = _color(rng, [(0.38, 0.24, 0.1), (0.16, 0.32, 0.16), (0.56, 0.6, 0.62)])
    return {"glass": glass, "radius": 0.4, **_background_style(rng, float(_luma(glass)))}


def _draw_bottle(style: Style, rng: Rng, size: int) -> Scene:
    y, x = _grid(size)
    cx, cy = _center(rng, size, 0.015)
    big = style["radius"] * size * rng.uniform(0.98, 1.02)
    r = np.sqrt((x - cx) ** 2 + (y - cy) ** 2) / big
    theta = np.arctan2(y - cy, x - cx)
    glass = style["glass"]
    rim = 0.6 + 0.6 * np.cos(np.clip((r - 0.89) / 0.11, -1, 1) * np.pi / 2)
    inner = 1.2 + 0.4 * r + 0.35 * np.maximum(0, np.cos(theta - rng.uniform(0, 6))) ** 4
    hole = 0.12 + 0.5 * (r / 0.35) ** 2
    value = np.where(r > 0.78, rim, np.where(r > 0.35, inner, hole))
    obj = np.clip(glass * value[..., None], 0, 1)
    return _object_scene(obj, r <= 1.0, style, rng)


_PILL_COLORS = [
    (0.85, 0.15, 0.12),
    (0.95, 0.88, 0.3),
    (0.2, 0.35, 0.8),
    (0.93, 0.93, 0.9),
    (0.15, 0.6, 0.3),
    (0.95, 0.55, 0.15),
]


def _capsule_style(rng: Rng) -> Style:
    first, second = rng.choice(len(_PILL_COLORS), 2, replace=False)
    colors = (_color(rng, [_PILL_COLORS[first]]), _color(rng, [_PILL_COLORS[second]]))
    luma = float(_luma((colors[0] + colors[1]) / 2))
    return {"colors": colors, "print": bool(rng.random() < 0.6), **_background_style(rng, luma)}


def _draw_capsule(style: Style, rng: Rng, size: int) -> Scene:
    y, x = _grid(size)
    cx, cy = _center(rng, size, 0.02)
    u, v = _rotate(x - cx, y - cy, rng.normal(0, 0.06))
    length, width = 0.62 * size, 0.25 * size * rng.uniform(0.97, 1.03)
    d = np.sqrt(np.maximum(np.abs(u) - (length - width) / 2, 0) ** 2 + v**2) - width / 2
    n = np.clip(v / (width / 2), -1, 1)
    shade = 0.55 + 0.45 * np.sqrt(1 - n**2) + 0.35 * np.exp(-(((n + 0.4) / 0.12) ** 2))
    obj = np.where((u < 0)[..., None], style["colors"][0], style["colors"][1]) * shade[..., None]
    obj = np.where((np.abs(u) < size / 200)[..., None], obj * 0.7, obj)
    if style["print"]:
        marks = np.zeros_like(u, dtype=bool)
        for k in range(3):
            marks |= (np.abs(u - length * (0.12 + 0.07 * k)) < size / 110) & (np.abs(v) < width / 5)
        obj = np.where(marks[..., None], obj * 0.25, obj)
    return _object_scene(np.clip(obj, 0, 1), d < 0, style, rng)


def _metal_color(rng: Rng) -> np.ndarray:
    return _color(rng, [(0.68, 0.68, 0.7), (0.72, 0.64, 0.45), (0.5, 0.52, 0.56)], 0.03)


def _screw_style(rng: Rng) -> Style:
    metal = _metal_color(rng)
    return {
        "metal": metal,
        "pitch": float(rng.uniform(4, 6)),
        **_background_style(rng, float(_luma(metal))),
    }


def _screw_shape(a: np.ndarray, b: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Head disc at the origin, shaft along +a with a pointed tip; returns (head, shaft)."""
    head_r, shaft_len, half_w = 0.11 * size, 0.5 * size, 0.045 * size
    head = a**2 + b**2 < head_r**2
    taper = np.clip((shaft_len - a) / (2.5 * half_w), 0, 1)
    shaft = (a > 0) & (a < shaft_len) & (np.abs(b) < half_w * taper)
    return head, shaft & ~head


def _draw_screw(style: Style, rng: Rng, size: int) -> Scene:
    y, x = _grid(size)
    angle = rng.uniform(0, 2 * np.pi)
    cx, cy = _center(rng, size, 0.03)
    a, b = _rotate(x - cx, y - cy, angle)
    a = a + 0.22 * size
    head, shaft = _screw_shape(a, b, size)
    head_r, half_w = 0.11 * size, 0.045 * size
    dome = 0.55 + 0.45 * np.sqrt(np.clip(1 - (a**2 + b**2) / head_r**2, 0, 1))
    slot_w = size / 90
    slot = ((np.abs(b) < slot_w) | (np.abs(a) < slot_w)) & (a**2 + b**2 < (0.75 * head_r) ** 2)
    pitch = style["pitch"] * size / 224
    thread = 0.5 + 0.5 * np.sin(2 * np.pi * (a + 0.4 * b) / pitch)
    across = np.sqrt(np.clip(1 - (b / half_w) ** 2, 0, 1))
    value = np.where(
        head, np.where(slot, 0.22, dome), (0.45 + 0.45 * across) * (0.7 + 0.3 * thread)
    )
    obj = np.clip(style["metal"] * value[..., None] * 1.1, 0, 1)
    return _object_scene(obj, head | shaft, style, rng)


def _pcb_layout(rng: Rng) -> Style:
    """Component placement in unit coordinates, shared by every board of the category."""
    traces = []
    for _ in range(int(rng.integers(8, 14))):
        points = [tuple(rng.uniform(0.15, 0.85, 2))]
        for step in range(int(rng.integers(2, 5))):
            last = points[-1]
            axis = step % 2
            moved = list(last)
            moved[axis] = float(np.clip(last[axis] + rng.uniform(-0.3, 0.3), 0.12, 0.88))
            points.append(tuple(moved))
        traces.append(points)
    chips = [(*rng.uniform(0.2, 0.65, 2), *rng.uniform(0.1, 0.2, 2)) for _ in range(2)]
    pads = [tuple(rng.uniform(0.14, 0.86, 2)) for _ in range(int(rng.integers(6, 12)))]
    return {"traces": traces, "chips": chips, "pads": pads}


def _pcb_style(rng: Rng) -> Style:
    board = _color(rng, [(0.1, 0.38, 0.18), (0.1, 0.2, 0.45), (0.1, 0.1, 0.1), (0.45, 0.1, 0.08)])
    copper = _color(rng, [(0.85, 0.68, 0.3), (0.78, 0.78, 0.78)], 0.03)
    return {
        "board": board,
        "copper": copper,
        **_pcb_layout(rng),
        **_background_style(rng, float(_luma(board))),
    }


def _paint_pcb(style: Style, size: int, offset: np.ndarray) -> Image.Image:
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    copper = tuple(int(c * 255) for c in style["copper"])

    def px(point: tuple[float, ...]) -> tuple[float, float]:
        return (point[0] * size + offset[0], point[1] * size + offset[1])

    for trace in style["traces"]:
        draw.line([px(p) for p in trace], fill=copper, width=max(1, size // 110), joint="curve")
    for pad in style["pads"]:
        cx, cy = px(pad)
        radius = size / 60
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=copper)
    for left, top, width, height in style["chips"]:
        x0, y0 = px((left, top))
        x1, y1 = x0 + width * size, y0 + height * size
        for k in range(6):
            pin_x = x0 + (k + 0.5) * (x1 - x0) / 6
            draw.rectangle([pin_x - 1.5, y0 - 4, pin_x + 1.5, y1 + 4], fill=(200, 200, 200))
        draw.rectangle([x0, y0, x1, y1], fill=(25, 25, 28))
    return canvas


def _draw_pcb(style: Style, rng: Rng, size: int) -> Scene:
    y, x = _grid(size)
    offset = rng.normal(0, 0.012 * size, 2)
    layer = np.asarray(_paint_pcb(style, size, offset), dtype=np.float32) / 255
    painted = layer.max(axis=2) > 0
    margin = 0.08 * size
    inside = (
        (x > margin + offset[0])
        & (x < size - margin + offset[0])
        & (y > margin + offset[1])
        & (y < size - margin + offset[1])
    )
    grain = 0.9 + 0.2 * _fractal(rng, x / 2, y / 2, 2)
    board = style["board"] * grain[..., None] * np.float32(rng.uniform(0.95, 1.05))
    obj = np.where(painted[..., None], layer, board)
    return _object_scene(np.clip(obj, 0, 1), inside, style, rng)


def _nut_style(rng: Rng) -> Style:
    metal = _metal_color(rng)
    return {"metal": metal, **_background_style(rng, float(_luma(metal)))}


def _draw_nut(style: Style, rng: Rng, size: int) -> Scene:
    y, x = _grid(size)
    cx, cy = _center(rng, size, 0.02)
    dx, dy = x - cx, y - cy
    rotation = rng.uniform(0, np.pi / 3)
    angles = rotation + np.arange(6) * np.pi / 3
    projections = np.stack([dx * np.cos(t) + dy * np.sin(t) for t in angles])
    apothem = 0.34 * size
    hex_d = projections.max(axis=0) - apothem
    facet = projections.argmax(axis=0)
    facet_light = (0.75 + 0.25 * np.cos(angles - 0.8)).astype(np.float32)[facet]
    r = np.sqrt(dx**2 + dy**2)
    hole_r = 0.15 * size
    value = np.where(hex_d > -0.07 * size, facet_light, 0.95)
    thread = (r < hole_r * 1.2) & (np.sin(r * 2.2) > 0)
    value = np.where(thread, value * 0.6, value)
    texture = 0.9 + 0.2 * _fractal(rng, x / 2, y / 2, 2)
    obj = np.clip(style["metal"] * (value * texture)[..., None], 0, 1)
    return _object_scene(obj, (hex_d < 0) & (r >= hole_r), style, rng)


_INSULATION = [
    (0.3, 0.6, 0.15),
    (0.15, 0.3, 0.75),
    (0.45, 0.28, 0.15),
    (0.2, 0.2, 0.2),
    (0.75, 0.75, 0.75),
    (0.8, 0.15, 0.1),
]


def _cable_style(rng: Rng) -> Style:
    picks = rng.choice(len(_INSULATION), 3, replace=False)
    sheath = _color(rng, [(0.62, 0.62, 0.64), (0.12, 0.12, 0.13), (0.85, 0.5, 0.15)], 0.03)
    return {
        "sheath": sheath,
        "wires": [_color(rng, [_INSULATION[i]], 0.03) for i in picks],
        "phase": float(rng.uniform(0, 2 * np.pi)),
        **_background_style(rng, float(_luma(sheath))),
    }


def _draw_cable(style: Style, rng: Rng, size: int) -> Scene:
    y, x = _grid(size)
    cx, cy = _center(rng, size, 0.02)
    big = 0.42 * size
    r = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
    obj = style["sheath"] * (0.8 + 0.25 * (1 - r / big))[..., None]
    obj = np.where((r < 0.9 * big)[..., None], np.array([0.86, 0.85, 0.8], np.float32), obj)
    strands = 0.75 + 0.25 * np.sin(x / 1.3) * np.sin(y / 1.3)
    copper = np.array([0.85, 0.55, 0.3], np.float32) * strands[..., None]
    for k, color in enumerate(style["wires"]):
        phi = style["phase"] + k * 2 * np.pi / 3 + rng.normal(0, 0.06)
        wx, wy = cx + 0.45 * big * np.cos(phi), cy + 0.45 * big * np.sin(phi)
        rr = np.sqrt((x - wx) ** 2 + (y - wy) ** 2)
        obj = np.where((rr < 0.4 * big)[..., None], color * (1.05 - 0.4 * rr / big)[..., None], obj)
        obj = np.where((rr < 0.24 * big)[..., None], copper, obj)
    return _object_scene(np.clip(obj, 0, 1), r < big, style, rng)


# Interleaved textures and objects so any first N categories mix both kinds.
FAMILIES: tuple[Family, ...] = (
    Family("wood", "texture", ("scratch", "hole", "stain", "crack"), _wood_style, _draw_wood),
    Family(
        "capsule", "object", ("crack", "scratch", "missing", "stain"), _capsule_style, _draw_capsule
    ),
    Family("carpet", "texture", ("hole", "stain", "contamination"), _carpet_style, _draw_carpet),
    Family("screw", "object", ("scratch", "missing", "contamination"), _screw_style, _draw_screw),
    Family(
        "tile", "texture", ("crack", "stain", "missing", "contamination"), _tile_style, _draw_tile
    ),
    Family("bottle", "object", ("crack", "missing", "contamination"), _bottle_style, _draw_bottle),
    Family(
        "leather", "texture", ("scratch", "crack", "stain", "hole"), _leather_style, _draw_leather
    ),
    Family(
        "pcb", "object", ("scratch", "missing", "contamination", "stain"), _pcb_style, _draw_pcb
    ),
    Family(
        "metal_plate",
        "texture",
        ("scratch", "hole", "stain", "contamination"),
        _metal_style,
        _draw_metal,
    ),
    Family("nut", "object", ("scratch", "missing", "stain"), _nut_style, _draw_nut),
    Family("grid", "texture", ("missing", "contamination", "crack"), _grid_style, _draw_grid),
    Family("cable", "object", ("missing", "contamination", "scratch"), _cable_style, _draw_cable),
)


# --------------------------------------------------------------------------- defects


def _pick_point(rng: Rng, support: np.ndarray, margin: int) -> tuple[float, float]:
    """A random (x, y) inside the support, away from its edge when the support allows."""
    inner = ndimage.binary_erosion(support, iterations=margin) if margin else support
    candidates = np.flatnonzero(inner if inner.any() else support)
    index = int(candidates[rng.integers(candidates.size)])
    return float(index % support.shape[1]), float(index // support.shape[1])


def _canvas_mask(size: int, paint: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    paint(ImageDraw.Draw(canvas))
    return np.asarray(canvas) > 0


def _contrast(clean: np.ndarray, region: np.ndarray, palette: list) -> np.ndarray:
    """The palette colour farthest from the surface it lands on, so the defect shows."""
    mean = clean[region].mean(axis=0) if region.any() else clean.reshape(-1, 3).mean(axis=0)
    colors = np.asarray(palette, dtype=np.float32)
    return colors[int(np.argmax(np.abs(colors - mean).sum(axis=1)))]


def _walk(
    rng: Rng, start: tuple[float, float], steps: int, step: float, turn: float
) -> list[tuple[float, float]]:
    """Random-walk polyline: the shape of cracks and fibres."""
    heading = rng.uniform(0, 2 * np.pi)
    points = [start]
    for _ in range(steps):
        heading += rng.normal(0, turn)
        x, y = points[-1]
        points.append((x + step * np.cos(heading), y + step * np.sin(heading)))
    return points


def _scratch(scene: Scene, clean: np.ndarray, rng: Rng) -> tuple[np.ndarray, np.ndarray]:
    size = clean.shape[0]
    cx, cy = _pick_point(rng, scene.support, 4)
    length, angle = rng.uniform(0.12, 0.35) * size, rng.uniform(0, np.pi)
    direction = np.array([np.cos(angle), np.sin(angle)]) * length / 2
    bend = np.array([-direction[1], direction[0]]) * rng.uniform(-0.3, 0.3)
    t = np.linspace(0, 1, 24)[:, None]
    p0, p2 = np.array([cx, cy]) - direction, np.array([cx, cy]) + direction
    p1 = np.array([cx, cy]) + bend
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    width = max(1, round(rng.uniform(1.5, 3.2) * size / 224))
    points = [tuple(p) for p in curve]
    region = _canvas_mask(size, lambda d: d.line(points, fill=255, width=width, joint="curve"))
    region &= scene.support
    bright = float(_luma(clean[region].mean(axis=0))) if region.any() else 0.5
    replacement = clean * 0.35 if bright > 0.45 else clean + (1 - clean) * 0.65
    return region, replacement


def _crack(scene: Scene, clean: np.ndarray, rng: Rng) -> tuple[np.ndarray, np.ndarray]:
    size = clean.shape[0]
    scale = size / 224
    start = _pick_point(rng, scene.support, 6)
    main = _walk(rng, start, int(rng.integers(10, 22)), 4 * scale, 0.45)
    branch = _walk(rng, main[len(main) // 2], int(rng.integers(3, 8)), 3.5 * scale, 0.6)
    width = max(1, round(1.8 * scale))

    def paint(draw: ImageDraw.ImageDraw) -> None:
        draw.line(main, fill=255, width=width, joint="curve")
        draw.line(branch, fill=255, width=max(1, width - 1))

    region = _canvas_mask(size, paint) & scene.support
    return region, clean * np.float32(rng.uniform(0.1, 0.28))


def _hole(scene: Scene, clean: np.ndarray, rng: Rng) -> tuple[np.ndarray, np.ndarray]:
    size = clean.shape[0]
    y, x = _grid(size)
    cx, cy = _pick_point(rng, scene.support, 12)
    rx = rng.uniform(5, 13) * size / 224
    ry = rx * rng.uniform(0.7, 1.3)
    d = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    region = (d <= 1) & scene.support
    depth = (0.08 + 0.35 * np.clip(d, 0, 1) ** 3)[..., None]
    return region, clean * depth


_STAINS = [
    (0.35, 0.22, 0.08),
    (0.78, 0.66, 0.2),
    (0.04, 0.04, 0.05),
    (0.88, 0.88, 0.82),
    (0.42, 0.1, 0.1),
]


def _stain(scene: Scene, clean: np.ndarray, rng: Rng) -> tuple[np.ndarray, np.ndarray]:
    size = clean.shape[0]
    y, x = _grid(size)
    cx, cy = _pick_point(rng, scene.support, 10)
    radius = rng.uniform(12, 30) * size / 224
    envelope = np.clip(1 - ((x - cx) ** 2 + (y - cy) ** 2) / radius**2, 0, 1)
    blotch = _fractal(rng, x / (radius / 2), y / (radius / 2), 3)
    region = (blotch * 0.6 + 0.4) * envelope > 0.35
    region &= scene.support
    alpha = (0.5 + 0.35 * _fractal(rng, x / 3, y / 3, 2))[..., None]
    color = _contrast(clean, region, _STAINS)
    return region, clean * (1 - alpha) + color * alpha


def _blob(rng: Rng, size: int, center: tuple[float, float], radius: float) -> np.ndarray:
    """Irregular star-shaped polygon: the outline of a broken-off piece."""
    count = int(rng.integers(7, 12))
    angles = np.sort(rng.uniform(0, 2 * np.pi, count))
    radii = radius * rng.uniform(0.55, 1.0, count)
    points = [
        (center[0] + r * np.cos(a), center[1] + r * np.sin(a))
        for a, r in zip(angles, radii, strict=True)
    ]
    return _canvas_mask(size, lambda d: d.polygon(points, fill=255))


def _missing(scene: Scene, clean: np.ndarray, rng: Rng) -> tuple[np.ndarray, np.ndarray]:
    """Objects lose a piece at their outline (backdrop shows); textures get a torn-out patch."""
    size = clean.shape[0]
    support = scene.support
    if support.all():
        center = _pick_point(rng, support, 12)
    else:
        edge = support & ~ndimage.binary_erosion(support, iterations=2)
        center = _pick_point(rng, edge, 0)
    region = _blob(rng, size, center, rng.uniform(0.08, 0.15) * size) & support
    return region, scene.backdrop


_FOREIGN = [
    (0.04, 0.04, 0.04),
    (0.96, 0.96, 0.93),
    (0.8, 0.2, 0.1),
    (0.15, 0.3, 0.85),
    (0.9, 0.8, 0.2),
]


def _contamination(scene: Scene, clean: np.ndarray, rng: Rng) -> tuple[np.ndarray, np.ndarray]:
    size = clean.shape[0]
    scale = size / 224
    cx, cy = _pick_point(rng, scene.support, 8)
    spread = rng.uniform(5, 14) * scale
    specks = rng.normal(0, spread, (int(rng.integers(3, 9)), 2)) + (cx, cy)
    fibers = [
        _walk(rng, (cx, cy), int(rng.integers(4, 9)), 3 * scale, 0.35)
        for _ in range(int(rng.integers(1, 3)))
    ]

    def paint(draw: ImageDraw.ImageDraw) -> None:
        for sx, sy in specks:
            r = rng.uniform(0.8, 2.5) * scale
            draw.ellipse([sx - r, sy - r, sx + r, sy + r], fill=255)
        for fiber in fibers:
            draw.line(fiber, fill=255, width=max(1, round(scale)))

    region = _canvas_mask(size, paint) & scene.support
    color = _contrast(clean, region, _FOREIGN)
    y, x = _grid(size)
    grain = (0.85 + 0.15 * _fractal(rng, x / 2, y / 2, 1))[..., None]
    return region, color * grain


DEFECTS: dict[str, Callable[[Scene, np.ndarray, Rng], tuple[np.ndarray, np.ndarray]]] = {
    "scratch": _scratch,
    "crack": _crack,
    "hole": _hole,
    "stain": _stain,
    "missing": _missing,
    "contamination": _contamination,
}


# --------------------------------------------------------------------------- rendering


def _quantize(image: np.ndarray) -> np.ndarray:
    return np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)


def _ensure_visible(replacement: np.ndarray, clean: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Push any defect pixel that happens to match the surface, so mask == changed pixels."""
    min_delta = np.float32(14 / 255)
    weak = region & (np.abs(replacement - clean).max(axis=2) < min_delta)
    if weak.any():
        away = np.where(_luma(clean[weak]) > 0.5, -1.0, 1.0).astype(np.float32)[:, None]
        replacement = replacement.copy()
        replacement[weak] = np.clip(clean[weak] + away * 2 * min_delta, 0, 1)
    return replacement


def _apply_defect(scene: Scene, clean: np.ndarray, defect: str, rng: Rng) -> np.ndarray:
    """Boolean mask of the defect, drawn into clean (uint8) in place; retries tiny placements."""
    size = clean.shape[0]
    min_area = max(8, int(16 * (size / 224) ** 2))
    clean_f = clean.astype(np.float32) / 255
    for _ in range(50):
        region, replacement = DEFECTS[defect](scene, clean_f, rng)
        if region.sum() >= min_area:
            break
    else:
        raise RuntimeError(f"could not place a {defect} of {min_area} pixels in 50 tries")
    replacement = _ensure_visible(np.broadcast_to(replacement, clean_f.shape), clean_f, region)
    clean[region] = _quantize(replacement[region])
    return region


def render(
    family: Family, style: Style, rng: Rng, size: int, defect: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """One image (uint8 RGB) and its exact mask (bool; all False for a good image)."""
    scene = family.draw(style, rng, size)
    lighting = np.float32(rng.uniform(0.95, 1.05))
    noise = rng.normal(0, 0.012, scene.image.shape).astype(np.float32)
    image = _quantize(scene.image * lighting + noise)
    if defect is None:
        return image, np.zeros((size, size), dtype=bool)
    return image, _apply_defect(scene, image, defect, rng)


# --------------------------------------------------------------------------- dataset writing


def _seed_for(seed: int, name: str, *parts: int) -> np.random.Generator:
    """Independent, reproducible streams per category and image, stable across --categories."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), *parts])


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, compress_level=1)


def _test_plan(family: Family, images: int) -> list[str | None]:
    """About a third good images, the rest cycling over the family's defect kinds."""
    n_good = max(1, round(images * 0.3))
    defects = [family.defects[i % len(family.defects)] for i in range(images - n_good)]
    return [None] * n_good + defects


def _write_category(family: Family, root: Path, images: int, size: int, seed: int) -> int:
    style = family.style(_seed_for(seed, family.name, 0))
    base = root / family.name
    for index in range(images):
        image, _ = render(family, style, _seed_for(seed, family.name, 1, index), size, None)
        _save(image, base / "train" / "good" / f"{index:03d}.png")
    counters: dict[str, int] = {}
    for index, defect in enumerate(_test_plan(family, images)):
        image, mask = render(family, style, _seed_for(seed, family.name, 2, index), size, defect)
        folder = defect or "good"
        number = counters.get(folder, 0)
        counters[folder] = number + 1
        _save(image, base / "test" / folder / f"{number:03d}.png")
        if defect is not None:
            _save(
                mask.astype(np.uint8) * 255,
                base / "ground_truth" / folder / f"{number:03d}_mask.png",
            )
    return 2 * images


def _check_args(categories: int, images: int, size: int) -> None:
    if not 1 <= categories <= len(FAMILIES):
        raise FBClipError(
            f"--categories must be 1..{len(FAMILIES)} (one per family), got {categories}"
        )
    if images < 2:
        raise FBClipError(f"--images must be at least 2 (one good, one defective), got {images}")
    if not 64 <= size <= 2048:
        raise FBClipError(f"--size must be between 64 and 2048 pixels, got {size}")


def _place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished dataset into place; only ever replaces an earlier synthetic dataset."""
    if out.exists() and out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if out.exists():
        if not (overwrite and (out / MANIFEST).is_file()):
            reason = "overwrite only replaces a synthetic dataset" if overwrite else "choose"
            raise FBClipError(
                f"{out} already exists and is not empty; {reason} a new folder or delete it first"
            )
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(trash)
        tmp.rename(out)
        shutil.rmtree(trash)
        return
    tmp.rename(out)


def make_synthetic(
    out: str | Path,
    categories: int = 4,
    images: int = 10,
    size: int = 224,
    seed: int = 0,
    overwrite: bool = False,
) -> list[str]:
    """Write an MVTec-AD-layout dataset and return its category names.

    Per category: images normal train images (train/good) and images test images, about a
    third good and the rest spread over the family's defect kinds, with 0/255 masks in
    ground_truth/<defect>/NNN_mask.png marking exactly the pixels the defect changed.
    Written to a temporary folder beside out and renamed, so a crash leaves no half dataset.
    """
    _check_args(categories, images, size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    chosen = FAMILIES[:categories]
    try:
        for family in chosen:
            _write_category(family, tmp, images, size, seed)
        manifest = {
            "generator": "fbclip_edge.data.synthetic",
            "seed": seed,
            "size": size,
            "images": images,
            "categories": [f.name for f in chosen],
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _place(tmp, out, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return [f.name for f in chosen]


# --------------------------------------------------------------------------- contact sheet


def _outline(mask: np.ndarray) -> np.ndarray:
    """A ring just outside the mask, so the defect itself stays visible inside it."""
    grown = ndimage.binary_dilation(mask, iterations=2)
    return grown & ~ndimage.binary_dilation(mask, iterations=1)


def _tile(sample: Sample, tile: int) -> Image.Image:
    image = read_image(sample.image_path)
    mask = read_mask(sample.mask_path, image.shape[:2]) > 0
    small = np.asarray(Image.fromarray(image).resize((tile, tile), Image.Resampling.BILINEAR))
    small_mask = (
        np.asarray(
            Image.fromarray(mask.astype(np.uint8) * 255).resize(
                (tile, tile), Image.Resampling.NEAREST
            )
        )
        > 0
    )
    edge = _outline(small_mask)
    shown = np.where(edge[..., None], np.array([255, 0, 0], np.uint8), small)
    picture = Image.fromarray(shown.astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    draw.rectangle([0, 0, tile, 11], fill=(0, 0, 0))
    draw.text((2, 0), sample.defect_type, fill=(255, 255, 255))
    return picture


def _pick_for_sheet(samples: list[Sample], per_category: int) -> list[Sample]:
    """One good image, then anomalous ones cycling over defect kinds."""
    good = [s for s in samples if s.label == 0][:1]
    by_defect: dict[str, list[Sample]] = {}
    for sample in samples:
        if sample.label == 1:
            by_defect.setdefault(sample.defect_type, []).append(sample)
    picked = list(good)
    while len(picked) < per_category and any(by_defect.values()):
        for queue in by_defect.values():
            if queue and len(picked) < per_category:
                picked.append(queue.pop(0))
    return picked


def contact_sheet(
    dataset_root: str | Path, out_png: str | Path, per_category: int = 6, tile: int = 128
) -> Path:
    """A PNG grid, one row per category, defect outlines in red: for a person to look at."""
    samples = load_dataset(dataset_root, split="test")
    categories = sorted({s.category for s in samples})
    label_w = 96
    sheet = Image.new("RGB", (label_w + per_category * tile, len(categories) * tile), (30, 30, 30))
    draw = ImageDraw.Draw(sheet)
    for row, category in enumerate(categories):
        draw.text((4, row * tile + tile // 2 - 6), category, fill=(255, 255, 255))
        picked = _pick_for_sheet([s for s in samples if s.category == category], per_category)
        for col, sample in enumerate(picked):
            sheet.paste(_tile(sample, tile), (label_w + col * tile, row * tile))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return out_png


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
