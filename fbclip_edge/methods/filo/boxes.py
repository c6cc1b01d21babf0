"""Host side of FiLo's Grounding DINO step (spec 8.2-8.6), as pure functions.

Grounding DINO itself is a separate graph: it takes the image and the caption's BERT ids and
gives pred_logits (Q x C, C <= 256 text positions) and pred_boxes (Q x 4, normalised cx, cy,
w, h). Everything after it lives here: the caption, the box filter with its fallback, the
phrases with their "(0.xx)" score, the anomaly boxes, pixel boxes, the position word and the
0.7 damping outside the boxes, reference quirks included.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fbclip_edge.errors import FBClipError

#: The five general defect words that start every caption (spec 8.2).
GENERAL_WORDS: tuple[str, ...] = ("anomaly", "damage", "broken", "defect", "contamination")
#: Position regions ((x1, y1), (x2, y2)), inclusive pixels at S = 518, used whatever S is.
POSITION_REGIONS: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "top left": ((0, 0), (172, 172)),
    "top": ((173, 0), (344, 172)),
    "top right": ((345, 0), (517, 172)),
    "left": ((0, 173), (172, 344)),
    "center": ((173, 173), (344, 344)),
    "right": ((345, 173), (517, 344)),
    "bottom left": ((0, 345), (172, 517)),
    "bottom": ((173, 345), (344, 517)),
    "bottom right": ((345, 345), (517, 517)),
}
#: The centre used when no anomaly box was found.
DEFAULT_CENTER: tuple[float, float] = (259.0, 259.0)
#: Text positions >= this are never read into a phrase (the reference's right_idx).
MAX_TEXT_POSITION = 255


def grounding_caption(descriptions: Sequence[str]) -> str:
    """General words + the category's Grounding DINO descriptions joined with ' . ',
    lower-cased, stripped, with a final '.' (spec 8.2)."""
    caption = " . ".join([*GENERAL_WORDS, *descriptions]).lower().strip()
    return caption if caption.endswith(".") else caption + "."


def _is_whitespace(char: str) -> bool:
    return char in " \t\n\r" or unicodedata.category(char) == "Zs"


def _is_control(char: str) -> bool:
    return char not in "\t\n\r" and unicodedata.category(char).startswith("C")


def _is_punctuation(char: str) -> bool:
    code = ord(char)
    ascii_punct = 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126
    return ascii_punct or unicodedata.category(char).startswith("P")


def _is_cjk(code: int) -> bool:
    ranges = (
        (0x4E00, 0x9FFF),
        (0x3400, 0x4DBF),
        (0x20000, 0x2A6DF),
        (0x2A700, 0x2B73F),
        (0x2B740, 0x2B81F),
        (0x2B820, 0x2CEAF),
        (0xF900, 0xFAFF),
        (0x2F800, 0x2FA1F),
    )
    return any(low <= code <= high for low, high in ranges)


def _basic_words(text: str) -> list[str]:
    """BERT's basic tokenizer (uncased): clean, split CJK, lower-case, strip accents, split on
    whitespace and punctuation."""
    cleaned = []
    for char in text:
        if ord(char) in (0, 0xFFFD) or _is_control(char):
            continue
        if _is_cjk(ord(char)):
            cleaned.append(f" {char} ")
        else:
            cleaned.append(" " if _is_whitespace(char) else char)
    words: list[str] = []
    for word in "".join(cleaned).split():
        word = unicodedata.normalize("NFD", word.lower())
        word = "".join(char for char in word if unicodedata.category(char) != "Mn")
        piece = ""
        for char in word:
            if _is_punctuation(char):
                words += [piece, char] if piece else [char]
                piece = ""
            else:
                piece += char
        if piece:
            words.append(piece)
    return words


@dataclass(frozen=True)
class BertVocab:
    """An uncased WordPiece vocabulary (vocab.txt): caption ids and phrase decoding."""

    tokens: tuple[str, ...]

    @classmethod
    def from_file(cls, path: str | Path) -> BertVocab:
        """vocab.txt, or a folder holding it (a BERT / tokenizer folder)."""
        path = Path(path)
        if path.is_dir():
            path = path / "vocab.txt"
        if not path.is_file():
            raise FBClipError(f"BERT vocabulary not found: {path}; pass vocab.txt or its folder")
        return cls(tuple(path.read_text(encoding="utf-8").splitlines()))

    @property
    def index(self) -> dict[str, int]:
        """token -> id."""
        return {token: i for i, token in enumerate(self.tokens)}

    def _wordpiece(self, word: str, index: dict[str, int]) -> list[int]:
        """Greedy longest-match-first split; [UNK] for a word that does not split."""
        if len(word) > 100:
            return [index["[UNK]"]]
        ids: list[int] = []
        start = 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in index:
                    ids.append(index[piece])
                    break
                end -= 1
            if end == start:
                return [index["[UNK]"]]
            start = end
        return ids

    def encode(self, text: str) -> list[int]:
        """[CLS] + WordPiece ids + [SEP], as bert-base-uncased's tokenizer makes them."""
        index = self.index
        ids = [index["[CLS]"]]
        for word in _basic_words(text):
            ids += self._wordpiece(word, index)
        return ids + [index["[SEP]"]]

    def decode(self, ids: Sequence[int]) -> str:
        """transformers' decode with its defaults: tokens joined by spaces, '##' pieces glued
        to the previous token, then the clean-up of spaces before punctuation and
        contractions; special tokens stay as text."""
        text = ""
        for position, token_id in enumerate(ids):
            token = self.tokens[int(token_id)]
            if position:
                token = token[2:] if token.startswith("##") else " " + token
            text += token
        for dirty, clean in (
            (" .", "."),
            (" ?", "?"),
            (" !", "!"),
            (" ,", ","),
            (" ' ", "'"),
            (" n't", "n't"),
            (" 'm", "'m"),
            (" 's", "'s"),
            (" 've", "'ve"),
            (" 're", "'re"),
        ):
            text = text.replace(dirty, clean)
        return text


