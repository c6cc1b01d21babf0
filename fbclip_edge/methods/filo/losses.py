"""FiLo's training losses (spec 9), per image as train.py computes them with batch 1.

Stage 1 (heads and prompt learners): for each of the M maps P_m (B, 2, S, S), before any blur,
focal(P_m, y) + dice(P_m[1], y) + dice(P_m[0], 1 - y), summed over the maps. Stage 2
(adapter): cross-entropy of s / 0.07 with the image label. The reference trains with batch 1;
for a batch these functions give each image's reference value, and `total` averages them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: The focal loss's smoothing: one-hot clamped to [s, 1 - s], and s added to pt.
FOCAL_SMOOTH = 1e-5
FOCAL_GAMMA = 2


def focal_loss(prob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One image: prob (1, 2, S, S), mask (S, S) in {0, 1} -> mean over pixels of
    -(1 - pt)^2 log pt, pt = sum_c clamp(onehot)_c p_c + 1e-5 (alpha 1 for both classes)."""
    classes = int(prob.shape[1])
    flat = prob.view(prob.size(0), classes, -1).permute(0, 2, 1).contiguous().view(-1, classes)
    target = mask.reshape(-1, 1).long()
    onehot = torch.zeros(target.shape[0], classes, dtype=prob.dtype, device=prob.device)
    onehot = onehot.scatter_(1, target, 1).clamp(FOCAL_SMOOTH / (classes - 1), 1.0 - FOCAL_SMOOTH)
    pt = (onehot * flat).sum(1) + FOCAL_SMOOTH
    return (-1 * torch.pow(1 - pt, FOCAL_GAMMA) * pt.log()).mean()


def dice_loss(prob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One image's map (1, S, S) or (S, S) against mask (S, S): [ref quirk] the 'per-sample'
    dice runs over the S rows, 1 - mean_r (2 sum(p y) + 1) / (sum p + sum y + 1)."""
    rows = int(mask.shape[0])
    flat = prob.view(rows, -1)
    target = mask.view(rows, -1)
    dice = (2 * (flat * target).sum(1) + 1) / (flat.sum(1) + target.sum(1) + 1)
    return 1 - dice.sum() / rows


@dataclass
class MapLossTerms:
    """Stage 1 terms, (B, M) each; `main` (B,) is their per-image sum."""

    focal: torch.Tensor
    dice_abnormal: torch.Tensor  # dice(P_m[1], y)
    dice_normal: torch.Tensor  # dice(P_m[0], 1 - y)
    main: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        """Mean over images of the per-image loss: the value to backpropagate."""
        return self.main.mean()

    def as_floats(self) -> dict[str, float]:
        """Plain numbers for logs (terms summed over maps, averaged over images)."""
        return {
            "focal": float(self.focal.sum(1).mean().detach()),
            "dice_abnormal": float(self.dice_abnormal.sum(1).mean().detach()),
            "dice_normal": float(self.dice_normal.sum(1).mean().detach()),
            "total": float(self.total.detach()),
        }


def map_losses(probs: list[torch.Tensor], masks: torch.Tensor) -> MapLossTerms:
    """probs: M maps (B, 2, S, S); masks (B, S, S) binary -> per-image, per-map terms.

    The per-image sum accumulates focal, dice abnormal, dice normal map by map, in the
    reference's order.
    """
    focal, abnormal, normal, main = [], [], [], []
    for image in range(int(masks.shape[0])):
        mask = masks[image].to(probs[0].dtype)
        total = torch.zeros((), dtype=mask.dtype, device=mask.device)
        terms: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for prob in probs:
            one = prob[image : image + 1]
            term = (
                focal_loss(one, mask),
                dice_loss(one[:, 1, :, :], mask),
                dice_loss(one[:, 0, :, :], 1 - mask),
            )
            for value in term:
                total = total + value
            terms.append(term)
        focal.append(torch.stack([t[0] for t in terms]))
        abnormal.append(torch.stack([t[1] for t in terms]))
        normal.append(torch.stack([t[2] for t in terms]))
        main.append(total)
    return MapLossTerms(
        torch.stack(focal), torch.stack(abnormal), torch.stack(normal), torch.stack(main)
    )


@dataclass
class AdapterLossTerms:
    """Stage 2: logits s / 0.07 (B, 2) and the per-image cross-entropy (B,)."""

    logits: torch.Tensor
    ce: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        """Mean over images: the value to backpropagate."""
        return self.ce.mean()

    def as_floats(self) -> dict[str, float]:
        """Plain numbers for logs."""
        return {"adapter_ce": float(self.total.detach()), "total": float(self.total.detach())}


def adapter_loss(
    similarity: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07
) -> AdapterLossTerms:
    """similarity s (B, 2) of spec 5, labels (B,) 0 normal / 1 anomalous."""
    logits = similarity / temperature
    ce = torch.stack(
        [F.cross_entropy(logits[i], labels[i].long()) for i in range(int(logits.shape[0]))]
    )
    return AdapterLossTerms(logits, ce)
