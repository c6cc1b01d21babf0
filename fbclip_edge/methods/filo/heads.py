"""FiLo's learned vision-side modules (spec 3 and 6), named as the reference's checkpoint.

- `Adapter` (`adapter.fc.0`, `adapter.fc.2`): y = SiLU(W_b ReLU(W_a z)) + z, no biases.
- `LinearHeads` (`decoder_linear.fc.k`): Dv -> D on the patch tokens of the even entries.
- `MMCIHeads` (`decoder_cov.fc_{11,33,55,77,15,51}.k`): six 'same' convolutions Dv -> D on the
  g x g token image of the odd entries, summed in the order 1x1, 3x3, 5x5, 7x7, 1x5, 5x1.
"""

from __future__ import annotations

import torch
from torch import nn

#: Branch name (the checkpoint's fc_<kh><kw>) and kernel (rows, columns), in summation order.
MMCI_KERNELS: tuple[tuple[str, tuple[int, int]], ...] = (
    ("11", (1, 1)),
    ("33", (3, 3)),
    ("55", (5, 5)),
    ("77", (7, 7)),
    ("15", (1, 5)),
    ("51", (5, 1)),
)


class Adapter(nn.Module):
    """Residual bottleneck on the image embedding (D -> D / reduction -> D, no biases)."""

    def __init__(self, dim: int, reduction: int = 2) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(dim, dim // reduction, bias=False),
            nn.ReLU(),
            nn.Linear(dim // reduction, dim, bias=False),
            nn.SiLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """fc(x) + x on any (..., D)."""
        return self.fc(x) + x


def conditioning(image_tokens: torch.Tensor, adapter: Adapter | None = None) -> torch.Tensor:
    """Conditioning vector c (B, D): normalize(adapter(Z)[:, 0]) (spec 3).

    image_tokens is Z (B, T, D), all tokens (the reference runs the adapter on all of them,
    which rounds differently from the CLS row alone), or the CLS rows (B, D). adapter None:
    training stage 1, c = normalize(Z[:, 0]).
    """
    z = image_tokens if adapter is None else adapter(image_tokens)
    if z.dim() == 3:
        z = z[:, 0, :]
    return z / z.norm(dim=-1, keepdim=True)


class LinearHeads(nn.Module):
    """One Linear(Dv, D) per even entry, applied to its patch tokens (CLS dropped)."""

    def __init__(self, dim_in: int, dim_out: int, count: int) -> None:
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(dim_in, dim_out) for _ in range(count))

    def forward(self, entries: list[torch.Tensor]) -> list[torch.Tensor]:
        """entries[k] (B, T, Dv) -> f_k (B, N, D)."""
        return [fc(tokens[:, 1:, :]) for fc, tokens in zip(self.fc, entries, strict=True)]


class MMCIHeads(nn.Module):
    """Multi-shape convolutions on the token image: per head six Conv2d(Dv, D, 'same')."""

    def __init__(self, dim_in: int, dim_out: int, count: int) -> None:
        super().__init__()
        # Registered in the reference's order, so state dicts list keys as its checkpoint does.
        for name, kernel in sorted(MMCI_KERNELS, key=_reference_order):
            convs = nn.ModuleList(
                nn.Conv2d(dim_in, dim_out, kernel_size=kernel, padding="same") for _ in range(count)
            )
            self.add_module(f"fc_{name}", convs)
        self.count = count

    def convs(self, name: str) -> nn.ModuleList:
        """The ModuleList of one branch (fc_11, fc_33, ...)."""
        module = self.get_submodule(f"fc_{name}")
        assert isinstance(module, nn.ModuleList)
        return module

    def branches(self, tokens: torch.Tensor, head: int) -> list[torch.Tensor]:
        """The six conv outputs (B, D, g, g) of one head, in summation order.

        The conv input is the (B, g, g, Dv) token view permuted to (B, Dv, g, g) without a copy:
        channels-last memory, which picks the reference's convolution kernel (spec 2.5).
        """
        patches = tokens[:, 1:, :]
        side = round(int(patches.shape[1]) ** 0.5)
        image = patches.reshape(patches.shape[0], side, side, patches.shape[2]).permute(0, 3, 1, 2)
        return [self.convs(name)[head](image) for name, _ in MMCI_KERNELS]

    def head(self, tokens: torch.Tensor, head: int) -> torch.Tensor:
        """One head: (B, T, Dv) -> sum of the six branches as tokens (B, N, D), row-major."""
        outputs = self.branches(tokens, head)
        total = outputs[0]
        for output in outputs[1:]:
            total = total + output
        return total.permute(0, 2, 3, 1).reshape(total.shape[0], -1, total.shape[1])

    def forward(self, entries: list[torch.Tensor]) -> list[torch.Tensor]:
        """entries[k] (B, T, Dv) -> f_k (B, N, D)."""
        if len(entries) != self.count:
            raise ValueError(f"{len(entries)} token entries for {self.count} MMCI heads")
        return [self.head(tokens, index) for index, tokens in enumerate(entries)]


def _reference_order(item: tuple[str, tuple[int, int]]) -> int:
    """The reference's CovLayer registers fc_33, fc_11, fc_77, fc_55, fc_51, fc_15."""
    return ("33", "11", "77", "55", "51", "15").index(item[0])
