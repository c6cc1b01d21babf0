"""Text side (spec section 5): object-agnostic prompts plus deep compound prompts.

Two prompts, "X..X object." (normal) and "X..X damaged object." (abnormal); the X
placeholders are learned contexts, and text blocks 2..depth first overwrite context
positions 1..t_n_ctx with a learned compound prompt, rounded to float16 as the reference
does. The result is two unit vectors (2, D), row 0 normal, row 1 abnormal.
"""

from __future__ import annotations

from dataclasses import dataclass

import open_clip
import torch
from open_clip.model import CLIP
from torch import nn

from fbclip_edge.errors import FBClipError

#: Width of the reference's unused `compound_prompt_projections` (MaPLe's vision side).
#: They are never applied; they exist so published checkpoints load and save unchanged.
UNUSED_PROJECTION_WIDTH = 896
#: The reference rounds each compound prompt to this dtype before inserting it.
COMPOUND_DTYPE = torch.float16


def prompt_tokens(
    n_ctx: int, class_name: str, templates: tuple[str, str], context_length: int
) -> torch.Tensor:
    """CLIP BPE ids (2, context) of the normal and abnormal prompts, 'X' for each context."""
    placeholder = " ".join(["X"] * n_ctx)
    texts = [f"{placeholder} {template.format(class_name)}" for template in templates]
    wide = open_clip.tokenize(texts, context_length=context_length + 64)
    longest = int((wide != 0).sum(dim=-1).max())
    if longest > context_length:
        raise FBClipError(
            f"the prompts take {longest} tokens, more than CLIP's {context_length}; "
            "use a smaller n_ctx or a shorter class name"
        )
    return wide[:, :context_length].contiguous()


def causal_mask(length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """CLIP's text mask: position i attends to positions <= i (additive, -inf above)."""
    return torch.full((length, length), float("-inf"), device=device, dtype=dtype).triu(1)


class PromptLearner(nn.Module):
    """The learned text parts, named and shaped as the reference's checkpoint.

    ctx_pos / ctx_neg (1, 1, n_ctx, Dt); compound_prompts_text.i (t_n_ctx, Dt) for text
    blocks 2..depth; compound_prompt_projections.i (unused, kept for checkpoint round trips).
    """

    tokens: torch.Tensor  # (2, context) prompt ids, a non-persistent buffer

    def __init__(
        self, tokens: torch.Tensor, n_ctx: int, depth: int, t_n_ctx: int, width: int
    ) -> None:
        super().__init__()
        self.n_ctx = n_ctx
        self.t_n_ctx = t_n_ctx
        self.ctx_pos = nn.Parameter(nn.init.normal_(torch.empty(1, 1, n_ctx, width), std=0.02))
        self.ctx_neg = nn.Parameter(nn.init.normal_(torch.empty(1, 1, n_ctx, width), std=0.02))
        self.compound_prompts_text = nn.ParameterList(
            nn.Parameter(nn.init.normal_(torch.empty(t_n_ctx, width), std=0.02))
            for _ in range(depth - 1)
        )
        self.compound_prompt_projections = nn.ModuleList(
            nn.Linear(width, UNUSED_PROJECTION_WIDTH) for _ in range(depth - 1)
        )
        self.compound_prompt_projections.requires_grad_(False)  # never used: no gradient
        self.register_buffer("tokens", tokens, persistent=False)

    def forward(self, token_embedding: nn.Embedding) -> torch.Tensor:
        """Prompt embeddings E (2, context, Dt): [start, contexts, words, end, padding]."""
        embedded = token_embedding(self.tokens)
        ctx = torch.cat([self.ctx_pos[0], self.ctx_neg[0]]).to(embedded.dtype)
        return torch.cat([embedded[:, :1], ctx, embedded[:, 1 + self.n_ctx :]], dim=1)

    def compound(self) -> list[torch.Tensor]:
        """The compound prompts in block order (text blocks 2, 3, ...)."""
        return list(self.compound_prompts_text)

    def prompt_embedding_rows(self, token_embedding: nn.Embedding) -> dict[str, torch.Tensor]:
        """The reference's stored buffers, recomputed: token_prefix_* / token_suffix_*."""
        embedded = token_embedding(self.tokens).detach()
        rows: dict[str, torch.Tensor] = {}
        for row, suffix in enumerate(("pos", "neg")):
            rows[f"token_prefix_{suffix}"] = embedded[row, None, None, :1]
            rows[f"token_suffix_{suffix}"] = embedded[row, None, None, 1 + self.n_ctx :]
        return rows


def insert_compound(
    x: torch.Tensor, prompt: torch.Tensor, rounding: torch.dtype | None = COMPOUND_DTYPE
) -> torch.Tensor:
    """Overwrite token positions 1..t of every prompt (B, context, Dt) with `prompt` (t, Dt).

    The reference inserts fp32(fp16(prompt)); the cast is in the autograd graph, so each
    prompt row's gradient is rounded to float16 before the rows' gradients are summed.
    """
    tokens = prompt.expand(x.shape[0], -1, -1)
    if rounding is not None:
        tokens = tokens.to(rounding).to(x.dtype)
    return torch.cat([x[:, :1], tokens, x[:, 1 + prompt.shape[0] :]], dim=1)


def _project(clip: CLIP, x: torch.Tensor) -> torch.Tensor:
    projection = clip.text_projection
    return projection(x) if isinstance(projection, nn.Module) else x @ projection


@dataclass
class TextStages:
    """The text encoder's stages (fixture names): block outputs, embeddings, features."""

    tokens: torch.Tensor  # (2, Lt, context, Dt): each text block's output, before ln_final
    embeddings: torch.Tensor  # (2, D): end-of-text row after ln_final @ text_projection
    features: torch.Tensor  # (2, D): embeddings / their L2 norm


def encode_prompts(
    clip: CLIP, prompts: PromptLearner, rounding: torch.dtype | None = COMPOUND_DTYPE
) -> TextStages:
    """Run CLIP's text tower (causal mask) on the learned prompts, compound prompts inserted.

    `rounding=None` skips the reference's float16 rounding of the compound prompts (only to
    show that it matters).
    """
    x = prompts(clip.token_embedding)
    x = x + clip.positional_embedding.to(x.dtype)
    mask = causal_mask(x.shape[1], x.device, x.dtype)
    compound = prompts.compound()
    batch_first = getattr(clip.transformer, "batch_first", True)
    outputs: list[torch.Tensor] = []
    for index, block in enumerate(clip.transformer.resblocks):
        if 1 <= index <= len(compound):  # text blocks 2..depth (1-based)
            x = insert_compound(x, compound[index - 1], rounding)
        if batch_first:
            x = block(x, attn_mask=mask)
        else:
            x = block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
        outputs.append(x)
    hidden = clip.ln_final(x)
    eot = hidden[torch.arange(hidden.shape[0], device=hidden.device), prompts.tokens.argmax(-1)]
    embeddings = _project(clip, eot)
    features = embeddings / embeddings.norm(dim=-1, keepdim=True)
    return TextStages(torch.stack(outputs, dim=1), embeddings, features)


def text_features(clip: CLIP, prompts: PromptLearner) -> torch.Tensor:
    """Unit text features (2, D) [normal, abnormal] (differentiable in the prompts)."""
    return encode_prompts(clip, prompts).features
