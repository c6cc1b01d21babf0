"""FiLo's split export (spec 13): four ONNX graphs, the host's tensors and a parity gate.

FiLo's text features depend on the image (meta_net(c)) and on Grounding DINO's position word,
so they cannot be frozen into one graph as FB-CLIP's are. `export_filo` writes the networks of
`methods.filo.stages` (vision, text, score) and Grounding DINO (`export.grounding_onnx`) as
separate graphs, the host's constants beside them, and accepts the folder only when the
onnxruntime pipeline (`runtime.filo_onnx`) reproduces the torch pipeline's image scores and
final maps on a few frames through the real preprocessing. See runtime/filo_onnx.py for the
layout.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from safetensors.torch import save_file
from torch import nn

from fbclip_edge.artifacts.manifest import (
    PARITY,
    GraphSpec,
    Manifest,
    ModelRef,
    read_manifest,
    record_files,
    sha256_file,
    write_manifest,
)
from fbclip_edge.artifacts.options import (
    DEFAULT_TOLERANCES,
    BatchProfile,
    GraphRole,
    Precision,
    Scoring,
    Tolerance,
    parse_precision,
)
from fbclip_edge.errors import FBClipError
from fbclip_edge.export import ExportResult, _Steps, _tool_versions
from fbclip_edge.export.mixed_precision import to_mixed_precision
from fbclip_edge.export.onnx_graph import OPSET, _declare, _prune, check_graph, save_graph
from fbclip_edge.export.parity import ParityError, ParityReport, ParityRow, strict_fp32
from fbclip_edge.fileio import atomic_directory
from fbclip_edge.methods.filo.descriptions import CategoryData
from fbclip_edge.methods.filo.folder import DESCRIPTIONS_FILE, FiLoFolder
from fbclip_edge.methods.filo.model import FiLo
from fbclip_edge.methods.filo.pipeline import FiLoPipeline, FiLoResult, TokenTable
from fbclip_edge.methods.filo.stages import ScoreStage, TextStage, VisionStage, torch_pipeline
from fbclip_edge.methods.filo.text import build_category_prompts
from fbclip_edge.modelformat import WEIGHTS_FILE
from fbclip_edge.preprocess import preprocess
from fbclip_edge.runtime.filo_onnx import (
    EXTRA_KEY,
    HOST_FILE,
    LEARNERS,
    TOKEN_IDS,
    TOKEN_ROWS,
    VOCAB_FILE,
    FiLoArtifacts,
    open_onnx_pipeline,
    select_graphs,
)

Progress = Callable[[str, int, int], None]
#: Graph file per role (fp16 variants insert ".fp16" before ".onnx").
GRAPH_FILES = {
    GraphRole.VISION: "filo_vision.onnx",
    GraphRole.TEXT: "filo_text.onnx",
    GraphRole.SCORE: "filo_score.onnx",
    GraphRole.GROUNDING: "grounding.onnx",
}
PARITY_FRAMES = 4
#: Prompts in the text graph's trace (any count > 1: the prompt axis stays symbolic).
_TRACE_PROMPTS = 3


@dataclass(frozen=True)
class _Trace:
    """One graph to trace: module, example inputs, names, dynamic axes, declared outputs."""

    role: GraphRole
    module: nn.Module
    example: tuple[torch.Tensor, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    axes: dict[str, dict[int, str]]
    shapes: list[list[int | str]]


def _graph_file(role: GraphRole, precision: Precision) -> str:
    name = GRAPH_FILES[role]
    return (
        name if precision == Precision.FP32 else name.replace(".onnx", f".{precision.value}.onnx")
    )


def _traces(model: FiLo) -> list[_Trace]:
    """The three FiLo graphs, traced at batch 2 (and 3 prompts) so nothing specializes on 1."""
    cfg = model.config
    size, dim, maps, patches = cfg.image_size, cfg.embed_dim, cfg.num_maps, cfg.num_patches
    context = int(model.clip.positional_embedding.shape[0])
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, size, size, generator=generator)
    prompts = torch.randn(_TRACE_PROMPTS, context, cfg.text_width, generator=generator)
    ends = torch.tensor([context - 1, 1, context // 2], dtype=torch.int64)
    heads = torch.randn(2, maps, patches, dim, generator=generator)
    text = torch.nn.functional.normalize(torch.randn(2, 2, dim, generator=generator), dim=-1)
    conditioning = torch.nn.functional.normalize(torch.randn(2, dim, generator=generator), dim=-1)
    batch = {0: "batch"}
    return [
        _Trace(
            GraphRole.VISION,
            VisionStage(model),
            (pixels,),
            ("pixel_values",),
            ("conditioning", "head_features"),
            {"pixel_values": batch, "conditioning": batch, "head_features": batch},
            [["batch", dim], ["batch", maps, patches, dim]],
        ),
        _Trace(
            GraphRole.TEXT,
            TextStage(model),
            (prompts, ends),
            ("prompts", "end_index"),
            ("text_features",),
            {name: {0: "prompts"} for name in ("prompts", "end_index", "text_features")},
            [["prompts", dim]],
        ),
        _Trace(
            GraphRole.SCORE,
            ScoreStage(model),
            (heads, text / 2**0.5, conditioning),
            ("head_features", "text", "conditioning"),
            ("image_score", "anomaly_map"),
            {
                name: batch
                for name in ("head_features", "text", "conditioning", "image_score", "anomaly_map")
            },
            [["batch"], ["batch", size, size]],
        ),
    ]


def _export_graph(trace: _Trace, folder: Path) -> GraphSpec:
    """TorchScript export (as onnx_graph: opset 17, seconds not minutes), pruned, output shapes
    declared, saved (external data over 2 GB) and checked."""
    name = _graph_file(trace.role, Precision.FP32)
    scratch = folder / f".trace-{trace.role.value}"
    scratch.mkdir()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # size warnings: S and the token counts are fixed
            torch.onnx.export(
                trace.module.eval(),
                trace.example,
                str(scratch / name),
                dynamo=False,
                opset_version=OPSET,
                input_names=list(trace.inputs),
                output_names=list(trace.outputs),
                dynamic_axes=trace.axes,
                do_constant_folding=True,
            )
        proto = onnx.load(str(scratch / name))
    except torch.onnx.errors.OnnxExporterError as error:
        raise FBClipError(
            f"ONNX export of {name} failed ({type(error).__name__}: "
            f"{str(error).splitlines()[0]}); please report this with the model's config.json"
        ) from None
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        shutil.rmtree(scratch, ignore_errors=True)
    _prune(proto)
    _declare(list(proto.graph.output), trace.shapes)
    return _saved(proto, trace.role, Precision.FP32, folder)


def _saved(
    proto: onnx.ModelProto, role: GraphRole, precision: Precision, folder: Path
) -> GraphSpec:
    name = _graph_file(role, precision)
    data_files = save_graph(proto, folder / name)
    check = check_graph(folder / name)
    return GraphSpec(
        role, precision, name, check.inputs, check.outputs, sorted(check.ops), data_files
    )


def _mixed_precision(spec: GraphSpec, folder: Path) -> GraphSpec:
    """The fp16 variant with onnx_graph's autocast rules (matrix products in fp16; LayerNorm,
    softmax, reductions in fp32)."""
    mixed = to_mixed_precision(onnx.load(str(folder / spec.file)))
    _prune(mixed)
    return _saved(mixed, spec.role, Precision.FP16, folder)


def grounding_input_hw(image_size: int, frame_size: tuple[int, int] | None) -> tuple[int, int]:
    """(h, w) of Grounding DINO's input for camera frames of frame_size (W, H) (spec 1.2);
    square S x S frames by default (S = 518 gives 518 x 518)."""
    from fbclip_edge.methods.filo.grounding import gd_input_size

    width, height = frame_size or (image_size, image_size)
    if min(width, height) < 1:
        raise FBClipError(
            f"frame size {width}x{height} is not an image size; pass WxH, e.g. 1920x1080"
        )
    gd_width, gd_height = gd_input_size(int(width), int(height))
    return gd_height, gd_width


def _export_grounding(folder: FiLoFolder, staging: Path, image_hw: tuple[int, int]) -> GraphSpec:
    from fbclip_edge.export.grounding_onnx import export_grounding_onnx

    assert folder.detector is not None
    name = GRAPH_FILES[GraphRole.GROUNDING]
    spec = export_grounding_onnx(folder.detector, staging / name, image_hw, opset=OPSET)
    return GraphSpec(
        GraphRole.GROUNDING,
        Precision.FP32,
        name,
        list(spec.inputs),
        list(spec.outputs),
        list(spec.ops),
    )


def host_tensors(model: FiLo, table: Mapping[str, CategoryData]) -> dict[str, torch.Tensor]:
    """Both prompt learners and the CLIP token rows of every prompt of every category (a few
    hundred rows instead of the 49408-row embedding)."""
    context = int(model.clip.positional_embedding.shape[0])
    ids = []
    for data in table.values():
        prompts = build_category_prompts(data, model.config.n_ctx, context)
        ids += [prompts.normal_ids.flatten(), prompts.abnormal_ids.flatten()]
    tokens = TokenTable.from_embedding(model.clip.token_embedding, torch.cat(ids))
    tensors = {TOKEN_IDS: tokens.ids, TOKEN_ROWS: tokens.rows}
    for prefix in LEARNERS:
        learner: nn.Module = getattr(model, prefix)
        tensors.update({f"{prefix}.{k}": v for k, v in learner.state_dict().items()})
    return {k: _stored(v) for k, v in tensors.items()}


def _stored(tensor: torch.Tensor) -> torch.Tensor:
    """CPU, contiguous, float32 for floating tensors (the host computes in float32)."""
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.is_floating_point() else tensor).contiguous()


def _write_host(folder: FiLoFolder, staging: Path) -> list[str]:
    """filo_host.safetensors, descriptions.json (byte-exact copy) and bert/vocab.txt."""
    save_file(host_tensors(folder.model, folder.table), str(staging / HOST_FILE))
    source = folder.path / DESCRIPTIONS_FILE
    if source.is_file():
        shutil.copyfile(source, staging / DESCRIPTIONS_FILE)
    else:  # a FiLoFolder built in memory: its table, in the descriptions file's format
        entries = {
            name: {
                "class_word": data.class_word,
                "descriptions": list(data.descriptions),
                "grounding_descriptions": list(data.grounding_descriptions),
            }
            for name, data in folder.table.items()
        }
        (staging / DESCRIPTIONS_FILE).write_text(json.dumps(entries, indent=1), encoding="utf-8")
    names = [HOST_FILE, DESCRIPTIONS_FILE]
    if folder.detector is not None:
        (staging / VOCAB_FILE).parent.mkdir(parents=True, exist_ok=True)
        text = "\n".join(folder.detector.vocab.tokens) + "\n"
        (staging / VOCAB_FILE).write_text(text, encoding="utf-8")
        names.append(VOCAB_FILE)
    return names


def _filo_info(
    folder: FiLoFolder, image_hw: tuple[int, int] | None, frame: tuple[int, int] | None
) -> FiLoArtifacts:
    from fbclip_edge.methods.filo.stages import torch_host

    settings = torch_host(folder.model, folder.table, None).settings
    return FiLoArtifacts(
        settings=settings,
        descriptions_sha256=folder.descriptions_sha256,
        categories=tuple(folder.table),
        grounding_hw=image_hw,
        frame_size=frame if image_hw is not None else None,
        vocab=VOCAB_FILE if folder.detector is not None else None,
    )


def _manifest(
    folder: FiLoFolder,
    graphs: list[GraphSpec],
    precision: Precision,
    profile: BatchProfile,
    info: FiLoArtifacts,
) -> Manifest:
    cfg = folder.model.config
    weights = folder.path / WEIGHTS_FILE
    versions = _tool_versions(False)
    if folder.detector is not None:
        import transformers

        versions["transformers"] = transformers.__version__
    return Manifest(
        model=ModelRef(
            str(folder.path.resolve()),
            sha256_file(weights) if weights.is_file() else "",
            cfg.backbone.name,
            json.loads(json.dumps(cfg.to_dict())),
        ),
        image_size=cfg.image_size,
        patch_size=cfg.backbone.patch_size,
        grid_size=cfg.grid_size,
        num_maps=cfg.num_maps,
        tokens=cfg.num_patches + 1,
        embed_dim=cfg.embed_dim,
        temperature=1.0 / float(cfg.logit_scale),
        precision=precision,
        scoring=Scoring.GRAPH,
        opset=OPSET,
        batch=profile,
        graphs=graphs,
        engines=[],
        files={},
        versions=versions,
        text_features="",  # FiLo's text is computed per image: no frozen features or weights
        map_weights="",
        method="filo",
        score_rule="filo",  # (s_abnormal + max A) / 2, spec 7.3
        extra={EXTRA_KEY: info.to_dict()},
    )


# ----- parity -----
@dataclass(frozen=True)
class ParityInputs:
    """Frames through the real preprocessing: CLIP pixels, Grounding DINO inputs, categories."""

    pixels: torch.Tensor  # (F, 3, S, S)
    gd_pixels: list[torch.Tensor] | None  # F of (1, 3, h, w); None without a detector
    categories: list[str]
    synthetic: bool


def random_frames(count: int, frame_size: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """Seeded uniform-noise RGB frames (H, W, 3) uint8 of frame_size (W, H)."""
    rng = np.random.default_rng(seed)
    width, height = frame_size
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


def parity_inputs(
    folder: FiLoFolder,
    frame_size: tuple[int, int],
    gd_hw: tuple[int, int] | None,
    frames: Sequence[np.ndarray] | None = None,
    categories: Sequence[str] | None = None,
    count: int = PARITY_FRAMES,
) -> ParityInputs:
    """Given frames (else seeded random ones of frame_size); categories cycle through the
    table unless given. Grounding inputs must have the size the graph was exported for."""
    chosen = list(frames) if frames is not None else random_frames(count, frame_size)
    if not chosen:
        raise FBClipError("no parity frames given; pass some frames or none for random ones")
    names = list(categories) if categories is not None else list(folder.table)
    if categories is not None and len(names) != len(chosen):
        raise FBClipError(f"{len(names)} parity categories for {len(chosen)} frames; give one each")
    names = [names[i % len(names)] for i in range(len(chosen))]
    pixels = preprocess(chosen, folder.model.config.image_size)
    gd_pixels = None
    if gd_hw is not None:
        from fbclip_edge.methods.filo.grounding import gd_preprocess

        gd_pixels = [gd_preprocess(frame) for frame in chosen]
        sizes = {tuple(p.shape[-2:]) for p in gd_pixels} - {gd_hw}
        if sizes:
            raise FBClipError(
                f"parity frames give Grounding DINO inputs of {sorted(sizes)} but the graph is "
                f"exported for {gd_hw} (h, w); pass frames of the camera's size with frame_size "
                "(--frame-size WxH)"
            )
    return ParityInputs(pixels, gd_pixels, names, frames is None)


@dataclass(frozen=True)
class _Outputs:
    scores: torch.Tensor  # (F,)
    maps: torch.Tensor  # (F, S, S) after the box step
    positions: list[str | None]
    ms_per_image: float | None  # best chunk after the first


def run_pipeline(pipeline: FiLoPipeline, inputs: ParityInputs, batch: int) -> _Outputs:
    """The pipeline over the frames in chunks of `batch` (batch > 1 is exercised)."""
    results: list[FiLoResult] = []
    seconds = []
    for start in range(0, int(inputs.pixels.shape[0]), batch):
        stop = start + batch
        gd = inputs.gd_pixels[start:stop] if inputs.gd_pixels is not None else None
        begin = time.perf_counter()
        chunk = pipeline.run(inputs.pixels[start:stop], inputs.categories[start:stop], gd)
        seconds.append((time.perf_counter() - begin) / len(chunk))
        results += chunk
    return _Outputs(
        torch.tensor([r.image_score for r in results], dtype=torch.float32),
        torch.stack([r.anomaly_map.float() for r in results]),
        [r.position for r in results],
        1e3 * min(seconds[1:]) if len(seconds) > 1 else None,
    )


def _log_odds(values: torch.Tensor) -> torch.Tensor:
    p = values.double().clamp(1e-7, 1 - 1e-7)
    return torch.log(p) - torch.log1p(-p)


def parity_row(
    target: str,
    device: str,
    precision: Precision,
    got: _Outputs,
    reference: _Outputs,
    tolerance: Tolerance,
) -> ParityRow:
    """Max-abs differences of image scores and final maps (after the box step)."""
    want = torch.cat([_log_odds(reference.scores), _log_odds(reference.maps).flatten()])
    have = torch.cat([_log_odds(got.scores), _log_odds(got.maps).flatten()])
    same = sum(a == b for a, b in zip(got.positions, reference.positions, strict=True))
    return ParityRow(
        target=target,
        backend=f"onnxruntime on {device}",
        precision=precision.value,
        score_max_abs=float((got.scores - reference.scores).abs().max()),
        map_max_abs=float((got.maps - reference.maps).abs().max()),
        logit_rel_l2=float((have - want).norm() / want.norm().clamp_min(1e-12)),
        auroc=None,
        reference_auroc=None,
        tolerance=tolerance,
        details={"positions_equal": f"{same}/{len(got.positions)}"},
        ms_per_image=got.ms_per_image,
    )


def _parity(
    folder: FiLoFolder,
    staging: Path,
    manifest: Manifest,
    inputs: ParityInputs,
    limits: Mapping[Precision, Tolerance],
    step: Callable[[str], None],
) -> ParityReport:
    """The torch pipeline once (strict float32), then the onnxruntime pipeline per exported
    precision, opened from the staging folder exactly as users will open the artifacts."""
    from fbclip_edge.runtime.onnxruntime import available_providers

    gpu = "cuda" in available_providers() and torch.cuda.is_available()
    provider = "cuda" if gpu else "cpu"
    batch = min(max(2, manifest.batch.min), manifest.batch.max)
    with strict_fp32():
        reference = run_pipeline(
            torch_pipeline(folder.model, folder.table, folder.detector), inputs, batch
        )
    rows = []
    precisions = sorted({g.precision for g in manifest.graphs}, key=lambda p: p != Precision.FP32)
    for precision in precisions:
        graphs = select_graphs(manifest, provider, precision.value)
        files = ", ".join(spec.file for spec in graphs.values())
        step(f"parity: onnxruntime {precision.value} ({files})")
        pipeline = open_onnx_pipeline(staging, manifest, provider, precision.value)
        got = run_pipeline(pipeline, inputs, batch)
        row = parity_row(
            f"filo {precision.value} graphs", provider, precision, got, reference, limits[precision]
        )
        row.details["graphs"] = files
        rows.append(row)
        del pipeline
    device = str(next(folder.model.parameters()).device)
    return ParityReport(
        rows,
        len(inputs.categories),
        inputs.synthetic,
        manifest.image_size,
        f"torch fp32 FiLo pipeline on {device}",
    )


def _check_precision(precision: str | Precision) -> Precision:
    wanted = parse_precision(precision)
    if wanted not in (Precision.FP32, Precision.FP16):
        raise FBClipError(
            f"FiLo exports --precision fp32 or fp16 (mixed-precision vision and text graphs), not "
            f"{wanted.value}: its CPU precisions are not built yet"
        )
    return wanted


def _profile(batch: BatchProfile | str | tuple[int, int, int]) -> BatchProfile:
    return BatchProfile(*batch) if isinstance(batch, tuple) else BatchProfile.parse(batch)


def export_filo(
    folder: FiLoFolder,
    out: str | Path,
    precision: str | Precision = "fp32",
    batch: BatchProfile | str | tuple[int, int, int] = (1, 1, 1),
    frame_size: tuple[int, int] | None = None,
    progress: Progress | None = None,
    tolerances: Mapping[Precision, Tolerance] | None = None,
    parity_frames: Sequence[np.ndarray] | None = None,
    parity_categories: Sequence[str] | None = None,
    parity_count: int = PARITY_FRAMES,
) -> ExportResult:
    """Write `out` atomically: the FiLo graphs (fp16 adds mixed-precision vision and text),
    the host's files, manifest.json and parity.json; raise ParityError (nothing written) when
    the onnxruntime pipeline is beyond tolerance of the torch pipeline.

    frame_size (W, H) is the camera's frame: Grounding DINO's graph takes the fixed input size
    gd_preprocess makes of it (default square S x S frames). Parity runs `parity_count` seeded
    random frames of that size unless frames are given (categories cycle through the table).
    """
    wanted = _check_precision(precision)
    profile = _profile(batch)
    limits = {**DEFAULT_TOLERANCES, **(tolerances or {})}
    with_gd = folder.detector is not None
    size = folder.model.config.image_size
    frame = (int(frame_size[0]), int(frame_size[1])) if frame_size else (size, size)
    gd_hw = grounding_input_hw(size, frame) if with_gd else None
    fp16 = wanted == Precision.FP16
    step = _Steps(progress, 8 + with_gd + 3 * fp16)
    out = Path(out)
    inputs = parity_inputs(folder, frame, gd_hw, parity_frames, parity_categories, parity_count)
    folder.model.eval()
    with atomic_directory(out) as staging:
        graphs = []
        for trace in _traces(folder.model):
            step(f"export {_graph_file(trace.role, Precision.FP32)}")
            graphs.append(_export_graph(trace, staging))
        if gd_hw is not None:
            step(f"export grounding.onnx ({gd_hw[1]}x{gd_hw[0]} input)")
            graphs.append(_export_grounding(folder, staging, gd_hw))
        if fp16:
            for spec in [g for g in graphs if g.role in (GraphRole.VISION, GraphRole.TEXT)]:
                step(f"mixed-precision {_graph_file(spec.role, Precision.FP16)}")
                graphs.append(_mixed_precision(spec, staging))
        step("write host tensors, descriptions and vocabulary")
        names = _write_host(folder, staging)
        step("write manifest")
        info = _filo_info(folder, gd_hw, frame)
        manifest = _manifest(folder, graphs, wanted, profile, info)
        names += [name for g in graphs for name in (g.file, *g.data_files)]
        record_files(manifest, staging, names)
        write_manifest(manifest, staging)
        manifest = read_manifest(staging)  # round trip: what runtimes will read
        step("parity: float32 torch pipeline")
        report = _parity(folder, staging, manifest, inputs, limits, step)
        (staging / PARITY).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        manifest.parity = PARITY
        record_files(manifest, staging, [PARITY])
        write_manifest(manifest, staging)
        if not report.passed:
            raise ParityError(report)
        step("move into place")
        for path in staging.rglob("*"):  # temp files and safetensors are private by default
            path.chmod(0o755 if path.is_dir() else 0o644)
    step.finish()
    return ExportResult(out, read_manifest(out), report)


__all__ = [
    "GRAPH_FILES",
    "ParityInputs",
    "export_filo",
    "grounding_input_hw",
    "host_tensors",
    "parity_inputs",
    "random_frames",
    "run_pipeline",
]
