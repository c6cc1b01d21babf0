"""The shared foreground/background attention block applied to every view (spec section 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attend_maps(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, maps_per_call: int
) -> torch.Tensor:
    """softmax(q k^T) v over (B, M, H, T, dh) maps, the scale already folded into q.

    torch's SDPA kernels (flash on CPU and CUDA) never hold the (T, T) scores, so eager runs
    one call over every map. An ONNX graph writes attention as MatMul-Softmax-MatMul, which
    onnxruntime runs as written: one call would hold (B*M, H, T, T) scores at once (0.9 GB
    per image for ViT-L at 518), so the export makes one call per `maps_per_call` maps and
    the backend frees each chunk's scores before the next. Every call sees the 4-D
    (batch, heads, T, dh) layout fused attention kernels and TensorRT's MHA fusion expect.
    """
    batch, maps = q.shape[0], int(q.shape[1])  # batch stays symbolic in a traced graph
    step = maps if not torch.onnx.is_in_onnx_export() else max(1, min(maps_per_call, maps))
    chunks = []
    for start in range(0, maps, step):
        part = slice(start, min(start + step, maps))
        q4, k4, v4 = (x[:, part].reshape(-1, *x.shape[2:]) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q4, k4, v4, scale=1.0)
        chunks.append(out.reshape(batch, part.stop - start, *out.shape[1:]))
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)


class FBAttention(nn.Module):
    """Gate tokens into foreground and background, attend within each, then fuse.

    Each branch: LayerNorm -> multi-head attention with a learned scalar scale -> Linear.
    Attribute names follow the published checkpoint (`fb_Attention.fg_to_q` ...).
    `maps_per_call` only shapes exported graphs (see `attend_maps`).
    """

    def __init__(
        self, width: int, heads: int = 8, dim_head: int = 64, maps_per_call: int = 1
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.maps_per_call = maps_per_call
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

        def heads(proj: nn.Module) -> torch.Tensor:
            out = proj(h)  # reshape, not unflatten: the tracer keeps reshape's batch symbolic
            return out.reshape(*out.shape[:-1], self.heads, -1).transpose(-2, -3)

        # The scale is learned, so it is folded into q and attention runs with scale 1.
        q = heads(getattr(self, f"{branch}_to_q")) * getattr(self, f"{branch}_scale")
        k = heads(getattr(self, f"{branch}_to_k"))
        v = heads(getattr(self, f"{branch}_to_v"))
        out = attend_maps(q, k, v, self.maps_per_call).transpose(-2, -3)
        out = out.reshape(*out.shape[:-2], -1)
        return getattr(self, f"{branch}_to_out")(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, M, T, Dv) maps -> (B, M, T, Dv)."""
        gate = torch.sigmoid(self.gate(x))
        return self.norm(self._branch(gate * x, "fg") + self._branch((1 - gate) * x, "bg"))
