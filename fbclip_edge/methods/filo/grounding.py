"""FiLo's detector: Grounding DINO through transformers' port (spec 8.1, 8.8, 8.9, 10.2).

The published weights are a flat state dict in the ORIGINAL Grounding DINO layout (IDEA-Research's
code, vendored by FiLo). `transformers`' GroundingDinoForObjectDetection is a port of the same
network: renaming the keys and splitting the packed in-projections (spec 8.9) reproduces the
original's raw outputs, up to float32 rounding and rare near-tie slot swaps in the two-stage
top-900 selection (spec 8.8). Two things the port hard-codes are handled here: bert-base-uncased's
special token ids (set from the tokenizer) and the original's two hard-coded widths (checked).
Everything after the network (boxes, phrases, position word) is `boxes.locate`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fbclip_edge.errors import FBClipError
from fbclip_edge.methods.filo.boxes import BertVocab, BoxResult, grounding_caption, locate
from fbclip_edge.modelformat import skip_weight_init
from fbclip_edge.statedict import check_state_dict, read_checkpoint_file

try:
    from transformers import (
        AutoTokenizer,
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        PreTrainedTokenizerBase,
        SwinConfig,
    )
except ImportError:  # pragma: no cover - depends on the environment
    raise FBClipError(
        "FiLo's Grounding DINO needs transformers: pip install 'fbclip-edge[filo]'"
    ) from None

#: Grounding DINO's input (spec 1.2): shorter side, cap on the longer side, ImageNet statistics.
GD_SIZE = 518
GD_MAX_SIZE = 1333
GD_MEAN = (0.485, 0.456, 0.406)
GD_STD = (0.229, 0.224, 0.225)
#: The tokens that delimit the caption's sub-sentences (the original's `specical_tokens`).
SPECIAL_TOKENS = ("[CLS]", "[SEP]", ".", "?")
#: The port's backbone prefix (SW in spec 8.9).
_SW = "model.backbone.conv_encoder.model."
#: Port parameters with no original counterpart (spec 8.9: left as initialised).
_PORT_ONLY = re.compile(r"model\.backbone\.conv_encoder\.model\.swin\.layernorm\..*")


# ----- config -----
@dataclass(frozen=True)
class GroundingDinoArch:
    """The original config's architecture values; defaults are SwinT_OGC (spec 8.1).

    text_pos_width / query_sine_width are the two widths the original hard-codes (256 and 128,
    the text-position sine and the per-coordinate query sine, spec 8.8). The port derives them
    from hidden_dim (hidden_dim and hidden_dim / 2): None means "as the port", and any other
    value must equal the port's, since a mismatch cannot be reproduced.
    """

    hidden_dim: int = 256
    dim_feedforward: int = 2048
    enc_layers: int = 6
    dec_layers: int = 6
    nheads: int = 8
    num_feature_levels: int = 4
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_queries: int = 900
    max_text_len: int = 256
    pe_temperature: int = 20
    swin_embed_dim: int = 96
    swin_depths: tuple[int, ...] = (2, 2, 6, 2)
    swin_heads: tuple[int, ...] = (3, 6, 12, 24)
    swin_window: int = 7
    return_interm_indices: tuple[int, ...] = (1, 2, 3)
    text_pos_width: int | None = 256
    query_sine_width: int | None = 128

    def __post_init__(self) -> None:
        for name in ("swin_depths", "swin_heads", "return_interm_indices"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        """Refuse what the port cannot build or reproduce, one line each."""
        if len(self.swin_depths) != len(self.swin_heads):
            raise FBClipError(
                f"Swin depths {self.swin_depths} and heads {self.swin_heads} differ in length"
            )
        stages = len(self.swin_depths)
        if not self.return_interm_indices or not all(
            0 <= i < stages for i in self.return_interm_indices
        ):
            raise FBClipError(
                f"return_interm_indices {self.return_interm_indices} must name Swin stages "
                f"0..{stages - 1}"
            )
        if self.num_feature_levels < len(self.return_interm_indices):
            raise FBClipError(
                f"num_feature_levels {self.num_feature_levels} is below the "
                f"{len(self.return_interm_indices)} backbone levels"
            )
        if self.hidden_dim % 32 or self.hidden_dim % self.nheads:
            raise FBClipError(
                f"hidden_dim {self.hidden_dim} must be a multiple of 32 (GroupNorm) and of "
                f"nheads {self.nheads}"
            )
        for name, port in (
            ("text_pos_width", self.hidden_dim),
            ("query_sine_width", self.hidden_dim // 2),
        ):
            value = getattr(self, name)
            if value is not None and value != port:
                raise FBClipError(
                    f"{name} {value} differs from the port's {port} (it follows hidden_dim "
                    f"{self.hidden_dim}); transformers cannot reproduce this model"
                )

    @classmethod
    def from_reference(cls, config: Mapping[str, Any]) -> GroundingDinoArch:
        """From a dict shaped like golden.pt's config["grounding_dino"]: the original config's
        values under "official_config" and the Swin sizes under "swin". The fixed choices the
        port implements (two-stage "standard", text enhancer, fusion, ...) are checked."""
        official = config.get("official_config", config)
        swin = config.get("swin", {})
        for key, port in _PORT_FIXED.items():
            if key in official and official[key] != port:
                raise FBClipError(
                    f"Grounding DINO config has {key}={official[key]!r}; the transformers "
                    f"port implements {port!r} only"
                )
        if official.get("pe_temperatureH", 20) != official.get("pe_temperatureW", 20):
            raise FBClipError("Grounding DINO config: pe_temperatureH and W differ")
        names = {f.name for f in fields(cls)}
        values: dict[str, Any] = {k: v for k, v in official.items() if k in names}
        renamed = {
            "swin_embed_dim": swin.get("embed_dim"),
            "swin_depths": swin.get("depths"),
            "swin_heads": swin.get("num_heads"),
            "swin_window": swin.get("window_size"),
            "pe_temperature": official.get("pe_temperatureH"),
        }
        values.update({k: v for k, v in renamed.items() if v is not None})
        # The widths: absent means "as the port" (the fixture's model follows hidden_dim).
        values["text_pos_width"] = config.get("text_pos_width")
        values["query_sine_width"] = config.get("query_sine_width")
        return cls(**values)

    @classmethod
    def from_port_config(cls, config: GroundingDinoConfig) -> GroundingDinoArch:
        """The arch of a built port (grounding_config's inverse, BERT aside), so a detector can
        be saved without remembering how it was made; the two hard-coded widths follow the
        port (None)."""
        swin = config.backbone_config
        if not isinstance(swin, SwinConfig):
            raise FBClipError(f"Grounding DINO port has a {type(swin).__name__} backbone, not Swin")
        pairs = (
            ("encoder_ffn_dim", "decoder_ffn_dim"),
            ("encoder_attention_heads", "decoder_attention_heads"),
        )
        for first, second in pairs:
            if getattr(config, first) != getattr(config, second):
                raise FBClipError(
                    f"Grounding DINO port has {first} {getattr(config, first)} != {second} "
                    f"{getattr(config, second)}; the original config cannot describe it"
                )
        return cls(
            hidden_dim=int(config.d_model),
            dim_feedforward=int(config.encoder_ffn_dim),
            enc_layers=int(config.encoder_layers),
            dec_layers=int(config.decoder_layers),
            nheads=int(config.encoder_attention_heads),
            num_feature_levels=int(config.num_feature_levels),
            enc_n_points=int(config.encoder_n_points),
            dec_n_points=int(config.decoder_n_points),
            num_queries=int(config.num_queries),
            max_text_len=int(config.max_text_len),
            pe_temperature=int(config.positional_embedding_temperature),
            swin_embed_dim=int(swin.embed_dim),
            swin_depths=tuple(swin.depths),
            swin_heads=tuple(swin.num_heads),
            swin_window=int(swin.window_size),
            return_interm_indices=tuple(int(i) - 1 for i in swin.out_indices),
            text_pos_width=None,
            query_sine_width=None,
        )


#: The original config values the port hard-wires (SwinT_OGC has all of them).
_PORT_FIXED: dict[str, Any] = {
    "two_stage_type": "standard",
    "embed_init_tgt": True,
    "dec_pred_bbox_embed_share": True,
    "two_stage_bbox_embed_share": False,
    "two_stage_class_embed_share": False,
    "use_text_enhancer": True,
    "use_fusion_layer": True,
    "use_text_cross_attention": True,
    "sub_sentence_present": True,
    "transformer_activation": "relu",
    "position_embedding": "sine",
}

#: The published model (spec 8.1).
SWINT_OGC = GroundingDinoArch()


def grounding_config(arch: GroundingDinoArch, bert_dir: str | Path) -> GroundingDinoConfig:
    """The port's config: Swin backbone, BERT from the local folder, the transformer sizes
    (spec 8.9). Swin stage i of the original is the port's stage i + 1."""
    bert_dir = Path(bert_dir)
    if not (bert_dir / "config.json").is_file():
        raise FBClipError(f"BERT folder {bert_dir} lacks config.json; pass the text encoder folder")
    text = BertConfig.from_pretrained(str(bert_dir), local_files_only=True)
    swin = SwinConfig(
        embed_dim=arch.swin_embed_dim,
        depths=list(arch.swin_depths),
        num_heads=list(arch.swin_heads),
        window_size=arch.swin_window,
    )
    swin.set_output_features_output_indices(
        out_features=None, out_indices=[i + 1 for i in arch.return_interm_indices]
    )
    return GroundingDinoConfig(
        backbone_config=swin,
        text_config=text,
        d_model=arch.hidden_dim,
        encoder_ffn_dim=arch.dim_feedforward,
        decoder_ffn_dim=arch.dim_feedforward,
        encoder_layers=arch.enc_layers,
        decoder_layers=arch.dec_layers,
        encoder_attention_heads=arch.nheads,
        decoder_attention_heads=arch.nheads,
        num_feature_levels=arch.num_feature_levels,
        encoder_n_points=arch.enc_n_points,
        decoder_n_points=arch.dec_n_points,
        num_queries=arch.num_queries,
        max_text_len=arch.max_text_len,
        positional_embedding_temperature=arch.pe_temperature,
        two_stage=True,
        embedding_init_target=True,
        decoder_bbox_embed_share=True,
        two_stage_bbox_embed_share=False,
        activation_function="relu",
    )


# ----- weights -----
@dataclass(frozen=True)
class _Rule:
    """Original key (full match) -> port key template; `split` names the three row blocks of a
    packed q/k/v tensor (substituted for {part}); target None drops the key."""

    pattern: re.Pattern[str]
    target: str | None
    split: tuple[str, str, str] | None = None


def _rule(pattern: str, target: str | None, split: tuple[str, str, str] | None = None) -> _Rule:
    return _Rule(re.compile(pattern), target, split)


_QKV = ("query", "key", "value")
_SWIN_QKV = ("q_proj", "k_proj", "v_proj")
_P = r"(weight|bias)"  # a parameter name, kept as a group in the target
# original prefixes (layer index = group 1; Swin: stage 1, block 2) and their port prefixes
_SWIN_BLOCK = r"backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\."
_SW_BLOCK = _SW + r"swin.encoder.layers.\1.blocks.\2."
_ENC = r"transformer\.encoder\.layers\.(\d+)\."
_DL = r"model.encoder.layers.\1.deformable_layer."
_TEXT = r"transformer\.encoder\.text_layers\.(\d+)\."
_TE = r"model.encoder.layers.\1.text_enhancer_layer."
_FUSION = r"transformer\.encoder\.fusion_layers\.(\d+)\."
_FL = r"model.encoder.layers.\1.fusion_layer."
_DEC = r"transformer\.decoder\.layers\.(\d+)\."
_DD = r"model.decoder.layers.\1."

#: Spec 8.9, in matching order (first full match wins).
_RULES: tuple[_Rule, ...] = (
    # Swin backbone
    _rule(r"backbone\.0\.patch_embed\.proj\.(.+)",
          _SW + r"swin.embeddings.patch_embeddings.projection.\1"),
    _rule(r"backbone\.0\.patch_embed\.norm\.(.+)", _SW + r"swin.embeddings.norm.\1"),
    _rule(_SWIN_BLOCK + r"norm1\.(.+)", _SW_BLOCK + r"layernorm_before.\3"),
    _rule(_SWIN_BLOCK + r"norm2\.(.+)", _SW_BLOCK + r"layernorm_after.\3"),
    _rule(_SWIN_BLOCK + r"attn\.qkv\." + _P, _SW_BLOCK + r"attention.{part}.\3", _SWIN_QKV),
    _rule(_SWIN_BLOCK + r"attn\.proj\.(.+)", _SW_BLOCK + r"attention.o_proj.\3"),
    _rule(_SWIN_BLOCK + r"attn\.relative_position_bias_table",
          _SW_BLOCK + "attention.relative_position_bias.relative_position_bias_table"),
    _rule(_SWIN_BLOCK + r"attn\.relative_position_index", None),  # the port builds its own
    _rule(_SWIN_BLOCK + r"mlp\.(fc1|fc2)\.(.+)", _SW_BLOCK + r"mlp.\3.\4"),
    _rule(r"backbone\.0\.layers\.(\d+)\.downsample\.(.+)",
          _SW + r"swin.encoder.layers.\1.downsample.\2"),
    _rule(r"backbone\.0\.norm(\d+)\.(.+)", _SW + r"hidden_states_norms.stage{stage}.\2"),
    # image projections, text encoder
    _rule(r"input_proj\.(.+)", r"model.input_proj_vision.\1"),
    _rule(r"bert\.(embeddings|encoder)\.(.+)", r"model.text_backbone.\1.\2"),
    _rule(r"bert\.pooler\..+", None),  # unused by the original too
    _rule(r"feat_map\.(.+)", r"model.text_projection.\1"),
    # transformer: top level
    _rule(r"transformer\.level_embed", "model.level_embed"),
    _rule(r"transformer\.tgt_embed\.(.+)", r"model.query_position_embeddings.\1"),
    _rule(r"transformer\.enc_output\.(.+)", r"model.enc_output.\1"),
    _rule(r"transformer\.enc_output_norm\.(.+)", r"model.enc_output_norm.\1"),
    _rule(r"transformer\.enc_out_bbox_embed\.(.+)", r"model.encoder_output_bbox_embed.\1"),
    _rule(r"transformer\.decoder\.norm\.(.+)", r"model.decoder.layer_norm.\1"),
    _rule(r"transformer\.decoder\.ref_point_head\.(.+)", r"model.decoder.reference_points_head.\1"),
    # the shared box head: the original holds it twice too (top level and decoder)
    _rule(r"transformer\.decoder\.bbox_embed\.(.+)", r"model.decoder.bbox_embed.\1"),
    _rule(r"bbox_embed\.(.+)", r"bbox_embed.\1"),
    # encoder: deformable layers, text enhancer, fusion
    _rule(_ENC + r"self_attn\.(.+)", _DL + r"self_attn.\2"),
    _rule(_ENC + r"norm1\.(.+)", _DL + r"self_attn_layer_norm.\2"),
    _rule(_ENC + r"linear(1|2)\.(.+)", _DL + r"fc\2.\3"),
    _rule(_ENC + r"norm2\.(.+)", _DL + r"final_layer_norm.\2"),
    _rule(_TEXT + r"self_attn\.in_proj_" + _P, _TE + r"self_attn.{part}.\2", _QKV),
    _rule(_TEXT + r"self_attn\.out_proj\.(.+)", _TE + r"self_attn.out_proj.\2"),
    _rule(_TEXT + r"linear(1|2)\.(.+)", _TE + r"fc\2.\3"),
    _rule(_TEXT + r"norm1\.(.+)", _TE + r"layer_norm_before.\2"),
    _rule(_TEXT + r"norm2\.(.+)", _TE + r"layer_norm_after.\2"),
    _rule(_FUSION + r"gamma_v", _FL + "vision_param"),
    _rule(_FUSION + r"gamma_l", _FL + "text_param"),
    _rule(_FUSION + r"layer_norm_v\.(.+)", _FL + r"layer_norm_vision.\2"),
    _rule(_FUSION + r"layer_norm_l\.(.+)", _FL + r"layer_norm_text.\2"),
    _rule(_FUSION + r"attn\.(values_|out_)?v_proj\.(.+)", _FL + r"attn.\2vision_proj.\3"),
    _rule(_FUSION + r"attn\.(values_|out_)?l_proj\.(.+)", _FL + r"attn.\2text_proj.\3"),
    # decoder layers
    _rule(_DEC + r"cross_attn\.(.+)", _DD + r"encoder_attn.\2"),
    _rule(_DEC + r"norm1\.(.+)", _DD + r"encoder_attn_layer_norm.\2"),
    _rule(_DEC + r"ca_text\.in_proj_" + _P, _DD + r"encoder_attn_text.{part}.\2", _QKV),
    _rule(_DEC + r"ca_text\.out_proj\.(.+)", _DD + r"encoder_attn_text.out_proj.\2"),
    _rule(_DEC + r"catext_norm\.(.+)", _DD + r"encoder_attn_text_layer_norm.\2"),
    _rule(_DEC + r"self_attn\.in_proj_" + _P, _DD + r"self_attn.{part}.\2", _QKV),
    _rule(_DEC + r"self_attn\.out_proj\.(.+)", _DD + r"self_attn.out_proj.\2"),
    _rule(_DEC + r"norm2\.(.+)", _DD + r"self_attn_layer_norm.\2"),
    _rule(_DEC + r"linear(1|2)\.(.+)", _DD + r"fc\2.\3"),
    _rule(_DEC + r"norm3\.(.+)", _DD + r"final_layer_norm.\2"),
)  # fmt: skip
#: Keys with no counterpart that some files carry: BERT's position_ids buffer (persistent in
#: older transformers versions).
_DROPPED = frozenset({"bert.embeddings.position_ids"})


def _convert_key(key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """The port entries for one original entry ({} when dropped); None for an unknown key."""
    if key in _DROPPED:
        return {}
    for rule in _RULES:
        match = rule.pattern.fullmatch(key)
        if match is None:
            continue
        if rule.target is None:
            return {}
        target = match.expand(rule.target)
        if "{stage}" in target:  # original norm{i} follows Swin stage i: the port's stage i + 1
            target = target.replace("{stage}", str(int(match.group(1)) + 1))
        if rule.split is None:
            return {target: tensor}
        if tensor.shape[0] % 3:
            raise FBClipError(f"{key} {tuple(tensor.shape)}: packed q/k/v rows are not 3 blocks")
        return {
            target.replace("{part}", name): part.clone()
            for name, part in zip(rule.split, tensor.chunk(3, dim=0), strict=True)
        }
    return None


def _shown(keys: Sequence[str]) -> str:
    return ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")


def convert_original_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Grounding DINO layout -> transformers' GroundingDinoForObjectDetection (spec 8.9).

    A leading "module." is removed first (as the reference does); every key is renamed, split
    (packed q/k/v) or knowingly dropped (Swin relative_position_index, bert.pooler); any other
    key is an error, since the reference's strict=False load would silently ignore it."""
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for raw_key, tensor in state_dict.items():
        key = raw_key[len("module.") :] if raw_key.startswith("module.") else raw_key
        entries = _convert_key(key, tensor)
        if entries is None:
            unknown.append(key)
            continue
        converted.update(entries)
    if unknown:
        raise FBClipError(
            f"unknown keys in the Grounding DINO checkpoint: {_shown(sorted(unknown))}; "
            "expected the original (IDEA-Research) layout"
        )
    _check_shared_box_head(converted)
    return converted


def _check_shared_box_head(converted: Mapping[str, torch.Tensor]) -> None:
    """The decoder's box head is one module shared by every layer, stored once per layer and
    per owner (top level and decoder); the port ties them too, so all copies must agree."""
    pattern = re.compile(r"(?:model\.decoder\.)?bbox_embed\.\d+\.(.+)")
    first: dict[str, tuple[str, torch.Tensor]] = {}
    for key, tensor in converted.items():
        match = pattern.fullmatch(key)
        if match is None:
            continue
        name = match.group(1)
        if name not in first:
            first[name] = (key, tensor)
        elif not torch.equal(first[name][1], tensor):
            raise FBClipError(
                f"Grounding DINO checkpoint: {key} differs from {first[name][0]}, but the box "
                "head is shared (dec_pred_bbox_embed_share); the file is inconsistent"
            )


def _other_layout(checkpoint: Mapping[str, Any]) -> str:
    """' (it is a <method> checkpoint ...)' when the file belongs to another method."""
    from fbclip_edge.methods import identify_checkpoint  # lazy: the registry imports methods
    from fbclip_edge.methods.filo.importer import looks_like

    if looks_like(checkpoint):
        return " (it is a FiLo checkpoint: load it with import_official)"
    if any(str(key).startswith("model.backbone.conv_encoder.") for key in checkpoint):
        return " (it is already in the transformers layout: load it with load_state_dict)"
    method = identify_checkpoint(checkpoint)
    return f" (it is a {method} checkpoint)" if method else ""


def read_grounding_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The published Grounding DINO file (spec 10.2): a flat state dict in the original layout
    (IDEA-Research's release wraps it as {"model": ...}, which is unwrapped). One-line errors
    for a missing, corrupt or foreign file."""
    checkpoint = read_checkpoint_file(path)
    if isinstance(checkpoint.get("model"), dict):
        checkpoint = checkpoint["model"]
    state = {
        str(k)[len("module.") :] if str(k).startswith("module.") else str(k): v
        for k, v in checkpoint.items()
    }
    tensors = all(isinstance(v, torch.Tensor) for v in state.values())
    markers = ("backbone.0.patch_embed.proj.weight", "transformer.tgt_embed.weight")
    if not tensors or not all(marker in state for marker in markers):
        raise FBClipError(
            f"{path} is not a Grounding DINO checkpoint in the original layout (no "
            f"{' / '.join(markers)}){_other_layout(checkpoint)}"
        )
    return state


# ----- preprocessing (spec 1.2) -----
def gd_input_size(
    width: int, height: int, size: int = GD_SIZE, max_size: int = GD_MAX_SIZE
) -> tuple[int, int]:
    """(width, height) of Grounding DINO's input: shorter side `size` (less when the longer side
    would pass max_size), long side truncated; unchanged when the short side already fits."""
    short, long = min(width, height), max(width, height)
    if long / short * size > max_size:
        size = int(round(max_size * short / long))
    if short == size:
        return width, height
    scaled = int(size * long / short)
    return (size, scaled) if width < height else (scaled, size)


def _frames(frames: np.ndarray | torch.Tensor | Sequence[np.ndarray]) -> list[np.ndarray]:
    """A list of (H, W, 3) uint8 arrays from one frame, a (B, H, W, 3) batch or a sequence."""
    if isinstance(frames, torch.Tensor):
        frames = frames.cpu().numpy()
    single = np.asarray(frames[0]).ndim == 2
    arrays = [np.asarray(frames)] if single else [np.asarray(f) for f in frames]
    for array in arrays:
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
            raise FBClipError(
                f"Grounding DINO frames must be (H, W, 3) uint8 RGB, got {array.shape} "
                f"{array.dtype}"
            )
    return arrays


def gd_preprocess(
    frames: np.ndarray | torch.Tensor | Sequence[np.ndarray],
    size: int = GD_SIZE,
    max_size: int = GD_MAX_SIZE,
) -> torch.Tensor:
    """RGB uint8 frames (one (H, W, 3), a (B, H, W, 3) batch or a list) -> (B, 3, h, w) float32:
    PIL bilinear resize of spec 1.2, then (u8 / 255 - mean) / std with ImageNet statistics.
    Frames of a batch must share their size (the reference runs one image per call)."""
    arrays = _frames(frames)
    if len({a.shape for a in arrays}) != 1:
        raise FBClipError("Grounding DINO frames of one batch must have the same size")
    mean = torch.tensor(GD_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(GD_STD, dtype=torch.float32).view(3, 1, 1)
    out = []
    for array in arrays:
        height, width = array.shape[:2]
        target = gd_input_size(width, height, size, max_size)
        if target != (width, height):
            array = np.asarray(Image.fromarray(array).resize(target, Image.Resampling.BILINEAR))
        pixels = torch.from_numpy(np.array(array)).permute(2, 0, 1).float().div(255)
        out.append((pixels - mean) / std)
    return torch.stack(out)


# ----- detector -----
def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """[CLS], [SEP], "." and "?" in this vocabulary, looked up as the original does."""
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    return [int(i) for i in (ids if isinstance(ids, list) else [ids])]


class GroundingDetector:
    """The transformers port (eval, float32) with its BERT tokenizer; its outputs feed
    `boxes.locate`. Run once per image and caption, before the text features (spec 8.1)."""

    def __init__(self, model: GroundingDinoForObjectDetection, bert_dir: str | Path) -> None:
        bert_dir = Path(bert_dir)
        self.model = model.eval().float()
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
            str(bert_dir), local_files_only=True
        )
        self.vocab = BertVocab.from_file(bert_dir)
        self._set_special_tokens(special_token_ids(self.tokenizer))

    def _set_special_tokens(self, ids: list[int]) -> None:
        """The port hard-codes bert-base-uncased's ids (101, 102, 1012, 1029) for the
        sub-sentence masks; another vocabulary needs its own (spec 8.8)."""
        buffer = getattr(self.model.model, "special_tokens", None)
        if not isinstance(buffer, torch.Tensor) or buffer.numel() != len(ids):
            raise FBClipError(
                "this transformers version has no GroundingDinoModel.special_tokens buffer; "
                "FiLo's Grounding DINO needs transformers 5 (checked with 5.24)"
            )
        buffer.copy_(torch.tensor(ids, dtype=buffer.dtype))

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path | Mapping[str, torch.Tensor],
        bert_dir: str | Path,
        arch: GroundingDinoArch = SWINT_OGC,
        device: str | torch.device = "cpu",
    ) -> GroundingDetector:
        """Build the port from the original-layout file (or its loaded state dict) and the
        local BERT folder (config, vocabulary, tokenizer files; its weights come from the
        checkpoint's bert.*)."""
        state = (
            read_grounding_checkpoint(checkpoint)
            if isinstance(checkpoint, (str, Path))
            else dict(checkpoint)
        )
        model = GroundingDinoForObjectDetection(grounding_config(arch, bert_dir))
        converted = convert_original_state_dict(state)
        expected = {k: v for k, v in model.state_dict().items() if not _PORT_ONLY.fullmatch(k)}
        check_state_dict(expected, converted, "Grounding DINO checkpoint")
        model.load_state_dict(converted, strict=False)
        # the plain Module.to: PreTrainedModel.to's wrapper hides the device argument from mypy
        return cls(torch.nn.Module.to(model, torch.device(device)), bert_dir)

    @classmethod
    def from_port_state_dict(
        cls,
        state: Mapping[str, torch.Tensor],
        bert_dir: str | Path,
        arch: GroundingDinoArch,
        device: str | torch.device = "cpu",
    ) -> GroundingDetector:
        """Rebuild a saved detector (a FiLo model folder): the port's own state dict, port-only
        keys included, loaded strictly; nothing is randomly initialised first (it would all be
        overwritten)."""
        with skip_weight_init():
            model = GroundingDinoForObjectDetection(grounding_config(arch, bert_dir))
        check_state_dict(model.state_dict(), state, "Grounding DINO weights")
        model.load_state_dict(dict(state), strict=True)
        return cls(torch.nn.Module.to(model, torch.device(device)), bert_dir)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def caption_ids(self, caption: str) -> list[int]:
        """[CLS] + WordPiece ids + [SEP] of one caption (the original's tokenizer call)."""
        return [int(i) for i in self.tokenizer(caption)["input_ids"]]

    @torch.no_grad()
    def raw_outputs(
        self, gd_pixel_values: torch.Tensor, caption: str | Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """pred_logits (B, Q, L) over the first L text positions (L: the longest caption;
        positions past a shorter caption are -inf) and pred_boxes (B, Q, 4), normalised
        cx, cy, w, h. One caption for the batch, or one per image."""
        batch = gd_pixel_values.shape[0]
        captions = [caption] * batch if isinstance(caption, str) else list(caption)
        if len(captions) != batch:
            raise FBClipError(f"{len(captions)} captions for {batch} Grounding DINO images")
        text = self.tokenizer(captions, padding="longest", return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in text.items()}
        output = self.model(pixel_values=gd_pixel_values.to(self.device).float(), **inputs)
        length = int(inputs["input_ids"].shape[1])
        return output.logits[..., :length].float(), output.pred_boxes.float()

    def locate(
        self,
        gd_pixel_values: torch.Tensor,
        descriptions: Sequence[Sequence[str]],
        image_size: int = 518,
        box_threshold: float = 0.25,
        text_threshold: float = 0.25,
        area_threshold: float = 0.7,
    ) -> list[BoxResult]:
        """Spec 8.2-8.5 per image: descriptions[i] are image i's category's Grounding DINO
        descriptions; the caption is built from them, the network runs once for the batch."""
        captions = [grounding_caption(d) for d in descriptions]
        logits, boxes = self.raw_outputs(gd_pixel_values, captions)
        return self.boxes_from_outputs(
            logits, boxes, descriptions, image_size, box_threshold, text_threshold, area_threshold
        )

    def boxes_from_outputs(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        descriptions: Sequence[Sequence[str]],
        image_size: int = 518,
        box_threshold: float = 0.25,
        text_threshold: float = 0.25,
        area_threshold: float = 0.7,
    ) -> list[BoxResult]:
        """The host side (`boxes.locate`) of raw outputs (B, Q, L) and (B, Q, 4) that came from
        this detector or from another runtime (ONNX, TensorRT) with the same captions."""
        return [
            locate(
                logits[i],
                boxes[i],
                self.caption_ids(grounding_caption(category)),
                self.vocab,
                category,
                image_size=image_size,
                box_threshold=box_threshold,
                text_threshold=text_threshold,
                area_threshold=area_threshold,
            )
            for i, category in enumerate(descriptions)
        ]


__all__ = [
    "GD_MEAN",
    "GD_STD",
    "SWINT_OGC",
    "GroundingDetector",
    "GroundingDinoArch",
    "convert_original_state_dict",
    "gd_input_size",
    "gd_preprocess",
    "grounding_config",
    "read_grounding_checkpoint",
    "special_token_ids",
]
