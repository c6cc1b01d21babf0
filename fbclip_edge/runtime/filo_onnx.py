"""FiLo's split export (spec 13) on onnxruntime: the four graphs as `FiLoStages`, the host
rebuilt from the artifacts, and both behind the same `FiLoPipeline` as the torch model.

An artifacts folder from `export.filo.export_filo` holds

    filo_vision.onnx       pixels (B, 3, S, S) -> conditioning (B, D), head_features (B, M, N, D)
    filo_text.onnx         prompts (P, L, Dt), end_index (P,) -> text_features (P, D)
    filo_score.onnx        head_features, text (B, 2, D), conditioning -> image_score, anomaly_map
    grounding.onnx         Grounding DINO for one image of a fixed size (absent without a detector)
    *.fp16.onnx            mixed-precision vision and text graphs (--precision fp16)
    filo_host.safetensors  both prompt learners and the CLIP token rows the prompts use
    descriptions.json      the category table, byte-exact from the model folder
    bert/vocab.txt         the WordPiece vocabulary of the Grounding DINO caption
    manifest.json          graphs, sha256 of every file, and `FiLoArtifacts` under "filo"

Every file used is checked against its sha256 before a session opens, so an altered graph or
table is a one-line error instead of quietly different scores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fbclip_edge.artifacts.manifest import (
    MANIFEST,
    ArtifactError,
    GraphSpec,
    Manifest,
    verify_files,
)
from fbclip_edge.artifacts.options import GraphRole, Precision
from fbclip_edge.errors import FBClipError
from fbclip_edge.methods.filo.boxes import BertVocab
from fbclip_edge.methods.filo.descriptions import load_descriptions
from fbclip_edge.methods.filo.pipeline import FiLoHost, FiLoPipeline, HostSettings, TokenTable
from fbclip_edge.methods.filo.text import PromptLearner
from fbclip_edge.runtime.grounding_onnx import GroundingOnnx
from fbclip_edge.runtime.onnx_session import (
    PROVIDERS,
    GraphSession,
    import_onnxruntime,
    provider_chain,
    session_options,
)

METHOD = "filo"
#: manifest.json key of `FiLoArtifacts` (an extra key: older readers keep it untouched)
EXTRA_KEY = "filo"
HOST_FILE = "filo_host.safetensors"
DESCRIPTIONS_FILE = "descriptions.json"
VOCAB_FILE = "bert/vocab.txt"
#: filo_host.safetensors key prefixes
LEARNERS = ("normal_prompt_learner", "abnormal_prompt_learner")
TOKEN_IDS, TOKEN_ROWS = "token_table.ids", "token_table.rows"
#: Graph roles with an fp16 (mixed-precision) variant; score and grounding stay float32.
FP16_ROLES = (GraphRole.VISION, GraphRole.TEXT)
#: what a stage's input error names as the builder of its inputs
_INPUTS_HINT = "FiLoPipeline builds these inputs; check what was passed to it"


@dataclass(frozen=True)
class FiLoArtifacts:
    """What FiLo's host needs beyond the graphs (manifest.json's "filo" entry)."""

    settings: HostSettings
    descriptions_sha256: str  # of the model folder's descriptions.json (the copy is the same)
    categories: tuple[str, ...]
    grounding_hw: tuple[int, int] | None  # (h, w) of grounding.onnx's input; None: no detector
    frame_size: tuple[int, int] | None  # (W, H) camera frame that grounding_hw was sized for
    host: str = HOST_FILE
    descriptions: str = DESCRIPTIONS_FILE
    vocab: str | None = VOCAB_FILE  # None without a detector

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples as lists)."""
        data = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_manifest(cls, manifest: Manifest, where: str | Path = MANIFEST) -> FiLoArtifacts:
        """Parse manifest.extra["filo"]; a missing or malformed entry is a one-line error."""
        if manifest.method != METHOD:
            raise ArtifactError(
                f"{where} describes {manifest.method} artifacts, not FiLo's; open them with "
                "fbclip_edge.runtime.open"
            )
        values: dict[str, Any] = dict(manifest.extra.get(EXTRA_KEY) or {})
        try:
            hw, frame = values.get("grounding_hw"), values.get("frame_size")
            return cls(
                settings=HostSettings(**values.pop("settings")),
                descriptions_sha256=str(values["descriptions_sha256"]),
                categories=tuple(values["categories"]),
                grounding_hw=(int(hw[0]), int(hw[1])) if hw else None,
                frame_size=(int(frame[0]), int(frame[1])) if frame else None,
                host=str(values.get("host", HOST_FILE)),
                descriptions=str(values.get("descriptions", DESCRIPTIONS_FILE)),
                vocab=values.get("vocab"),
            )
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise ArtifactError(
                f"{where} has no usable '{EXTRA_KEY}' entry ({type(error).__name__}: {error}); "
                "re-export the FiLo artifacts with `fbclip-edge export`"
            ) from None


