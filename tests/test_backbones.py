"""Every supported backbone builds at 224 and 518 px; shapes follow the config, not ViT-L."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fbclip_edge import FBClipError, create_model
from fbclip_edge.clip import backbone_config
from fbclip_edge.clip.backbone import resize_positional_embedding
from fbclip_edge.methods.fbclip import FBCLIP, FBCLIPConfig
from fbclip_edge.methods.fbclip.config import default_feature_layers

NAMES = ["ViT-B-16", "ViT-B-32", "ViT-L-14", "ViT-L-14-336", "tiny"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [224, 518])
def test_backbone_builds_at_size(name, size):
    backbone = backbone_config(name)
    patch = backbone.patch_size
    if size % patch:
        with pytest.raises(FBClipError, match=f"not a multiple of the patch size {patch}"):
            FBCLIPConfig(backbone, image_size=size)
        size = size // patch * patch
    config = FBCLIPConfig(backbone, image_size=size)
    # Meta tensors: full shape propagation through every stage without the compute.
    with torch.device("meta"):
        model = FBCLIP(config).eval()
        output = model(torch.empty(2, 3, size, size))
        maps = model.encode_maps(torch.empty(1, 3, size, size))
    grid = size // patch
    assert output.image_score.shape == (2,)
    assert output.patch_map.shape == (2, 1, grid, grid)
    assert model.text_features.shape == (2, backbone.embed_dim)
    assert maps.shape == (1, 3 * len(config.feature_layers), grid * grid + 1, backbone.embed_dim)


def test_real_random_weights_forward_on_cpu():
    model = create_model("ViT-B-32", image_size=224, seed=0)
    with torch.no_grad():
        output = model(torch.randn(2, 3, 224, 224))
    assert output.patch_map.shape == (2, 1, 7, 7)
    assert torch.all((output.image_score > 0) & (output.image_score < 1))
    assert model.config.feature_layers == (1, 3, 6, 9, 12)


def test_default_feature_layers_follow_depth():
    assert default_feature_layers(24) == (1, 6, 12, 18, 24)
    assert default_feature_layers(12) == (1, 3, 6, 9, 12)
    assert max(default_feature_layers(6)) == 6


def test_positional_embedding_interpolation_keeps_cls_and_grid():
    pos = torch.randn(1 + 24 * 24, 8)
    resized = resize_positional_embedding(pos, 37)
    assert resized.shape == (1 + 37 * 37, 8)
    assert torch.equal(resized[0], pos[0])
    assert resize_positional_embedding(pos, 24) is pos


def test_bad_settings_give_clear_errors():
    backbone = backbone_config("tiny")
    with pytest.raises(FBClipError, match="feature layers"):
        FBCLIPConfig(backbone, feature_layers=(6, 1))
    with pytest.raises(FBClipError, match="within 1..24"):
        FBCLIPConfig(backbone, feature_layers=(1, 30))
    with pytest.raises(FBClipError, match="unknown backbone"):
        backbone_config("ViT-Q-99")
    with pytest.raises(FBClipError, match="not a plain ViT"):
        backbone_config("RN50")


def test_model_runs_at_another_size_than_configured():
    model = create_model("tiny", image_size=224)
    with torch.no_grad():
        output = model(torch.randn(1, 3, 280, 280))
    assert output.patch_map.shape == (1, 1, 20, 20)


def test_pretrained_tag_offline_fails_with_the_other_two_ways():
    # A fresh interpreter with the hub forced offline, as on an air-gapped line PC.
    code = (
        "from fbclip_edge.factory import clip_from_pretrained\n"
        "clip_from_pretrained('ViT-B-32', 'openai')\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "could not get pretrained weights 'openai' for ViT-B-32" in last
    assert "--clip-weights" in last and "OpenAI layout" in last


def test_bad_pixel_tensors_are_refused_before_the_vit():
    model = create_model("tiny", image_size=224)
    with pytest.raises(FBClipError, match="multiple of the patch size 14"):
        model(torch.zeros(1, 3, 230, 230))
    with pytest.raises(FBClipError, match="must be square"):
        model(torch.zeros(1, 3, 224, 210))
    with pytest.raises(FBClipError, match="normalized floats"):
        model(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
    with pytest.raises(FBClipError, match=r"\(B, 3, S, S\)"):
        model(torch.zeros(3, 224, 224))
