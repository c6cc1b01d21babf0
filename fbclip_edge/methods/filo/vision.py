"""CLIP's vision tower with FiLo's V-V path (spec 2.1-2.5).

Blocks 1..vv_start-1 are plain CLIP blocks. In blocks vv_start..L the original path runs
unchanged while a V-V attention (v as query, key and value; same weights, same input
ln_1(X_{b-1})) accumulates into V_b = V_{b-1} + VV_b, V starting at X_{vv_start-1}; no MLP on
that path. The token entries the heads read carry the reference's in-place updates (spec 2.3).

The operations follow the reference's evaluation order so that CPU float32 results agree to the
last bit (spec 2.5): sequence-first (T, B, C) layout, PyTorch's MultiheadAttention kernel for
the plain blocks, product-then-scale scores with the maximum subtracted (per image, which is
what the reference's one-image calls subtract) for the original attention of V-V blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from fbclip_edge.clip.backbone import check_pixels
from fbclip_edge.errors import FBClipError


@dataclass
class TowerTokens:
    """One pass of the tower: the entries in config.entry_layers order and the last state.

    All (B, T, Dv), CLS first, batch-first and contiguous; ln_post not applied.
    """

    entries: list[torch.Tensor]
    last: torch.Tensor  # X_L: the original path after the last block


def check_vision_blocks(visual: VisionTransformer) -> None:
    """The V-V path reuses packed in_proj / out_proj weights: refuse towers without them."""
    for index, block in enumerate(visual.transformer.resblocks, start=1):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, nn.MultiheadAttention) or attn.in_proj_weight is None:
            raise FBClipError(
                f"vision block {index} has no standard packed-qkv attention "
                f"({type(attn).__name__}); FiLo needs a plain open_clip ViT (e.g. ViT-L-14-336)"
            )
    if not isinstance(getattr(visual, "proj", None), torch.Tensor):
        raise FBClipError(
            "the vision tower has no visual.proj matrix; FiLo needs a plain open_clip ViT "
            "with a projection (e.g. ViT-L-14-336)"
        )


def embed(visual: VisionTransformer, pixel_values: torch.Tensor) -> torch.Tensor:
    """Stem: patches + CLS + positional embedding -> ln_pre, sequence-first (T, B, Dv)."""
    check_pixels(pixel_values, int(visual.conv1.kernel_size[0]))
    x = visual.conv1(pixel_values.to(visual.conv1.weight.dtype))
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype) + torch.zeros(
        x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device
    )
    x = torch.cat([cls, x], dim=1)
    pos = visual.positional_embedding
    if int(pos.shape[0]) != int(x.shape[1]):
        raise FBClipError(
            f"image of {int(x.shape[1]) - 1} patches, but the model's positional embedding has "
            f"{int(pos.shape[0]) - 1}; feed images of the model's image_size"
        )
    x = x + pos.to(x.dtype)
    return visual.ln_pre(x).permute(1, 0, 2)


def multihead_attention(
    attn: nn.MultiheadAttention, x: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """PyTorch's MultiheadAttention kernel on sequence-first x (L, B, C), as the reference's
    (sequence-first) modules call it; independent of the module's batch_first flag."""
    out, _ = F.multi_head_attention_forward(
        x,
        x,
        x,
        int(attn.embed_dim),
        int(attn.num_heads),
        attn.in_proj_weight,
        attn.in_proj_bias,
        attn.bias_k,
        attn.bias_v,
        attn.add_zero_attn,
        0.0,
        attn.out_proj.weight,
        attn.out_proj.bias,
        training=False,
        need_weights=False,
        attn_mask=mask,
    )
    return out


def plain_block(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """CLIP's pre-norm block on (T, B, C): x + Attn(ln_1 x), then + MLP(ln_2 .)."""
    x = x + multihead_attention(block.attn, block.ln_1(x))
    return x + block.mlp(block.ln_2(x))


def surgery_attention(
    attn: nn.MultiheadAttention, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(V-V attention, original attention) of ln_1 output x (T, B, C), both after out_proj.

    Original: softmax((q k^T) * d_h^-0.5 - max), the max over all heads and positions of one
    image. V-V: softmax((v v^T) * d_h^-0.5) v, no shift.
    """
    heads = int(attn.num_heads)
    y = x.transpose(0, 1)
    batch, tokens, width = y.shape
    qkv = F.linear(y, attn.in_proj_weight, attn.in_proj_bias)
    qkv = qkv.reshape(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scale = (width // heads) ** -0.5
    scores = (q @ k.transpose(-2, -1)) * scale
    scores = (scores - scores.amax(dim=(1, 2, 3), keepdim=True)).softmax(dim=-1)
    vv = ((v @ v.transpose(-2, -1)) * scale).softmax(dim=-1)
    vv_out = (vv @ v).transpose(1, 2).reshape(batch, tokens, width)
    original = (scores @ v).transpose(1, 2).reshape(batch, tokens, width)
    weight, bias = attn.out_proj.weight, attn.out_proj.bias
    return F.linear(vv_out, weight, bias).transpose(0, 1), F.linear(
        original, weight, bias
    ).transpose(0, 1)


def _batch_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1).contiguous()


def run_tower(
    visual: VisionTransformer,
    pixel_values: torch.Tensor,
    entry_layers: tuple[tuple[int, str], ...],
    vv_start: int,
) -> TowerTokens:
    """Run every block (the last one is needed for the image embedding); keep the entries.

    entry_layers is FiLoConfig.entry_layers: (layer, 'plain' | 'vv' | 'original').
    """
    x = embed(visual, pixel_values)
    plain_wanted = {layer for layer, kind in entry_layers if kind == "plain"}
    original_wanted = {layer for layer, kind in entry_layers if kind == "original"}
    plain: dict[int, torch.Tensor] = {}
    original: dict[int, torch.Tensor] = {}
    vv_state: torch.Tensor | None = None
    for index, block in enumerate(visual.transformer.resblocks, start=1):
        if index < vv_start:
            x = plain_block(block, x)
        else:
            vv_res, original_res = surgery_attention(block.attn, block.ln_1(x))
            middle = x + original_res
            if index - 1 in original_wanted:
                original[index - 1] = middle
            vv_state = (x if vv_state is None else vv_state) + vv_res
            x = middle + block.mlp(block.ln_2(middle))
        if index in plain_wanted:
            plain[index] = x
    if vv_state is None:
        raise FBClipError(f"vv_start {vv_start} is past the last vision block; lower it")
    last = len(visual.transformer.resblocks)
    original.setdefault(last, x)
    entries = []
    for layer, kind in entry_layers:
        if kind == "plain":
            entries.append(_batch_first(plain[layer]))
        elif kind == "original":
            entries.append(_batch_first(original[layer]))
        else:
            entries.append(_batch_first(vv_state))
    return TowerTokens(entries, _batch_first(x))


def project_tokens(visual: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """ln_post then visual.proj on every token (B, T, Dv) -> (B, T, D); row 0 is the image
    embedding. All tokens, as the reference (the adapter then runs on all of them too)."""
    return visual.ln_post(tokens) @ visual.proj.to(tokens.dtype)
