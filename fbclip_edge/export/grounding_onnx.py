"""FiLo's Grounding DINO (transformers' port) as one ONNX graph (run by
`runtime.grounding_onnx.GroundingOnnx`).

One image and one caption per call (spec 8.1): pixels (1, 3, H, W) + caption tokens (1, L) ->
logits (1, Q, L) and boxes (1, Q, 4); the host side (`GroundingDetector.boxes_from_outputs`)
is unchanged. Exported with the TorchScript exporter: the port traces in seconds, with its
multi-scale deformable attention on the pure-PyTorch grid_sample path (ONNX GridSample, opset
16+; checked on the graph) and the two-stage top-900 selection as a TopK (spec 13).

The one construct it cannot export is the port's sub-sentence mask builder (aten::isin, cummax
and cummin have no ONNX form); while tracing it is swapped for an equivalent written with
comparisons and reductions, which keeps the text length L a dynamic axis. The image size is
fixed per export: the backbone's padding and the level shapes are traced as constants.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from fbclip_edge.artifacts.manifest import TensorSpec
from fbclip_edge.errors import FBClipError
from fbclip_edge.export.onnx_graph import check_graph
from fbclip_edge.methods.filo.boxes import grounding_caption
from fbclip_edge.methods.filo.grounding import GroundingDetector
from fbclip_edge.runtime.grounding_onnx import INPUT_NAMES, METADATA_KEY, OUTPUT_NAMES

TEXT_AXIS = "text_len"
#: GridSample (the pure deformable attention path) needs opset 16
MIN_OPSET = 16


@dataclass(frozen=True)
class GroundingGraphSpec:
    """What one export wrote: the file, its interface, and the sizes baked into it."""

    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    image_hw: tuple[int, int]
    text_len: int | None  # None: the text axis is dynamic ("text_len")
    max_text_len: int  # longer captions are truncated by the port, refused by the graph
    num_queries: int
    opset: int
    ops: tuple[str, ...]

    @property
    def dynamic_text(self) -> bool:
        return self.text_len is None


class _GroundingGraph(nn.Module):
    """The port with plain tensor outputs, logits cut to the caption's L columns (the port
    pads them with -inf to max_text_len; `raw_outputs` cuts them the same way)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.model(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            return_dict=True,
        )
        return output.logits[..., : input_ids.shape[1]], output.pred_boxes