@dataclass
class BoxResult:
    """What the host side derives from one image's Grounding DINO outputs (k >= 1 boxes)."""

    queries: torch.Tensor  # (k,) kept query indices, in query order
    scores: torch.Tensor  # (k,) s_q = max sigmoid over the text positions
    boxes: torch.Tensor  # (k, 4) kept pred_boxes, normalised cx, cy, w, h
    labels: list[str]  # phrase + "(0.xx)"
    is_anomaly: torch.Tensor  # (k,) bool
    boxes_final: torch.Tensor  # (k, 4) pixel x0, y0, x1, y1 for anomaly boxes, else untouched
    center: torch.Tensor  # (2,) centre of the best anomaly box, or (259, 259)
    position: str | None  # the position word, or None (all positions are averaged)

    @property
    def positions(self) -> list[str]:
        """The reference's position list: [] or [word]."""
        return [] if self.position is None else [self.position]


def select_queries(
    probs: torch.Tensor, boxes: torch.Tensor, box_threshold: float, area_threshold: float
) -> torch.Tensor:
    """Queries with s_q > box_threshold and w * h < area_threshold, in query order; if none,
    the single best query whatever its area (spec 8.3)."""
    best = probs.max(dim=1)[0]
    keep = torch.bitwise_and(best > box_threshold, boxes[:, 2] * boxes[:, 3] < area_threshold)
    if int(keep.sum()) == 0:
        return torch.argmax(best).reshape(1)
    return keep.nonzero().flatten()


def phrase(
    probs: torch.Tensor, input_ids: Sequence[int], vocab: BertVocab, threshold: float
) -> str:
    """Decode the caption tokens whose probability > threshold, skipping position 0 ([CLS])
    and positions >= 255 (spec 8.3)."""
    hits = (probs > threshold).nonzero().flatten().tolist()
    limit = min(MAX_TEXT_POSITION, len(input_ids))
    return vocab.decode([int(input_ids[i]) for i in hits if 0 < i < limit])


def score_label(text: str, score: float) -> str:
    """phrase + '(' + the first 4 characters of str(score) + ')' (truncation, not rounding)."""
    return f"{text}({str(float(score))[:4]})"


def label_score(label: str) -> float:
    """The number in the first '(...)' of a label, as the reference reads it back; a string
    that is not a number (a score below 1e-4 prints as '1.2e...') counts as 0."""
    found = re.search(r"\((.*?)\)", label)
    try:
        return float(found.group(1)) if found else 0.0
    except ValueError:
        return 0.0


def is_anomaly_label(label: str, descriptions: Sequence[str]) -> bool:
    """A description (original case) or a general word is a substring of the label
    (case-sensitive; [ref quirk] a capitalised description never matches)."""
    return any(text in label for text in [*descriptions, *GENERAL_WORDS])


