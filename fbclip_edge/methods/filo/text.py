"""FiLo's text side (spec 4): per-category prompts, image-conditioned contexts, aggregation.

Per category (constant): the 7 normal and n_s * 9 abnormal prompt strings and their CLIP BPE
ids. Per image: the contexts shifted by meta_net(c), the text transformer on the prompts, the
normalised averages, and T = [n; a] / ||[n; a]|| (each row of norm 1/sqrt(2), a reference
quirk). With a position word only the n_s prompts of that position enter the abnormal average.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import open_clip
import torch
from open_clip.model import CLIP
from torch import nn

from fbclip_edge.errors import FBClipError
from fbclip_edge.methods.filo.descriptions import CategoryData
from fbclip_edge.methods.filo.vision import multihead_attention

#: WinCLIP-style normal states; "{}" is the class word.
NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
#: The generic abnormal states that follow the per-description ones.
GENERIC_ABNORMAL_STATES: tuple[str, ...] = (
    "damaged {}",
    "broken {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)
#: Position words, in prompt order (abnormal prompt index = state * 9 + position).
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)


def abnormal_states(descriptions: Sequence[str]) -> list[str]:
    """'abnormal {} with <d>' per description, then the generic states (n_s = n_d + 5)."""
    return ["abnormal {} with " + text for text in descriptions] + list(GENERIC_ABNORMAL_STATES)


def prompt_strings(
    class_word: str, descriptions: Sequence[str], n_ctx: int
) -> tuple[list[str], list[str]]:
    """(normal, abnormal) prompts: n_ctx 'X' words, the state, and for abnormal ' at <pos>'."""
    prefix = " ".join(["X"] * n_ctx)
    normal = [f"{prefix} {state.format(class_word)}." for state in NORMAL_STATES]
    abnormal = [
        f"{prefix} {state.format(class_word)} at {position}."
        for state in abnormal_states(descriptions)
        for position in POSITIONS
    ]
    return normal, abnormal


def tokenize(texts: Sequence[str], context_length: int, category: str) -> torch.Tensor:
    """CLIP BPE ids (P, context) with open_clip's tokenizer; a prompt that would be cut is an
    error naming the category (the reference would silently truncate it)."""
    wide = open_clip.tokenize(list(texts), context_length=context_length + 256)
    lengths = (wide != 0).sum(dim=-1)
    longest = int(lengths.max())
    if longest > context_length:
        text = texts[int(lengths.argmax())]
        raise FBClipError(
            f"category '{category}': prompt {text!r} takes {longest} tokens, more than CLIP's "
            f"{context_length}; shorten its description in the descriptions file"
        )
    return wide[:, :context_length].contiguous()


def position_index(word: str) -> int:
    """Index of a position word in POSITIONS, or a one-line error listing them."""
    if word not in POSITIONS:
        raise FBClipError(f"unknown position word {word!r}; use one of {', '.join(POSITIONS)}")
    return POSITIONS.index(word)


@dataclass(frozen=True)
class CategoryPrompts:
    """Everything constant per category: strings and CLIP token ids (spec 4.2-4.3, 11)."""

    data: CategoryData
    normal: tuple[str, ...]
    abnormal: tuple[str, ...]
    normal_ids: torch.Tensor  # (7, context)
    abnormal_ids: torch.Tensor  # (n_s * 9, context), state-major

    @property
    def category(self) -> str:
        """The category name (a key of the descriptions file)."""
        return self.data.category

    @property
    def num_states(self) -> int:
        """n_s = descriptions + 5 generic states."""
        return len(self.abnormal) // len(POSITIONS)

    def abnormal_rows(self, position: str | None) -> list[int]:
        """Abnormal prompt indices that enter the average: s * 9 + p, or all of them."""
        if position is None:
            return list(range(len(self.abnormal)))
        start = position_index(position)
        return list(range(start, len(self.abnormal), len(POSITIONS)))


def build_category_prompts(data: CategoryData, n_ctx: int, context_length: int) -> CategoryPrompts:
    """Prompt strings and token ids of one category, from its descriptions-file entry."""
    normal, abnormal = prompt_strings(data.class_word, data.descriptions, n_ctx)
    return CategoryPrompts(
        data=data,
        normal=tuple(normal),
        abnormal=tuple(abnormal),
        normal_ids=tokenize(normal, context_length, data.category),
        abnormal_ids=tokenize(abnormal, context_length, data.category),
    )


class PromptLearner(nn.Module):
    """Learned context (n_ctx, Dt) plus the meta-net D -> D/r -> Dt (CoCoOp-style).

    Names match the reference checkpoint: ctx, meta_net.linear1, meta_net.linear2.
    """

    def __init__(self, n_ctx: int, text_width: int, embed_dim: int, reduction: int = 16) -> None:
        super().__init__()
        self.ctx = nn.Parameter(nn.init.normal_(torch.empty(n_ctx, text_width), std=0.02))
        hidden = embed_dim // reduction
        self.meta_net = nn.Sequential(
            OrderedDict(
                [
                    ("linear1", nn.Linear(embed_dim, hidden)),
                    ("relu", nn.ReLU()),
                    ("linear2", nn.Linear(hidden, text_width)),
                ]
            )
        )

    def forward(self, token_embeddings: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings (P, L, Dt) = [E[:, :1], ctx + meta_net(c), E[:, 1 + n_ctx:]].

        c is ONE image's conditioning vector (1, D) (the reference conditions per call).
        """
        shifted = self.ctx.unsqueeze(0) + self.meta_net(c).unsqueeze(1)  # (1, n_ctx, Dt)
        count = token_embeddings.shape[0]
        ctx = shifted[0].unsqueeze(0).expand(count, -1, -1).to(token_embeddings.dtype)
        n_ctx = int(self.ctx.shape[0])
        return torch.cat([token_embeddings[:, :1], ctx, token_embeddings[:, 1 + n_ctx :]], dim=1)