def sub_sentence_masks(
    input_ids: torch.Tensor, special_tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The port's `generate_masks_with_special_tokens_and_transfer_map` without isin, cummax
    and cummin: the previous / next delimiter of each position as a masked max / min over an
    (L, L) grid. Same (B, L, L) bool mask and (B, L) int64 position ids; L stays symbolic."""
    special = (input_ids.unsqueeze(-1) == special_tokens).any(-1).unsqueeze(1)  # (B, 1, L)
    index = torch.arange(input_ids.shape[1], device=input_ids.device)
    length = index[-1] + 1  # a tensor, so the trace keeps L dynamic
    rows, cols = index.unsqueeze(1), index.unsqueeze(0)
    previous = torch.where((cols < rows) & special, cols, -1).amax(-1)
    following = torch.where((cols >= rows) & special, cols, length).amin(-1)
    valid = (following != 0) & (following != length - 1) & (following != length)
    same_block = (following.unsqueeze(2) == following.unsqueeze(1)) & valid.unsqueeze(1)
    position_ids = torch.where(valid, index - previous - 1, 0).clamp(min=0)
    return same_block | (rows == cols), position_ids


@contextmanager
def _exportable_masks() -> Iterator[None]:
    """Swap the port's mask builder for `sub_sentence_masks` while tracing (module global,
    restored after). Imported here: grounding.py gives the one-line error without transformers."""
    from transformers.models.grounding_dino import modeling_grounding_dino as port

    original = port.generate_masks_with_special_tokens_and_transfer_map
    port.generate_masks_with_special_tokens_and_transfer_map = sub_sentence_masks
    try:
        yield
    finally:
        port.generate_masks_with_special_tokens_and_transfer_map = original


def _example_ids(detector: GroundingDetector, text_len: int | None) -> torch.Tensor:
    """Trace input: the general-words caption, repeated or cut to text_len tokens. Its values
    do not shape the graph; its length only matters when the axis is fixed."""
    ids = detector.caption_ids(grounding_caption(()))
    length = len(ids) if text_len is None else text_len
    body = (ids[1:-1] * (length // max(len(ids) - 2, 1) + 1))[: length - 2]
    return torch.tensor([[ids[0], *body, ids[-1]]], dtype=torch.int64, device=detector.device)


def _check_arguments(
    detector: GroundingDetector, image_hw: tuple[int, int], text_len: int | None, opset: int
) -> None:
    if opset < MIN_OPSET:
        raise FBClipError(
            f"opset {opset} has no GridSample (deformable attention); use opset {MIN_OPSET}+"
        )
    if len(image_hw) != 2 or min(image_hw) < 32:
        raise FBClipError(
            f"image_hw {image_hw} is not an image size; pass (height, width) of gd_preprocess"
        )
    max_text_len = int(detector.model.config.max_text_len)
    if text_len is not None and not 2 <= text_len <= max_text_len:
        raise FBClipError(
            f"text_len {text_len} is outside 2..{max_text_len} ([CLS] ... [SEP], max_text_len); "
            "pass a caption's token count or None for a dynamic text axis"
        )


def _declare(proto: onnx.ModelProto, num_queries: int, text: int | str) -> None:
    """Output shapes as we know them (the exporter leaves generated names on Q and batch)."""
    shapes: list[list[int | str]] = [[1, num_queries, text], [1, num_queries, 4]]
    for value, shape in zip(proto.graph.output, shapes, strict=True):
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for size in shape:
            dim = dims.add()
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = size


def _check_pure_attention(proto: onnx.ModelProto, detector: GroundingDetector) -> None:
    """A hub kernel (kernels.kernelize) in the deformable attention would trace as a custom
    op, or not at all: the graph must hold one GridSample per level and attention call."""
    config = detector.model.config
    calls = config.num_feature_levels * (config.encoder_layers + config.decoder_layers)
    found = sum(node.op_type == "GridSample" for node in proto.graph.node)
    domains = sorted({node.domain for node in proto.graph.node} - {"", "ai.onnx"})
    if domains or found != calls:
        raise FBClipError(
            f"the Grounding DINO graph has {found} GridSample nodes (expected {calls}) and "
            f"custom op domains {domains}: a custom deformable-attention kernel was traced; "
            "export a model that was not kernelized"
        )


def _trace(
    detector: GroundingDetector,
    target: Path,
    image_hw: tuple[int, int],
    text_len: int | None,
    opset: int,
) -> None:
    """TorchScript export of the wrapped port to `target`. Tracer warnings about sizes are
    silenced: the image size is fixed, and L stays symbolic (tests run other lengths)."""
    pixels = torch.zeros((1, 3, *image_hw), dtype=torch.float32, device=detector.device)
    ids = _example_ids(detector, text_len)
    text_axes = {} if text_len is not None else {1: TEXT_AXIS}
    dynamic = {name: text_axes for name in INPUT_NAMES[1:]}
    with _exportable_masks(), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                _GroundingGraph(detector.model).eval(),  # export restores this mode
                (pixels, ids, torch.ones_like(ids), torch.zeros_like(ids)),
                str(target),
                dynamo=False,
                opset_version=opset,
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
                dynamic_axes={**dynamic, OUTPUT_NAMES[0]: {2: TEXT_AXIS}} if text_axes else None,
                do_constant_folding=True,
            )
        except torch.onnx.errors.OnnxExporterError as error:
            raise FBClipError(
                f"ONNX export of Grounding DINO failed ({type(error).__name__}: "
                f"{str(error).splitlines()[0]}); please report this with the model's config"
            ) from None


def export_grounding_onnx(
    detector: GroundingDetector,
    path: Path,
    image_hw: tuple[int, int],
    text_len: int | None = None,
    opset: int = 17,
) -> GroundingGraphSpec:
    """Write `path` atomically (temp file beside it, checked, then renamed): the detector's
    network for one (1, 3, H, W) image of size image_hw (the gd_preprocess output, spec 1.2) and
    one caption. text_len None keeps the caption length dynamic (captions differ per
    category); an int fixes it (e.g. for an engine built per category)."""
    path = Path(path)
    _check_arguments(detector, image_hw, text_len, opset)
    config = detector.model.config
    num_queries, max_text_len = int(config.num_queries), int(config.max_text_len)
    text: int | str = TEXT_AXIS if text_len is None else text_len
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".onnx", dir=path.parent)
    os.close(handle)
    try:
        _trace(detector, Path(temp), image_hw, text_len, opset)
        proto = onnx.load(temp)
        _declare(proto, num_queries, text)
        meta = {"image_hw": list(image_hw), "text_len": text_len, "max_text_len": max_text_len}
        onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(meta)})
        _check_pure_attention(proto, detector)
        onnx.save_model(proto, temp)
        check = check_graph(Path(temp))
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return GroundingGraphSpec(
        file=path.name,
        inputs=tuple(check.inputs),
        outputs=tuple(check.outputs),
        image_hw=(int(image_hw[0]), int(image_hw[1])),
        text_len=text_len,
        max_text_len=max_text_len,
        num_queries=num_queries,
        opset=opset,
        ops=tuple(sorted(check.ops)),
    )


__all__ = [
    "GroundingGraphSpec",
    "export_grounding_onnx",
    "sub_sentence_masks",
]