def pixel_box(box: torch.Tensor, image_size: int) -> torch.Tensor:
    """Normalised (cx, cy, w, h) -> pixel (x0, y0, x1, y1) in float32, the reference's order:
    scale all four, then x0 = cx - w/2, y0 = cy - h/2, x1 = x0 + w, y1 = y0 + h."""
    out = box.float() * torch.tensor([float(image_size)] * 4, dtype=torch.float32)
    out[:2] -= out[2:] / 2
    out[2:] += out[:2]
    return out


def position_word(center: tuple[float, float]) -> str | None:
    """The first region containing the centre, or None for a centre in a gap (quirk)."""
    x, y = center
    for name, ((x1, y1), (x2, y2)) in POSITION_REGIONS.items():
        if x1 <= x <= x2 and y1 <= y <= y2:
            return name
    return None


def best_center(
    boxes_final: torch.Tensor, labels: Sequence[str], flags: torch.Tensor
) -> torch.Tensor:
    """Centre of the anomaly box with the largest label score (ties: the later box), or
    (259, 259) without one (spec 8.5)."""
    best: torch.Tensor | None = None
    top = 0.0
    for i, label in enumerate(labels):
        if not bool(flags[i]):
            continue
        number = label_score(label)
        if number >= top:
            best, top = boxes_final[i], number
    if best is None:
        return torch.tensor(DEFAULT_CENTER, dtype=torch.float32)
    return torch.stack([(best[0] + best[2]) / 2, (best[1] + best[3]) / 2])


def locate(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    input_ids: Sequence[int] | torch.Tensor,
    vocab: BertVocab,
    descriptions: Sequence[str],
    image_size: int = 518,
    box_threshold: float = 0.25,
    text_threshold: float = 0.25,
    area_threshold: float = 0.7,
) -> BoxResult:
    """Spec 8.3-8.5 for one image: raw pred_logits (Q, C) and pred_boxes (Q, 4), the caption's
    BERT ids, and the category's Grounding DINO descriptions -> boxes and position word
    (host-side: the results are on the CPU)."""
    if logits.dim() != 2 or boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise FBClipError(
            f"Grounding DINO outputs must be one image's (Q, C) logits and (Q, 4) boxes, got "
            f"{tuple(logits.shape)} and {tuple(boxes.shape)}"
        )
    ids = [int(i) for i in input_ids]
    probs = logits.detach().float().cpu().sigmoid()
    boxes = boxes.detach().float().cpu()
    queries = select_queries(probs, boxes, box_threshold, area_threshold)
    scores = probs[queries].max(dim=1)[0]
    labels = [
        score_label(phrase(probs[q], ids, vocab, text_threshold), float(s))
        for q, s in zip(queries.tolist(), scores, strict=True)
    ]
    flags = torch.tensor([is_anomaly_label(label, descriptions) for label in labels])
    final = boxes[queries].clone()
    for i in flags.nonzero().flatten().tolist():
        final[i] = pixel_box(final[i], image_size)
    center = best_center(final, labels, flags)
    return BoxResult(
        queries=queries,
        scores=scores,
        boxes=boxes[queries],
        labels=labels,
        is_anomaly=flags,
        boxes_final=final,
        center=center,
        position=position_word((float(center[0]), float(center[1]))),
    )


def box_mask(amap: torch.Tensor, boxes_final: torch.Tensor) -> torch.Tensor:
    """Copy of A (..., S, S) with 1 in every box's [trunc(y0):trunc(y1), trunc(x0):trunc(x1)]
    (Python slices: negative starts count from the end, quirk a; normalised boxes select
    nothing, quirk b)."""
    marked = amap.clone()
    for rect in boxes_final.tolist():
        x0, y0, x1, y1 = (int(value) for value in rect)
        marked[..., y0:y1, x0:x1] = 1
    return marked


def apply_boxes(amap: torch.Tensor, boxes_final: torch.Tensor, factor: float = 0.7) -> torch.Tensor:
    """Spec 8.6: A where the marked copy is 1 (inside a box, or A exactly 1: quirk c), else
    factor * A. amap is one image's (S, S) or (1, S, S) map."""
    return torch.where(box_mask(amap, boxes_final) == 1, amap, amap * factor)
