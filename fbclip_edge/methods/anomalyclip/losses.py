"""AnomalyCLIP training losses (spec section 8): per-layer focal + two dice, image CE.

total = 4 * sum over the selected layers of (focal + dice_abnormal + dice_normal) + image CE.
The factor 4 is hard-coded in the reference (it reproduces its pre-2025 four-times-layer-24
behaviour with one layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: The reference's `lam`: the weight of the summed map losses.
MAP_LOSS_WEIGHT = 4.0
#: The focal loss's label smoothing; the reference applies it twice.
FOCAL_SMOOTH = 1e-5


@dataclass
class LossTerms:
    """Per-layer map losses (L,), the image cross-entropy, and their weighted total."""

    focal: torch.Tensor  # (L,)
    dice_abnormal: torch.Tensor  # (L,) dice(p_abnormal, mask)
    dice_normal: torch.Tensor  # (L,) dice(p_normal, 1 - mask)
    image_ce: torch.Tensor  # ()

    @property
    def map_loss(self) -> torch.Tensor:
        """Sum over layers of the three map terms (before the weight of 4)."""
        return self.focal.sum() + self.dice_abnormal.sum() + self.dice_normal.sum()

    @property
    def total(self) -> torch.Tensor:
        """4 * map loss + image CE: the value to backpropagate."""
        return MAP_LOSS_WEIGHT * self.map_loss + self.image_ce

    def as_floats(self) -> dict[str, float]:
        """Plain numbers for progress bars and logs (map terms summed over layers)."""
        return {
            "focal": float(self.focal.sum().detach()),
            "dice_abnormal": float(self.dice_abnormal.sum().detach()),
            "dice_normal": float(self.dice_normal.sum().detach()),
            "image_ce": float(self.image_ce.detach()),
            "total": float(self.total.detach()),
        }


def focal_loss(prob: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """prob (B, 2, H, W) class probabilities, target (B, H, W) in {0, 1}.

    pt = sum_c clamp(onehot, s, 1 - s)_c * p_c + s (smoothing twice, as the reference);
    mean over all pixels of -(1 - pt)^gamma * ln(pt).
    """
    target = target.to(prob.dtype)
    onehot = torch.stack([1 - target, target], dim=1)
    onehot = onehot.clamp(FOCAL_SMOOTH, 1.0 - FOCAL_SMOOTH)
    pt = (onehot * prob).sum(dim=1) + FOCAL_SMOOTH
    return (-((1 - pt) ** gamma) * pt.log()).mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean over images of (2 * sum(q y) + 1) / (sum(q) + sum(y) + 1)."""
    prob = prob.flatten(1)
    target = target.to(prob.dtype).flatten(1)
    dice = (2 * (prob * target).sum(1) + 1) / (prob.sum(1) + target.sum(1) + 1)
    return 1 - dice.mean()


def layer_probabilities(maps: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """Projected maps (B, L, T, D) -> per-token softmax over [normal, abnormal] (B, L, T, 2)."""
    unit = maps / maps.norm(dim=-1, keepdim=True)
    return (unit @ text.t() / temperature).softmax(dim=-1)


def upsampled_probabilities(prob: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, L, T, 2), CLS first -> (B, L, 2, H, W): patch rows as a grid, bilinear upsample."""
    batch, layers, tokens, classes = prob.shape
    side = round((tokens - 1) ** 0.5)
    grid = prob[:, :, 1:].reshape(batch * layers, side, side, classes).permute(0, 3, 1, 2)
    up = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
    return up.reshape(batch, layers, classes, *size)


def anomalyclip_losses(
    maps: torch.Tensor,
    text: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.07,
) -> LossTerms:
    """All terms for one batch: maps (B, L, T, D) with the global feature in row 0 of
    map 0, text (2, D) unit, masks (B, S, S) binary, labels (B,) 0 normal / 1 anomalous."""
    maps, text = maps.float(), text.float()
    global_unit = maps[:, 0, 0] / maps[:, 0, 0].norm(dim=-1, keepdim=True)
    image_ce = F.cross_entropy(global_unit @ text.t() / temperature, labels.long())
    size = (int(masks.shape[-2]), int(masks.shape[-1]))
    prob = upsampled_probabilities(layer_probabilities(maps, text, temperature), size)
    masks = masks.float()
    focal, abnormal, normal = [], [], []
    for layer in range(prob.shape[1]):
        focal.append(focal_loss(prob[:, layer], masks))
        abnormal.append(dice_loss(prob[:, layer, 1], masks))
        normal.append(dice_loss(prob[:, layer, 0], 1 - masks))
    return LossTerms(torch.stack(focal), torch.stack(abnormal), torch.stack(normal), image_ce)