# ----- graph choice -----
def _wanted_precision(manifest: Manifest, provider: str, precision: str | None) -> Precision:
    """fp16 graphs on GPU providers when exported (as FB-CLIP's onnxruntime backend), fp32
    otherwise; asked explicitly, fp16 runs on the CPU too (the export's parity does)."""
    if precision is None:
        gpu_fp16 = provider != "cpu" and manifest.precision == Precision.FP16
        return Precision.FP16 if gpu_fp16 else Precision.FP32
    wanted = Precision(precision) if precision in {p.value for p in Precision} else None
    if wanted not in (Precision.FP32, Precision.FP16):
        raise FBClipError(f"FiLo's onnxruntime graphs are fp32 or fp16, not {precision!r}")
    return wanted


def select_graphs(
    manifest: Manifest, provider: str = "cpu", precision: str | None = None
) -> dict[GraphRole, GraphSpec]:
    """The graph per role that a session opens: vision and text at the wanted precision,
    score and grounding (when exported) in float32."""
    wanted = _wanted_precision(manifest, provider, precision)
    chosen: dict[GraphRole, GraphSpec] = {}
    for role in (GraphRole.VISION, GraphRole.TEXT, GraphRole.SCORE, GraphRole.GROUNDING):
        at = wanted if role in FP16_ROLES else Precision.FP32
        spec = manifest.graph(role, at)
        if spec is not None:
            chosen[role] = spec
        elif role != GraphRole.GROUNDING:
            raise ArtifactError(
                f"the FiLo artifacts have no {at.value} {role.value} graph; re-export with "
                f"`fbclip-edge export --precision {at.value}`"
            )
    return chosen


def files_used(
    manifest: Manifest, graphs: Mapping[GraphRole, GraphSpec], info: FiLoArtifacts
) -> list[str]:
    """Every file a pipeline over these graphs reads (all are sha256-checked)."""
    names = [name for spec in graphs.values() for name in (spec.file, *spec.data_files)]
    names += [info.host, info.descriptions]
    if GraphRole.GROUNDING in graphs:
        if info.vocab is None:
            raise ArtifactError(
                f"the FiLo manifest has a grounding graph but no BERT vocabulary ({MANIFEST}); "
                "re-export the artifacts"
            )
        names.append(info.vocab)
    return names


# ----- sessions -----
def _check_filo_provider(provider: str) -> None:
    """FiLo's graphs run on the CPU and CUDA providers (no TensorRT profiles for them yet)."""
    if provider not in ("cpu", "cuda"):
        raise FBClipError(
            f"FiLo's onnxruntime graphs run on provider 'cpu' or 'cuda', not {provider!r}"
            + (" (TensorRT: not yet for FiLo)" if provider in PROVIDERS else "")
        )


