"""Preprocessing of every frame kind, and the analytic FLOP count against torch's counter."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from flopcount import count_flops, sdpa_flops
from PIL import Image

from fbclip_edge import FBClipError, create_model, preprocess
from fbclip_edge.clip import backbone_config
from fbclip_edge.methods.fbclip import FBCLIPConfig
from fbclip_edge.methods.fbclip.flops import forward_flops
from fbclip_edge.preprocess import OPENAI_MEAN, OPENAI_STD


def test_frames_of_any_size_and_mode_become_the_same_batch():
    rgb = np.random.default_rng(0).integers(0, 256, (61, 90, 3), dtype=np.uint8)
    kinds = [
        rgb,
        Image.fromarray(rgb),
        np.dstack([rgb, np.full((61, 90), 7, np.uint8)]),
        Image.fromarray(rgb).convert("RGBA"),
    ]
    batches = [preprocess(k, image_size=28) for k in kinds]
    for batch in batches:
        assert batch.shape == (1, 3, 28, 28) and batch.dtype == torch.float32
        assert torch.equal(batch, batches[0])


def test_grey_and_16_bit_frames():
    grey = np.full((10, 12), 128, np.uint8)
    out = preprocess(grey, image_size=14)
    expected = (128 / 255 - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)
    assert torch.allclose(out[0, :, 0, 0], expected, atol=1e-6)
    sixteen = np.full((10, 12), 128 * 257, np.uint16)
    assert torch.equal(preprocess(sixteen, image_size=14), out)
    assert torch.equal(preprocess(Image.fromarray(grey), image_size=14), out)


def test_bad_frames_are_refused_clearly():
    with pytest.raises(FBClipError, match="dtype float32"):
        preprocess(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(FBClipError, match="image shape"):
        preprocess(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(FBClipError, match="no images"):
        preprocess([])


def test_batch_array_input():
    batch = np.zeros((3, 20, 20, 3), np.uint8)
    assert preprocess(batch, image_size=14).shape == (3, 3, 14, 14)


@pytest.mark.parametrize("size", [224, 280])
def test_analytic_flops_equal_torch_flop_counter(size):
    model = create_model("tiny", image_size=size)
    pixels = torch.randn(1, 3, size, size)
    counted, by_formula = count_flops(lambda: model(pixels))
    assert forward_flops(model.config).total == counted, f"attention ops by formula: {by_formula}"


def test_flop_check_catches_one_attention_block_too_many_or_few():
    """The check bites: counting one backbone block more or less is off by a block's FLOPs."""
    model = create_model("tiny", image_size=224)
    pixels = torch.randn(1, 3, 224, 224)
    counted, _ = count_flops(lambda: model(pixels))
    layers = model.config.feature_layers
    fewer = dataclasses.replace(model.config, feature_layers=(*layers[:-1], layers[-1] - 1))
    assert forward_flops(fewer).total != counted


def test_sdpa_formula_matches_torch_where_torch_counts_it():
    """Our attention formula equals torch's own for the SDPA variant torch does register."""
    from torch.utils.flop_counter import sdpa_flop_count

    q, k, v = (2, 3, 10, 8), (2, 3, 12, 8), (2, 3, 12, 5)
    assert sdpa_flops(q, k, v) == sdpa_flop_count(q, k, v)


def test_vit_l_14_336_at_518_flops_split():
    count = forward_flops(FBCLIPConfig(backbone_config("ViT-L-14-336"), image_size=518))
    # Backbone: 24 blocks of 1370 tokens at width 1024 dominate; heads are the 15 FB views
    # (the SEM view's group sums are O(N Dv), so no N x N attention is counted).
    assert 1.0e12 < count.backbone < 1.03e12
    assert 3.3e11 < count.heads < 3.5e11


def test_device_side_preprocess_is_close_to_pil():
    """The GPU preprocess path (run here on CPU tensors) matches PIL to a few grey levels."""
    from fbclip_edge.preprocess import preprocess_tensor

    frames = np.random.default_rng(0).integers(0, 256, (2, 48, 64, 3), dtype=np.uint8)
    frames[:, 10:30, 20:40] = 200  # structure, so resampling differences would show
    device_side = preprocess_tensor(torch.from_numpy(frames), 28)
    reference = preprocess(frames, 28)
    assert device_side.shape == reference.shape == (2, 3, 28, 28)
    grey_level = 1 / 255 / 0.27  # one 8-bit step after normalization
    assert (device_side - reference).abs().mean() < 3 * grey_level
    same_size = preprocess_tensor(torch.from_numpy(frames[:, :28, :28]), 28)
    assert torch.allclose(same_size, preprocess(list(frames[:, :28, :28]), 28), atol=1e-6)
