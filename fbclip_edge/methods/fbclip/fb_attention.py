"""The shared foreground/background attention block applied to every view (spec section 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FBAttention(nn.Module):
    """Gate tokens into foreground and background, attend within each, then fuse.

    Each branch: LayerNorm -> multi-head attention with a learned scalar scale -> Linear.
    Attribute names follow the published checkpoint (`fb_Attention.fg_to_q` ...).
    """

    def __init__(self, width: int, heads: int = 8, dim_head: int = 64) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.gate = nn.Sequential(nn.Linear(width, width // 2), nn.ReLU(), nn.Linear(width // 2, 1))
        for branch in ("fg", "bg"):
            setattr(self, f"{branch}_norm", nn.LayerNorm(width))
            setattr(self, f"{branch}_to_q", nn.Linear(width, inner, bias=False))
            setattr(self, f"{branch}_to_k", nn.Linear(width, inner, bias=False))
            setattr(self, f"{branch}_to_v", nn.Linear(width, inner, bias=False))
            setattr(self, f"{branch}_to_out", nn.Sequential(nn.Linear(inner, width)))
            setattr(self, f"{branch}_scale", nn.Parameter(torch.tensor(dim_head**-0.5)))
        self.norm = nn.LayerNorm(width)

    def _branch(self, x: torch.Tensor, branch: str) -> torch.Tensor:
        h = getattr(self, f"{branch}_norm")(x)
        batch, tokens, _ = h.shape

        def heads(proj: nn.Module) -> torch.Tensor:
            return proj(h).reshape(batch, tokens, self.heads, -1).transpose(1, 2)

        q = heads(getattr(self, f"{branch}_to_q")) * getattr(self, f"{branch}_scale")
        k = heads(getattr(self, f"{branch}_to_k"))
        v = heads(getattr(self, f"{branch}_to_v"))
        # The scale is learned, so it is folded into q and SDPA runs with scale 1.
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        out = out.transpose(1, 2).reshape(batch, tokens, -1)
        return getattr(self, f"{branch}_to_out")(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, Dv) -> (B, T, Dv)."""
        gate = torch.sigmoid(self.gate(x))
        return self.norm(self._branch(gate * x, "fg") + self._branch((1 - gate) * x, "bg"))
