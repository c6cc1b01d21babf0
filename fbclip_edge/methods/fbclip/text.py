"""Text side: learnable prompts through CLIP's text tower, fused into two vectors (section 2)."""

from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from torch import nn


def prompt_tokens(
    n_ctx: int, class_name: str, templates: tuple[str, str], context_length: int
) -> torch.Tensor:
    """CLIP BPE ids of the normal and abnormal prompts, 'X' placeholders for the contexts."""
    placeholder = " ".join(["X"] * n_ctx)
    texts = [f"{placeholder} {template.format(class_name)}" for template in templates]
    return open_clip.tokenize(texts, context_length=context_length)


class PromptLearner(nn.Module):
    """n_ctx learnable context vectors per prompt, replacing the 'X' placeholders."""

    tokens: torch.Tensor  # a buffer: (2, context) token ids

    def __init__(self, tokens: torch.Tensor, n_ctx: int, width: int) -> None:
        super().__init__()
        self.n_ctx = n_ctx
        # Shapes (1, 1, n_ctx, Dt) match the published checkpoint.
        self.ctx_pos = nn.Parameter(torch.randn(1, 1, n_ctx, width) * 0.02)
        self.ctx_neg = nn.Parameter(torch.randn(1, 1, n_ctx, width) * 0.02)
        self.register_buffer("tokens", tokens, persistent=False)

    def forward(self, token_embedding: nn.Embedding) -> torch.Tensor:
        """Prompt embeddings (2, context, Dt): [start, contexts, class words, end, padding]."""
        embedded = token_embedding(self.tokens)
        ctx = torch.cat(
            [self.ctx_pos.reshape(1, self.n_ctx, -1), self.ctx_neg.reshape(1, self.n_ctx, -1)]
        ).to(embedded.dtype)
        return torch.cat([embedded[:, :1], ctx, embedded[:, 1 + self.n_ctx :]], dim=1)


class TextFusion(nn.Module):
    """MSTFF heads: attention-weighted pooling (token_selector) and its projection MLP."""

    def __init__(self, text_width: int, embed_dim: int) -> None:
        super().__init__()
        self.token_selector = nn.Sequential(
            nn.Linear(text_width, text_width // 2), nn.ReLU(), nn.Linear(text_width // 2, 1)
        )
        self.text_projection_mlp = nn.Sequential(
            nn.Linear(text_width, text_width), nn.ReLU(), nn.Linear(text_width, embed_dim)
        )


def _project(clip: CLIP, x: torch.Tensor) -> torch.Tensor:
    projection = clip.text_projection
    return projection(x) if isinstance(projection, nn.Module) else x @ projection


def encode_text(
    clip: CLIP,
    prompts: PromptLearner,
    fusion: TextFusion,
    weights: tuple[float, float, float] = (1.0, 0.5, 0.5),
) -> torch.Tensor:
    """Normalized text features (2, D), row 0 normal, row 1 abnormal.

    The text transformer runs without the causal mask, as the reference does.
    """
    x = prompts(clip.token_embedding) + clip.positional_embedding.to(
        clip.token_embedding.weight.dtype
    )
    batch_first = getattr(clip.transformer, "batch_first", True)
    x = clip.transformer(x if batch_first else x.transpose(0, 1), attn_mask=None)
    hidden = clip.ln_final(x if batch_first else x.transpose(0, 1))
    global_feature = _project(clip, hidden.mean(dim=1))
    eot = hidden[torch.arange(hidden.shape[0]), prompts.tokens.argmax(dim=-1)]
    eot_feature = _project(clip, eot)
    attention = fusion.token_selector(hidden).squeeze(-1).softmax(dim=-1)
    pooled = (attention[..., None] * hidden).sum(dim=1)
    attention_feature = fusion.text_projection_mlp(pooled)
    w_global, w_attention, w_eot = weights
    fused = w_global * global_feature + w_attention * attention_feature + w_eot * eot_feature
    return F.normalize(fused, dim=-1)
