"""FB-CLIP training losses (spec section 7): focal, dice and the label-free SCR term."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossTerms:
    """The four weighted loss terms and their sum (the value to backpropagate)."""

    focal_image: torch.Tensor
    focal_pixel: torch.Tensor
    dice: torch.Tensor  # already x dice_weight
    scr: torch.Tensor  # already x scr_weight

    @property
    def total(self) -> torch.Tensor:
        """Sum of the four terms."""
        return self.focal_image + self.focal_pixel + self.dice + self.scr

    def as_floats(self) -> dict[str, float]:
        """Plain numbers for progress bars and logs."""
        return {
            "focal_image": float(self.focal_image.detach()),
            "focal_pixel": float(self.focal_pixel.detach()),
            "dice": float(self.dice.detach()),
            "scr": float(self.scr.detach()),
            "total": float(self.total.detach()),
        }


def focal_loss(prob: torch.Tensor, target: torch.Tensor, gamma: float = 4.0) -> torch.Tensor:
    """mean(BCE(p, y) * (1 - p_t)^gamma), p_t = p*y + (1-p)*(1-y)."""
    prob, target = prob.float(), target.float()
    bce = F.binary_cross_entropy(prob, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    return (bce * (1 - p_t) ** gamma).mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - (2*sum(p*y) + 1) / (sum(p) + sum(y) + 1) per image, averaged over the batch."""
    prob = prob.float().flatten(1)
    target = target.float().flatten(1)
    dice = (2 * (prob * target).sum(1) + 1) / (prob.sum(1) + target.sum(1) + 1)
    return (1 - dice).mean()


def scr_loss(
    last_map: torch.Tensor, text_features: torch.Tensor, temperature: float = 0.07
) -> torch.Tensor:
    """Label-free semantic consistency: entropy of the pooled last map's class softmax plus
    a hinge that keeps the two logits apart. last_map (B, T, D) projected."""
    pooled = F.normalize(last_map.float().mean(dim=1), dim=-1)
    logits = pooled @ text_features.float().t() / temperature
    prob = logits.softmax(dim=-1)
    entropy = -(prob * torch.log(prob + 1e-8)).sum(dim=-1).mean()
    margin = F.relu(1 - (logits[:, 1] - logits[:, 0]).abs()).mean()
    return entropy + 0.5 * margin


def upsample_patch_map(patch_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Patch map (B, 1, g, g) -> (B, H, W) bilinear, no blur (the training-time map)."""
    return F.interpolate(patch_map.float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def fbclip_losses(
    image_score: torch.Tensor,
    patch_map: torch.Tensor,
    last_map: torch.Tensor,
    text_features: torch.Tensor,
    labels: torch.Tensor,
    masks: torch.Tensor,
    temperature: float = 0.07,
    dice_weight: float = 0.2,
    scr_weight: float = 0.15,
) -> LossTerms:
    """All four terms for one batch; masks (B, H, W) in {0, 1}, labels (B,)."""
    pixel = upsample_patch_map(patch_map, (masks.shape[-2], masks.shape[-1]))
    return LossTerms(
        focal_image=focal_loss(image_score, labels),
        focal_pixel=focal_loss(pixel, masks),
        dice=dice_weight * dice_loss(pixel, masks),
        scr=scr_weight * scr_loss(last_map, text_features, temperature),
    )
