"""Grounding DINO's ONNX graph (written by `export.grounding_onnx`) on onnxruntime.

One image and one caption per call, fed as the BERT tokenizer returns a single caption:
attention mask all ones, token types all zeros. The graph's interface names and metadata key
live here, where they are read; the export imports them (runtime does not import export).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from fbclip_edge.artifacts.manifest import ArtifactError
from fbclip_edge.errors import FBClipError
from fbclip_edge.runtime.onnx_session import GraphSession

INPUT_NAMES = ("pixel_values", "input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAMES = ("logits", "pred_boxes")
#: onnx metadata key holding what the runner needs beyond the input shapes
METADATA_KEY = "fbclip_edge.grounding"


class GroundingOnnx:
    """A Grounding DINO graph called like the port for one image and one caption: (Q, L)
    logits and (Q, 4) boxes for `boxes_from_outputs`. Inputs are checked here first, so a
    wrong frame size or caption gets its own fix rather than the graph's shape error."""

    def __init__(self, session: GraphSession) -> None:
        self.session = session
        self.name = session.name
        meta = session.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        names = tuple(name for name, _, _ in session.inputs), tuple(session.outputs)
        try:
            if meta is None or names != (INPUT_NAMES, OUTPUT_NAMES):
                raise KeyError(METADATA_KEY)
            values = json.loads(meta)
            self.image_hw = (int(values["image_hw"][0]), int(values["image_hw"][1]))
            self.text_len: int | None = values["text_len"]
            self.max_text_len = int(values["max_text_len"])
        except (KeyError, TypeError, ValueError, IndexError):
            raise ArtifactError(
                f"{self.name} was not written by export_grounding_onnx (no usable {METADATA_KEY} "
                "metadata or other inputs); re-export it"
            ) from None

    @classmethod
    def open(
        cls, path: str | Path, provider: str = "cpu", threads: int | None = None
    ) -> GroundingOnnx:
        """The runner on one graph file, with the package's session options for provider."""
        path = Path(path)
        if not path.is_file():
            raise FBClipError(f"{path} not found; export it with export_grounding_onnx")
        return cls(GraphSession.open(path, provider, threads))

    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        expected = (1, 3, *self.image_hw)
        got = tuple(pixel_values.shape)
        if got == expected and pixel_values.dtype == torch.float32:
            return
        fix = (
            "frames of another size than exported; re-export with --frame-size WxH of the camera"
            if got[-2:] != self.image_hw
            else "feed one gd_preprocess image (batch 1) as float32"
        )
        raise FBClipError(
            f"{self.name} takes pixel_values {expected} float32, got {got} "
            f"{pixel_values.dtype}; {fix}"
        )

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        integer = input_ids.dtype in (torch.int64, torch.int32)
        if input_ids.ndim != 2 or input_ids.shape[0] != 1 or not integer:
            raise FBClipError(
                f"{self.name} takes input_ids (1, L) int64, got {tuple(input_ids.shape)} "
                f"{input_ids.dtype}; pass one caption's token ids with a leading batch axis"
            )
        length = int(input_ids.shape[1])
        if self.text_len is not None and length != self.text_len:
            raise FBClipError(
                f"{self.name} was exported for {self.text_len} caption tokens, got {length}; "
                "re-export with text_len=None (dynamic) or this caption's length"
            )
        if not 2 <= length <= self.max_text_len:
            raise FBClipError(
                f"caption of {length} tokens is outside 2..{self.max_text_len} (Grounding "
                "DINO's max_text_len); shorten the category's grounding descriptions"
            )

    def feed(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> dict[str, np.ndarray]:
        """The graph inputs for one image and one unpadded caption: attention_mask all ones
        and token_type_ids all zeros, as the BERT tokenizer returns for a single caption."""
        self._check_pixels(pixel_values)
        self._check_ids(input_ids)
        ids = input_ids.long()
        return self.session.feed([pixel_values, ids, torch.ones_like(ids), torch.zeros_like(ids)])

    def __call__(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, L) logits and (Q, 4) boxes (normalised cx, cy, w, h) of one image."""
        logits, boxes = self.session.run(self.feed(pixel_values, input_ids))
        return logits[0], boxes[0]


__all__ = ["INPUT_NAMES", "METADATA_KEY", "OUTPUT_NAMES", "GroundingOnnx"]
