"""CLIP's vision tower with AnomalyCLIP's V-V side stream (spec sections 2-4).

Plain path: h_l = Block_l(h_{l-1}), CLIP unchanged. V-V path: z starts as h_{s-1} and, in
each dual-path block l >= s, z_l = z_{l-1} + VV_l(ln_1_l(h_{l-1})), where VV_l is the
block's attention with queries, keys and values all set to its value projection. The V-V
path reads the plain tokens and never feeds back.

Export-friendly: every block computes its packed qkv projection once and runs attention
through `F.scaled_dot_product_attention`; a dual-path block runs the plain and the V-V
attention in one call, the two stacked along the batch axis, then one out_proj (two calls
in an exported graph, see `dual_block`). The block loop depends only on the config, never
on tensor shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from fbclip_edge.clip.backbone import check_pixels, resize_positional_embedding
from fbclip_edge.errors import FBClipError


@dataclass
class VisionStreams:
    """One pass of the two-path tower: the tokens AnomalyCLIP reads, all (B, T, Dv)."""

    branch: torch.Tensor  # h_{s-1}: where the V-V stream starts (ln_pre output if s == 1)
    plain: list[torch.Tensor]  # h_L for each requested layer L
    vv: list[torch.Tensor]  # z_L for each requested layer L (h_L before the V-V blocks)
    last: torch.Tensor  # h_Lv: the plain output of the last block


def check_vision_blocks(visual: VisionTransformer) -> None:
    """The V-V path reuses packed in_proj / out_proj weights: refuse towers without them."""
    for index, block in enumerate(visual.transformer.resblocks, start=1):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, nn.MultiheadAttention) or attn.in_proj_weight is None:
            raise FBClipError(
                f"vision block {index} has no standard packed-qkv attention "
                f"({type(attn).__name__}); AnomalyCLIP needs a plain open_clip ViT "
                "(e.g. ViT-L-14-336, ViT-B-16)"
            )
    if not isinstance(getattr(visual, "proj", None), torch.Tensor):
        raise FBClipError(
            "the vision tower has no visual.proj matrix; AnomalyCLIP needs a plain open_clip "
            "ViT with a projection (e.g. ViT-L-14-336, ViT-B-16)"
        )


def embed(visual: VisionTransformer, pixel_values: torch.Tensor) -> torch.Tensor:
    """Stem: patches + CLS + positional embedding (resized to the grid) -> ln_pre (B, T, Dv)."""
    check_pixels(pixel_values, int(visual.conv1.kernel_size[0]))
    x = visual.conv1(pixel_values.to(visual.conv1.weight.dtype))
    grid = x.shape[-1]
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1)
    x = x + resize_positional_embedding(visual.positional_embedding, grid).to(x.dtype)
    x = visual.patch_dropout(x)
    return visual.ln_pre(x)


def _qkv(
    block: ResidualAttentionBlock, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ln_1 then the packed projection, once: per-head q, k, v (B, H, T, Dv / H)."""
    attn = block.attn
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.unflatten(-1, (3, int(attn.num_heads), -1)).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def _scale(block: ResidualAttentionBlock) -> float:
    """1 / sqrt(head width), a constant (so an exported graph does not recompute it)."""
    attn = block.attn
    return float(int(attn.embed_dim) // int(attn.num_heads)) ** -0.5


def _merge_project(block: ResidualAttentionBlock, o: torch.Tensor) -> torch.Tensor:
    """(N, H, T, Dv / H) -> concat heads -> out_proj (N, T, Dv)."""
    out = block.attn.out_proj
    return F.linear(o.transpose(1, 2).flatten(2), out.weight, out.bias)


def _mlp_residual(
    block: ResidualAttentionBlock, x: torch.Tensor, attention: torch.Tensor
) -> torch.Tensor:
    """The rest of a CLIP block: y = x + attn; y + MLP(ln_2(y)) (layer scales as open_clip)."""
    x = x + block.ls_1(attention)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def plain_block(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """CLIP's block: x + MHA(ln_1(x)), then the MLP residual."""
    q, k, v = _qkv(block, x)
    attention = F.scaled_dot_product_attention(q, k, v, scale=_scale(block))
    return _mlp_residual(block, x, _merge_project(block, attention))


def dual_block(
    block: ResidualAttentionBlock, h: torch.Tensor, z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One dual-path block: (h_{l-1}, z_{l-1}) -> (h_l, z_l).

    The plain attention (q, k, v) and the V-V attention (v, v, v) share the projection. In
    torch they run as one SDPA call on the batch-stacked inputs, then one out_proj. An ONNX
    graph writes attention as MatMul-Softmax-MatMul, which onnxruntime runs as written, so
    the stacked call would hold (2B, H, T, T) scores at once; the export makes two calls,
    each no larger than a plain block's, and skips the three stacking copies.
    """
    q, k, v = _qkv(block, h)
    scale = _scale(block)
    if torch.onnx.is_in_onnx_export():
        plain_attention = _merge_project(
            block, F.scaled_dot_product_attention(q, k, v, scale=scale)
        )
        vv_attention = _merge_project(block, F.scaled_dot_product_attention(v, v, v, scale=scale))
    else:
        both = F.scaled_dot_product_attention(
            torch.cat([q, v]), torch.cat([k, v]), torch.cat([v, v]), scale=scale
        )
        plain_attention, vv_attention = _merge_project(block, both).unflatten(0, (2, -1)).unbind(0)
    return _mlp_residual(block, h, plain_attention), z + vv_attention


def run_streams(
    visual: VisionTransformer, pixel_values: torch.Tensor, layers: tuple[int, ...], vv_start: int
) -> VisionStreams:
    """Run every block; keep the plain and V-V tokens after each of `layers` (1-based).

    Blocks vv_start.. carry the V-V stream, but only up to the last requested layer (past it
    nothing reads the stream); the plain path always runs to the last block for the CLS.
    """
    h = embed(visual, pixel_values)
    blocks = list(visual.transformer.resblocks)
    last_vv = max(layers)
    branch = h
    z = h
    plain: list[torch.Tensor] = []
    vv: list[torch.Tensor] = []
    for index, block in enumerate(blocks, start=1):
        if vv_start <= index <= last_vv:
            h, z = dual_block(block, h, z)
        else:
            h = plain_block(block, h)
            if index < vv_start:
                z = h
                branch = h
        if index in layers:
            plain.append(h)
            vv.append(z)
    return VisionStreams(branch, plain, vv, h)
