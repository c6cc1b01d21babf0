"""The restated FB-CLIP heads equal the spec's formulation, kept here as the reference.

views.py computes the SEM view from two group sums, the SPA view from per-token factors and
one vector pass per window position, and background suppression after the projection; the
FB attention runs in chunks of maps inside exported graphs. Each is checked against the
spec's direct form (float64: equal to rounding; float32: well inside the 1e-5 parity).
"""

from __future__ import annotations

from typing import cast

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fbclip_edge
from fbclip_edge.clip.backbone import encode_layers
from fbclip_edge.methods.fbclip import fb_attention
from fbclip_edge.methods.fbclip.fb_attention import FBAttention
from fbclip_edge.methods.fbclip.views import (
    background_prototype,
    cls_similarity,
    semantic_view,
    spatial_view,
    suppress_and_project,
)

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


# ----- the spec's formulation (spec sections 4 and 5), as first implemented -----
def _sem_reference(tokens: torch.Tensor, cls: torch.Tensor, fg: torch.Tensor, mix: float):
    similarity = F.cosine_similarity(tokens, cls[:, None, :], dim=-1, eps=1e-8)
    bg = 1 - fg
    attn_fg = ((1 - similarity)[:, :, None] * (fg[:, :, None] * fg[:, None, :])).softmax(-1)
    attn_bg = (similarity[:, :, None] * (bg[:, :, None] * bg[:, None, :])).softmax(-1)
    mixed = fg[..., None] * (attn_fg @ tokens) + bg[..., None] * (attn_bg @ tokens)
    return mix * mixed + (1 - mix) * tokens


def _spa_reference(tokens: torch.Tensor, cls: torch.Tensor, fg: torch.Tensor, kernel: int):
    count, patches, width = tokens.shape
    side = round(patches**0.5)
    radius = kernel // 2

    def shifted(grid: torch.Tensor) -> list[torch.Tensor]:
        padded = F.pad(grid, (radius, radius, radius, radius))
        return [
            padded[:, :, dy : dy + side, dx : dx + side]
            for dy in range(kernel)
            for dx in range(kernel)
        ]

    grid_tokens = tokens.transpose(1, 2).reshape(count, width, side, side)
    grid_fg = fg.reshape(count, 1, side, side)
    cls_unit = F.normalize(cls, dim=-1)[:, :, None, None]
    shifts = list(zip(shifted(grid_tokens), shifted(grid_fg), strict=True))

    def cos_to_cls(vectors: torch.Tensor) -> torch.Tensor:
        return (F.normalize(vectors, dim=1) * cls_unit).sum(dim=1)

    fg_mean = cast(torch.Tensor, sum(n * m for n, m in shifts)) / len(shifts)
    bg_logits = torch.stack(
        [cos_to_cls(n * (1 - m)) * (n * (1 - m)).norm(dim=1) for n, m in shifts], 1
    )
    fg_logits = torch.stack(
        [(1 - cos_to_cls(n * m)) * (n * m - fg_mean).norm(dim=1) for n, m in shifts], 1
    )
    bg_weights, fg_weights = bg_logits.softmax(dim=1), fg_logits.softmax(dim=1)
    bg_sum = sum(bg_weights[:, j : j + 1] * n * (1 - m) for j, (n, m) in enumerate(shifts))
    fg_sum = sum(fg_weights[:, j : j + 1] * n * m for j, (n, m) in enumerate(shifts))
    bg_count = cast(torch.Tensor, sum(1 - m for _, m in shifts)).clamp_min(1e-8)
    fg_count = cast(torch.Tensor, sum(m for _, m in shifts)).clamp_min(1e-8)
    out = fg_sum / fg_count + bg_sum / bg_count
    return out.reshape(count, width, patches).transpose(1, 2)


def _bs_reference(maps: torch.Tensor, background: torch.Tensor, proj: torch.Tensor, mix: float):
    proto = background[:, None, None, :]
    similarity = F.cosine_similarity(maps, proto, dim=-1, eps=1e-8)
    suppressed = mix * maps + (1 - mix) * (maps - proto) * (1 - similarity)[..., None]
    return suppressed @ proj