def causal_mask(length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """CLIP's additive text mask: -inf above the diagonal."""
    return torch.full((length, length), float("-inf"), device=device, dtype=dtype).triu(1)


def _project(clip: CLIP, x: torch.Tensor) -> torch.Tensor:
    projection = clip.text_projection
    return projection(x) if isinstance(projection, nn.Module) else x @ projection


def encode_text(clip: CLIP, prompts: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """CLIP's text tower on prompt embeddings (P, L, Dt): causal mask, ln_final, the end-token
    row (argmax of the ids) @ text_projection -> (P, D), not normalised."""
    return encode_text_at(clip, prompts, token_ids.argmax(dim=-1))


def encode_text_at(clip: CLIP, prompts: torch.Tensor, end_index: torch.Tensor) -> torch.Tensor:
    """encode_text with each prompt's end-token position (P,) given: the form the exported
    text graph takes (the ids themselves stay on the host)."""
    x = prompts + clip.positional_embedding.to(prompts.dtype)
    x = x.permute(1, 0, 2)
    mask = causal_mask(int(x.shape[0]), x.device, x.dtype)
    for block in clip.transformer.resblocks:
        x = x + multihead_attention(block.attn, block.ln_1(x), mask)
        x = x + block.mlp(block.ln_2(x))
    x = clip.ln_final(x.permute(1, 0, 2))
    rows = x[torch.arange(x.shape[0], device=x.device), end_index.to(x.device)]
    return _project(clip, rows)


def _unit_mean(features: torch.Tensor) -> torch.Tensor:
    """Normalise each row, average, normalise: (R, D) -> (1, 1, D) (reference order)."""
    features = features / features.norm(dim=-1, keepdim=True)
    mean = features.mean(dim=0, keepdim=True)
    return (mean / mean.norm()).unsqueeze(1)


def aggregate(normal: torch.Tensor, abnormal: torch.Tensor) -> torch.Tensor:
    """Raw prompt features -> T (2, D): [n; a] over its whole-matrix norm (quirk: rows of
    norm 1/sqrt(2)). `abnormal` holds only the rows that enter the average."""
    text = torch.cat([_unit_mean(normal), _unit_mean(abnormal)], dim=1)
    return (text / text.norm())[0]


def check_context_length(clip: CLIP, ids: torch.Tensor) -> None:
    """Token ids must have CLIP's context length (its positional embedding rows)."""
    context = int(clip.positional_embedding.shape[0])
    if int(ids.shape[-1]) != context:
        raise FBClipError(
            f"prompt ids have {int(ids.shape[-1])} positions but CLIP's text context is "
            f"{context}; rebuild the category prompts for this model"
        )
