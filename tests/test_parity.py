"""Golden parity with the FB-CLIP authors' reference outputs (float32, CPU, 1e-5)."""

from __future__ import annotations

import pytest
import torch

from fbclip_edge import anomaly_map
from fbclip_edge.methods.fbclip.losses import fbclip_losses

TOL = 1e-5


def _max_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return (actual.float() - expected.float()).abs().max().item()


@pytest.mark.parametrize(
    ("stage", "key"),
    [
        ("layer_tokens", "layer_tokens"),
        ("fg_masks", "fg_masks"),
        ("enhanced_maps", "enhanced_maps"),
        ("background", "background"),
        ("map_logits", "map_logits"),
        ("text_features", "text_features"),
    ],
)
def test_intermediate_stage_matches_reference(reference_intermediates, golden, stage, key):
    assert _max_diff(getattr(reference_intermediates, stage), golden[key]) < TOL


def test_outputs_match_reference(reference_intermediates, golden):
    output = reference_intermediates.output
    assert _max_diff(output.image_score, golden["image_score"]) < TOL
    assert _max_diff(output.patch_map, golden["patch_map"]) < TOL


def test_scale_weights_are_the_checkpoints(reference_model, golden):
    assert _max_diff(reference_model.scale_weights.detach(), golden["scale_weights"]) == 0.0


def test_anomaly_map_matches_reference(reference_intermediates, golden):
    full = anomaly_map(reference_intermediates.output.patch_map, size=(518, 518), sigma=4.0)
    assert _max_diff(full, golden["anomaly_map"]) < TOL


def test_anomaly_map_numpy_in_numpy_out(golden):
    full = anomaly_map(golden["patch_map"].numpy(), size=(518, 518))
    assert full.shape == (2, 518, 518) and full.dtype.name == "float32"
    assert _max_diff(torch.from_numpy(full), golden["anomaly_map"]) < TOL


def test_training_losses_match_reference(reference_model, golden):
    reference_model.train()
    try:
        output = reference_model(golden["pixel_values"], return_maps=True)
        losses = fbclip_losses(
            output.image_score,
            output.patch_map,
            output.maps[:, -1],
            reference_model.text_features,
            golden["labels"],
            golden["masks"],
        )
    finally:
        reference_model.eval()
    assert abs(losses.focal_image.item() - golden["loss_focal_image"].item()) < TOL
    assert abs(losses.focal_pixel.item() - golden["loss_focal_pixel"].item()) < TOL
    assert abs(losses.dice.item() - golden["loss_dice_weighted"].item()) < TOL
    assert abs(losses.scr.item() - golden["loss_scr"].item()) < TOL
    # Gradients reach every learned part and nothing of the frozen CLIP.
    losses.total.backward()
    learned = {n for n, p in reference_model.named_parameters() if p.grad is not None}
    assert "prompt_learner.ctx_pos" in learned and "fb_attention.fg_scale" in learned
    assert "text_fusion.text_projection_mlp.2.weight" in learned and "scale_weights" in learned
    assert not any(n.startswith("clip.") for n in learned)
    reference_model.zero_grad(set_to_none=True)


def test_text_features_are_frozen_in_eval(reference_model):
    assert reference_model.text_frozen
    frozen = reference_model.text_features
    assert frozen.shape == (2, reference_model.config.backbone.embed_dim)
    assert not frozen.requires_grad
    assert torch.allclose(frozen.norm(dim=-1), torch.ones(2), atol=1e-6)


def test_preprocess_reproduces_reference_pixels(golden):
    from fbclip_edge import preprocess

    pixels = preprocess(list(golden["images_uint8"].numpy()), image_size=518)
    assert _max_diff(pixels, golden["pixel_values"]) < 1e-6


_TRITON_PARITY = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from fbclip_edge.kernels import anomaly_map, score_maps
d = torch.load(sys.argv[1])
score, patch = score_maps(d["maps"], d["text"], d["weights"], 0.07, impl="triton")
full = anomaly_map(d["patch_map"], (518, 518), 4.0, impl="triton")
print((score - d["image_score"]).abs().max().item())
print((patch.reshape(d["patch_map"].shape) - d["patch_map"]).abs().max().item())
print((full - d["anomaly_map"]).abs().max().item())
"""


def test_golden_parity_holds_through_the_triton_kernels(
    reference_model, reference_intermediates, golden, tmp_path
):
    """The fused Triton kernels (CPU interpreter) on the model's own maps give the authors'
    score, patch map and anomaly map: the fixture's parity holds through the kernel path."""
    import subprocess
    import sys

    torch.save(
        {
            "maps": reference_intermediates.maps,
            "text": reference_model.text_features,
            "weights": reference_model.map_weights().detach(),
            "image_score": golden["image_score"],
            "patch_map": golden["patch_map"],
            "anomaly_map": golden["anomaly_map"],
        },
        tmp_path / "maps.pt",
    )
    done = subprocess.run(
        [sys.executable, "-c", _TRITON_PARITY, str(tmp_path / "maps.pt")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    diffs = [float(line) for line in done.stdout.split()]
    assert len(diffs) == 3 and max(diffs) < TOL, diffs