# ----- inputs: CLIP-like tokens (a shared offset, as real residual streams have) -----
def _layers(side: int, width: int, dtype: torch.dtype, low: float = 0.5):
    """(tokens, cls, fg) for 4 layers; layer 2 is all foreground, layer 3 all `low`."""
    generator = torch.Generator().manual_seed(side * 100 + width)
    offset = torch.randn(width, generator=generator, dtype=torch.float64) * 4
    tokens = torch.randn(4, side * side, width, generator=generator, dtype=torch.float64)
    tokens = (3 * tokens + offset).to(dtype)
    cls = torch.randn(4, width, generator=generator, dtype=torch.float64).to(dtype)
    fg = torch.where(torch.rand(4, side * side, generator=generator) > 0.5, 1.0, low)
    fg[2], fg[3] = 1.0, low
    return tokens, cls, fg.to(dtype)


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= TOL[dtype] * max(scale, 1.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("low", [0.5, 0.25])
def test_semantic_view_equals_the_n_by_n_attention(dtype, low):
    tokens, cls, fg = _layers(7, 24, dtype, low)
    restated = semantic_view(tokens, cls_similarity(tokens, cls), fg, 0.6, low)
    _close(restated, _sem_reference(tokens, cls, fg, 0.6), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("side", "kernel"), [(7, 5), (5, 3), (4, 5)])
def test_spatial_view_equals_the_per_neighbour_form(dtype, side, kernel):
    tokens, cls, fg = _layers(side, 16, dtype)
    restated = spatial_view(tokens, cls_similarity(tokens, cls), fg, kernel)
    _close(restated, _spa_reference(tokens, cls, fg, kernel), dtype)


@pytest.mark.parametrize("view", ["sem", "spa"])
def test_views_backpropagate_like_the_spec_form(view):
    """Gradients into the tokens agree too (the SPA output is accumulated in place)."""
    tokens, cls, fg = _layers(5, 8, torch.float64)

    def restated(x: torch.Tensor) -> torch.Tensor:
        similarity = cls_similarity(x, cls)
        if view == "sem":
            return semantic_view(x, similarity, fg, 0.6, 0.5)
        return spatial_view(x, similarity, fg, 5)

    def reference(x: torch.Tensor) -> torch.Tensor:
        return _sem_reference(x, cls, fg, 0.6) if view == "sem" else _spa_reference(x, cls, fg, 5)

    weights = torch.randn(
        tokens.shape, generator=torch.Generator().manual_seed(1), dtype=tokens.dtype
    )
    grads = []
    for run in (restated, reference):
        leaf = tokens.clone().requires_grad_(True)
        (run(leaf) * weights).sum().backward()
        grads.append(cast(torch.Tensor, leaf.grad))
    _close(grads[0], grads[1], torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_suppression_after_projection_equals_suppress_then_project(dtype):
    generator = torch.Generator().manual_seed(3)
    maps = (torch.randn(2, 6, 9, 32, generator=generator, dtype=torch.float64) + 1).to(dtype)
    background = torch.randn(2, 32, generator=generator, dtype=torch.float64).to(dtype)
    proj = torch.randn(32, 12, generator=generator, dtype=torch.float64).to(dtype)
    maps.requires_grad_(True)
    restated = suppress_and_project(maps, background, proj, 0.5)
    expected = _bs_reference(maps, background, proj, 0.5)
    _close(restated.detach(), expected.detach(), dtype)
    # Training backpropagates through it into the FB attention: the gradients agree too.
    weights = torch.randn(restated.shape, generator=generator, dtype=torch.float64).to(dtype)
    (grad,) = torch.autograd.grad((restated * weights).sum(), maps)
    (want,) = torch.autograd.grad((expected * weights).sum(), maps)
    _close(grad, want, dtype)


@pytest.mark.parametrize("maps_per_call", [1, 2, 4, 15])
def test_exported_fb_attention_chunks_equal_one_call(monkeypatch, maps_per_call):
    """The chunked form the ONNX export traces gives eager's one-call result."""
    torch.manual_seed(0)
    block = FBAttention(32, heads=4, dim_head=8, maps_per_call=maps_per_call).double()
    views = torch.randn(2, 15, 10, 32, dtype=torch.float64)
    with torch.no_grad():
        one_call = block(views)
        monkeypatch.setattr(fb_attention.torch.onnx, "is_in_onnx_export", lambda: True)
        chunked = block(views)
    _close(chunked, one_call, torch.float64)


class _Shapes(TorchDispatchMode):
    """Output shapes of every op run under it (the op itself, not its kernel's insides)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(value, torch.Tensor):
                self.shapes.append(tuple(value.shape))
        return out


def test_heads_make_no_tokens_by_tokens_tensor():
    """Views, FB attention and suppression never hold an N x N (or T x T) tensor in torch."""
    model = fbclip_edge.create_model("tiny", image_size=168, seed=0).eval()  # N > width
    tokens = model.config.grid_size**2 + 1
    with torch.no_grad():
        pixels = torch.randn(2, 3, 168, 168)
        layers = torch.stack(
            encode_layers(model.clip.visual, pixels, model.config.feature_layers), dim=1
        )
        with _Shapes() as seen:
            enhanced, _ = model.enhance(layers)
            background = background_prototype(enhanced)
            suppress_and_project(enhanced, background, model.clip.visual.proj)
    assert seen.shapes
    square = {(n, m) for n in (tokens - 1, tokens) for m in (tokens - 1, tokens)}
    assert not [s for s in seen.shapes if s[-2:] in square]