class OnnxFiLoStages:
    """FiLo's four networks (`FiLoStages`) as onnxruntime sessions over exported graphs.

    Vision and score batches larger than the export's batch profile are run in chunks of its
    max (the graphs have a dynamic batch; the profile is what parity checked)."""

    def __init__(
        self,
        folder: Path,
        graphs: Mapping[GraphRole, GraphSpec],
        max_batch: int,
        provider: str = "cpu",
        threads: int | None = None,
    ) -> None:
        _check_filo_provider(provider)
        ort = import_onnxruntime()
        chain = provider_chain(ort, provider)
        options = session_options(ort, provider, threads)
        self.graphs = dict(graphs)
        self.max_batch = max(1, max_batch)
        self.provider = provider

        def session(role: GraphRole) -> GraphSession:
            return GraphSession(folder / graphs[role].file, ort, options, chain, _INPUTS_HINT)

        self._vision, self._text = session(GraphRole.VISION), session(GraphRole.TEXT)
        self._score = session(GraphRole.SCORE)
        grounding = GraphRole.GROUNDING in graphs
        self._grounding = GroundingOnnx(session(GraphRole.GROUNDING)) if grounding else None

    @property
    def has_grounding(self) -> bool:
        """Whether the artifacts hold Grounding DINO (the box prior)."""
        return self._grounding is not None

    @property
    def grounding_hw(self) -> tuple[int, int] | None:
        """(h, w) the grounding graph takes, or None."""
        return None if self._grounding is None else self._grounding.image_hw

    def grounding(
        self, gd_pixels: torch.Tensor, input_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._grounding is None:
            raise FBClipError(
                "these FiLo artifacts have no Grounding DINO graph; export a model folder with "
                "a detector, or run without boxes"
            )
        return self._grounding(gd_pixels, input_ids)

    def _chunked(self, run: GraphSession, *tensors: torch.Tensor) -> list[torch.Tensor]:
        count = int(tensors[0].shape[0])
        parts = [
            run(*(t[start : start + self.max_batch] for t in tensors))
            for start in range(0, count, self.max_batch)
        ]
        return [torch.cat(outputs) for outputs in zip(*parts, strict=True)]

    def vision(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        conditioning, heads = self._chunked(self._vision, pixels)
        return conditioning, heads

    def text(self, prompts: torch.Tensor, end_index: torch.Tensor) -> torch.Tensor:
        length = int(prompts.shape[1]) if prompts.dim() == 3 else 0
        ends = end_index.detach().cpu()
        if ends.numel() and (int(ends.min()) < 0 or int(ends.max()) >= length):
            raise FBClipError(
                f"{self._text.name}: end_index values must lie in 0..{length - 1} (the end "
                "token's position in each prompt)"
            )
        return self._text(prompts, ends)[0]

    def score(
        self, head_features: torch.Tensor, text: torch.Tensor, conditioning: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        score, amap = self._chunked(self._score, head_features, text, conditioning)
        return score, amap


# ----- host -----
def _read_host_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ArtifactError(f"{path} is unreadable ({message}); re-export the artifacts") from None


def _learner(tensors: Mapping[str, torch.Tensor], prefix: str, path: Path) -> PromptLearner:
    """A PromptLearner rebuilt from its saved tensors: sizes from the shapes, loaded strictly."""
    state = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    try:
        n_ctx, text_width = state["ctx"].shape
        hidden, embed_dim = state["meta_net.linear1.weight"].shape
        learner = PromptLearner(int(n_ctx), int(text_width), int(embed_dim), embed_dim // hidden)
        learner.load_state_dict(state, strict=True)
    except (KeyError, ValueError, RuntimeError, ZeroDivisionError) as error:
        first = str(error).splitlines()[0][:160]
        raise ArtifactError(
            f"{path} has no usable {prefix} ({type(error).__name__}: {first}); re-export the "
            "artifacts"
        ) from None
    return learner.eval()


def onnx_host(folder: str | Path, manifest: Manifest) -> FiLoHost:
    """FiLo's host side from the artifacts: both prompt learners, the token table, the
    category table and (with Grounding DINO) the BERT vocabulary. Files are not re-hashed
    here: `open_onnx_pipeline` verifies them first."""
    root = Path(folder)
    info = FiLoArtifacts.from_manifest(manifest, root / MANIFEST)
    path = root / info.host
    tensors = _read_host_tensors(path)
    normal, abnormal = (_learner(tensors, prefix, path) for prefix in LEARNERS)
    if TOKEN_IDS not in tensors or TOKEN_ROWS not in tensors:
        raise ArtifactError(f"{path} has no token table; re-export the artifacts")
    tokens = TokenTable(tensors[TOKEN_IDS], tensors[TOKEN_ROWS])
    table = load_descriptions(root / info.descriptions)
    vocab = BertVocab.from_file(root / info.vocab) if info.vocab else None
    return FiLoHost(info.settings, normal, abnormal, tokens, table, vocab)


def open_onnx_pipeline(
    folder: str | Path,
    manifest: Manifest,
    provider: str = "cpu",
    precision: str | None = None,
    threads: int | None = None,
    verify: bool = True,
) -> FiLoPipeline:
    """FiLo end to end on onnxruntime: Grounding DINO when exported (boxes on), the vision,
    text and score graphs, and the host from the artifacts. verify checks the sha256 of
    every file it reads first (skip only for a folder checked moments ago)."""
    root = Path(folder)
    info = FiLoArtifacts.from_manifest(manifest, root / MANIFEST)
    graphs = select_graphs(manifest, provider, precision)
    if verify:
        verify_files(manifest, root, files_used(manifest, graphs, info))
    stages = OnnxFiLoStages(root, graphs, manifest.batch.max, provider, threads)
    if stages.grounding_hw is not None and stages.grounding_hw != info.grounding_hw:
        raise ArtifactError(
            f"grounding.onnx takes {stages.grounding_hw} images but {MANIFEST} says "
            f"{info.grounding_hw}: the graph belongs to another export; re-export the folder"
        )
    host = onnx_host(root, manifest)
    return FiLoPipeline(stages, host, use_boxes=stages.has_grounding)


__all__ = [
    "DESCRIPTIONS_FILE",
    "EXTRA_KEY",
    "HOST_FILE",
    "VOCAB_FILE",
    "FiLoArtifacts",
    "OnnxFiLoStages",
    "files_used",
    "onnx_host",
    "open_onnx_pipeline",
    "select_graphs",
]
