"""FiLo in `fbclip-edge bench`: rows beside the registered methods, stage by stage.

FiLo is not an `AnomalyModel` (its text depends on the frame, its category and Grounding
DINO's position word), so it cannot be cut into the harness's network/scoring callables.
Its rows time what a deployment calls, `FiLoBackend.run_frames(frames, categories)`, and read
the split from the pipeline's own clock (`FiLoPipeline.times`): grounding, vision, text,
score and host. The model is a model folder, the one behind FiLo artifacts, or random
weights: FiLo on the bench's CLIP backbone plus a Grounding DINO of the published size
(SwinT_OGC, BERT-base text encoder), so nothing is downloaded and timings match the real
model's (they do not depend on the weights' values).
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fbclip_edge.bench.backends import BASELINE, device_for, export_plan
from fbclip_edge.bench.device import cpu_snapshot, other_cpu_share
from fbclip_edge.bench.schema import BackendResult, Measurement, MethodOutcome, ModelInfo
from fbclip_edge.bench.timing import (
    baseline_drift,
    host_rss_peak_bytes,
    make_frames,
    one_line,
    out_of_time,
    release,
    reset_host_peak,
    stage_stats,
)
from fbclip_edge.errors import FBClipError
from fbclip_edge.methods.filo.pipeline import STAGES as FILO_STAGES
from fbclip_edge.methods.filo.pipeline import FiLoPipeline

if TYPE_CHECKING:
    from fbclip_edge.bench.harness import BenchRun
    from fbclip_edge.bench.schema import BenchConfig, StageStats
    from fbclip_edge.methods.filo.folder import FiLoFolder
    from fbclip_edge.methods.filo.grounding import GroundingDetector, GroundingDinoArch
    from fbclip_edge.runtime.filo import FiLoBackend

METHOD = "filo"
#: The pipeline's networks: what `model_*` columns and FLOPs cover (host steps excluded).
NETWORK_STAGES = ("grounding", "vision", "text", "score")
#: Bench backend -> (open_frames backend, onnxruntime provider): FiLo's runtimes.
FILO_BACKENDS: dict[str, tuple[str, str | None]] = {
    BASELINE: ("torch", None),
    "onnxruntime-cpu": ("onnxruntime", "cpu"),
    "onnxruntime-cuda": ("onnxruntime", "cuda"),
}
UNSUPPORTED = (
    "FiLo runs on torch eager fp32 and onnxruntime (fp32 graphs) only: its Grounding DINO and "
    "per-frame text have no {name} path yet"
)
#: The random model's categories: typical phrase counts (the text stage runs 7 normal
#: prompts plus one abnormal prompt per phrase for each frame).
DESCRIPTIONS: dict[str, dict[str, Any]] = {
    "bottle": {
        "class_word": "bottle",
        "descriptions": [
            "cracked glass", "chipped rim", "broken neck", "scratched surface",
            "contaminated liquid", "dirty label", "missing cap",
        ],
    },
    "pcb1": {
        "class_word": "pcb",
        "descriptions": [
            "bent pins", "burnt component", "solder bridge", "missing resistor",
            "scratched trace", "lifted pad",
        ],
    },
}  # fmt: skip


@dataclass(frozen=True)
class BertSize:
    """The text encoder's sizes (only the vocabulary differs from bert-base-uncased's: it
    changes nothing but the embedding table's row count)."""

    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072


BERT_BASE = BertSize()
#: The 'tiny' test backbone gets a Grounding DINO of the fixture's size (filo-reference-tiny):
#: the same network shape at a fraction of the cost, so CI can run FiLo rows.
TINY_BERT = BertSize(hidden=32, layers=2, heads=2, intermediate=64)


def tiny_grounding_arch() -> GroundingDinoArch:
    """The fixture's Grounding DINO: hidden 64, 2 + 2 layers, Swin embed 8, depths 2-2-2-2."""
    from fbclip_edge.methods.filo.grounding import GroundingDinoArch

    return GroundingDinoArch(
        hidden_dim=64,
        dim_feedforward=128,
        enc_layers=2,
        dec_layers=2,
        swin_embed_dim=8,
        swin_heads=(1, 2, 4, 8),
        text_pos_width=None,
        query_sine_width=None,
    )


def grounding_size(backbone: str) -> tuple[GroundingDinoArch, BertSize, str]:
    """(arch, BERT sizes, label) of the random detector for a backbone: the published
    SwinT_OGC + BERT-base for every real backbone, the fixture's tiny one for 'tiny'."""
    from fbclip_edge.methods.filo.grounding import SWINT_OGC

    if backbone == "tiny":
        return tiny_grounding_arch(), TINY_BERT, "tiny Grounding DINO (test size)"
    return SWINT_OGC, BERT_BASE, "Grounding DINO SwinT_OGC + BERT-base"


# ----------------------------------------------------------------- the random model


def caption_words(table: Mapping[str, Any]) -> list[str]:
    """Every word and punctuation mark of the categories' Grounding DINO captions."""
    from fbclip_edge.methods.filo.boxes import grounding_caption

    words: dict[str, None] = {}
    for data in table.values():
        caption = grounding_caption(data.grounding_descriptions)
        words.update(dict.fromkeys(re.findall(r"\w+|[^\w\s]", caption)))
    return list(words)


def write_bert_folder(folder: Path, size: BertSize, words: list[str]) -> Path:
    """A BERT config folder (config.json, vocab.txt, tokenizer files) for `grounding_config`:
    a WordPiece vocabulary of the special tokens and the captions' words."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?"]
    vocab = specials + [w for w in words if w not in specials]
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_size": size.hidden,
        "num_hidden_layers": size.layers,
        "num_attention_heads": size.heads,
        "intermediate_size": size.intermediate,
        "hidden_act": "gelu",
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "vocab_size": len(vocab),
        "pad_token_id": 0,
        "layer_norm_eps": 1e-12,
    }
    tokenizer = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": True,
        **{f"{k}_token": f"[{k.upper()}]" for k in ("cls", "sep", "pad", "unk", "mask")},
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return folder


def random_detector(
    scratch: Path, table: Mapping[str, Any], arch: GroundingDinoArch, bert: BertSize, seed: int
) -> GroundingDetector:
    """A random-weight Grounding DINO of `arch` with a BERT of `bert`'s sizes."""
    from transformers import GroundingDinoForObjectDetection

    from fbclip_edge.methods.filo.grounding import GroundingDetector, grounding_config

    bert_dir = write_bert_folder(scratch / "bert", bert, caption_words(table))
    torch.manual_seed(seed + 1)
    model = GroundingDinoForObjectDetection(grounding_config(arch, bert_dir))
    return GroundingDetector(model, bert_dir)


def random_filo(config: BenchConfig, scratch: Path) -> tuple[FiLoFolder, str]:
    """FiLo on a random CLIP of the bench's backbone and size, a random Grounding DINO and
    DESCRIPTIONS, as an in-memory model folder (export_filo takes it as is)."""
    from fbclip_edge.clip.backbone import backbone_config
    from fbclip_edge.methods.filo import FiLo, FiLoConfig
    from fbclip_edge.methods.filo.descriptions import parse_descriptions
    from fbclip_edge.methods.filo.folder import FiLoFolder, sha256_file

    size = config.image_size or 224
    torch.manual_seed(config.seed)
    model = FiLo(FiLoConfig(backbone=backbone_config(config.backbone), image_size=size)).eval()
    table = parse_descriptions(DESCRIPTIONS)
    arch, bert, label = grounding_size(config.backbone)
    detector = random_detector(scratch, table, arch, bert, config.seed)
    descriptions = scratch / "descriptions.json"
    descriptions.write_text(json.dumps(DESCRIPTIONS, indent=1), encoding="utf-8")
    folder = FiLoFolder(scratch / "model", model, detector, table, sha256_file(descriptions), {})
    source = (
        f"{config.backbone}, random weights (seed {config.seed}) with a random {label}, "
        f"{len(table)} categories of {', '.join(str(len(d.descriptions)) for d in table.values())}"
        " phrases"
    )
    return folder, source


# ----------------------------------------------------------------- what is measured


@dataclass
class FiLoSubject:
    """The FiLo model under test: a folder (loaded or random) and/or the user's artifacts,
    plus the artifacts this run exported (made lazily, for onnxruntime)."""

    folder: FiLoFolder | None
    artifacts: Path | None
    source: str
    scratch: Path
    export_seconds: float | None = None
    made: Path | None = None


def load_subject(config: BenchConfig, scratch: Path) -> FiLoSubject:
    """--model FiLo folder, --artifacts FiLo artifacts (the model folder they name, when it
    is still there, runs the torch rows), or the random model."""
    from fbclip_edge.methods.filo.folder import load_filo

    if config.model is not None:
        folder = load_filo(config.model)
        _check_size(config, folder.model.config.image_size, str(config.model))
        return FiLoSubject(folder, config.artifacts, f"FiLo model folder {config.model}", scratch)
    if config.artifacts is not None:
        from fbclip_edge.artifacts.manifest import read_manifest

        manifest = read_manifest(config.artifacts)
        _check_size(config, manifest.image_size, str(config.artifacts))
        recorded = Path(manifest.model.path) if manifest.model.path else None
        if recorded is not None and recorded.is_dir():
            source = f"FiLo model folder {recorded} (from {config.artifacts})"
            return FiLoSubject(load_filo(recorded), config.artifacts, source, scratch)
        source = f"FiLo artifacts {config.artifacts} (their model folder is gone)"
        return FiLoSubject(None, config.artifacts, source, scratch)
    folder, source = random_filo(config, scratch)
    return FiLoSubject(folder, None, source, scratch)


def _check_size(config: BenchConfig, size: int, where: str) -> None:
    """FiLo resizes CLIP's positional embedding once, when the model is built: a saved
    model runs at its own size only."""
    if config.image_size and config.image_size != size:
        raise FBClipError(
            f"{where} runs FiLo at {size} px; drop --image-size or pass --image-size {size}"
        )


def _frame_size_wh(config: BenchConfig) -> tuple[int, int]:
    height, width = config.frame_size
    return width, height


def frames_for(config: BenchConfig, subject: FiLoSubject) -> tuple[BenchConfig, str | None]:
    """The config FiLo's rows run with: the user's artifacts fix Grounding DINO's input to
    the camera frame they were exported for, so every FiLo row (torch too, for a fair
    speedup) gets frames of that size; with the reason as a note when it changed."""
    if subject.artifacts is None:
        return config, None
    from fbclip_edge.artifacts.manifest import read_manifest
    from fbclip_edge.runtime.filo_onnx import FiLoArtifacts

    exported = FiLoArtifacts.from_manifest(read_manifest(subject.artifacts)).frame_size
    if exported is None or exported == _frame_size_wh(config):
        return config, None
    width, height = exported
    note = (
        f"filo: {width}x{height} frames, the camera size {subject.artifacts} was exported for "
        f"(Grounding DINO's graph has a fixed input), instead of "
        f"{config.frame_size[1]}x{config.frame_size[0]}"
    )
    return dataclasses.replace(config, frame_size=(height, width)), note


def artifacts_folder(subject: FiLoSubject, config: BenchConfig, names: list[str]) -> Path:
    """The user's artifacts, else one export_filo of the model per run (setup, not timed;
    Grounding DINO's graph sized for the bench's frames)."""
    if subject.artifacts is not None:
        return subject.artifacts
    if subject.made is None:
        from fbclip_edge.export.filo import export_filo

        assert subject.folder is not None
        _to_device(subject.folder, torch.device("cpu"))
        plan = export_plan([n for n in names if n != BASELINE], config.batches)
        precision = "fp16" if plan.precision == "fp16" else "fp32"
        start = time.perf_counter()
        export_filo(
            subject.folder,
            subject.scratch / "artifacts",
            precision,
            plan.batch_profile,
            _frame_size_wh(config),
            parity_count=2,
        )
        subject.export_seconds = time.perf_counter() - start
        subject.made = subject.scratch / "artifacts"
    return subject.made


def _to_device(folder: FiLoFolder, device: torch.device) -> None:
    folder.model.to(device)
    if folder.detector is not None:
        torch.nn.Module.to(folder.detector.model, device)


@dataclass
class FiLoBuilt:
    """A ready FiLo backend and what BackendResult reports about it."""

    name: str
    backend: FiLoBackend
    device: torch.device
    precision: str
    setup_seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def pipeline(self) -> FiLoPipeline:
        return self.backend.pipeline


def build_filo_backend(
    name: str, subject: FiLoSubject, config: BenchConfig, names: list[str]
) -> FiLoBuilt:
    """torch-eager-fp32 on the model itself (or the artifacts' model folder), onnxruntime on
    the exported graphs."""
    from fbclip_edge.runtime.base import BackendInfo
    from fbclip_edge.runtime.filo import FiLoBackend
    from fbclip_edge.runtime.open import open_frames

    runtime, provider = FILO_BACKENDS[name]
    device = device_for(name) if runtime == "torch" else torch.device("cpu")
    start = time.perf_counter()
    if runtime == "torch" and subject.folder is not None:
        from fbclip_edge.methods.filo.stages import torch_pipeline

        folder = subject.folder
        _to_device(folder, device)
        pipeline = torch_pipeline(folder.model, folder.table, folder.detector)
        info = BackendInfo("torch", str(device), "fp32", folder.model.config.image_size)
        info.details["note"] = "eager float32: FiLoPipeline on the model itself (TorchStages)"
        backend: FiLoBackend = FiLoBackend(pipeline, info)
    elif runtime == "torch":
        raise FBClipError(
            f"{subject.artifacts} name a model folder that is gone; torch rows need it (pass "
            "--model FOLDER)"
        )
    else:
        opened = open_frames(
            artifacts_folder(subject, config, names), backend="onnxruntime", provider=provider
        )
        assert isinstance(opened, FiLoBackend)
        backend = opened
        if provider == "cuda":
            device = torch.device("cuda")
    setup = time.perf_counter() - start
    details = {"runtime": backend.info.name, **{k: str(v) for k, v in backend.info.details.items()}}
    details["grounding"] = "on" if backend.pipeline.use_boxes else "off (no detector)"
    return FiLoBuilt(name, backend, device, backend.info.precision, setup, details)


# ----------------------------------------------------------------- timing


@dataclass
class _FiLoSamples:
    pipeline: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(
        default_factory=lambda: {stage: [] for stage in FILO_STAGES}
    )


def frame_sets(
    config: BenchConfig, batch: int, categories: tuple[str, ...]
) -> list[tuple[list[np.ndarray], list[str]]]:
    """The harness's frame batches as lists of frames, each frame with a category (cycling
    through the table so every category's text is timed)."""
    sets = []
    for index, frames in enumerate(make_frames(config, batch)):
        names = [categories[(index * batch + i) % len(categories)] for i in range(batch)]
        sets.append(([frames[i] for i in range(batch)], names))
    return sets


def _iteration(
    built: FiLoBuilt, frames: list[np.ndarray], categories: list[str]
) -> tuple[dict[str, float], float]:
    """One frames -> FrameResults pass: (ms per stage from the pipeline's clock, wall ms)."""
    times = built.pipeline.times
    times.reset()
    start = time.perf_counter()
    built.backend.run_frames(frames, categories)
    if built.device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = (time.perf_counter() - start) * 1e3
    return {stage: seconds * 1e3 for stage, seconds in times.seconds.items()}, wall


def measure_filo(built: FiLoBuilt, batch: int, config: BenchConfig, run: BenchRun) -> Measurement:
    """Warm up, then time up to config.iters iterations of `built` at one batch size."""
    inputs = frame_sets(config, batch, built.backend.categories)
    cuda = built.device.type == "cuda" and torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_scope = "backend+batch" if reset_host_peak() else "process"
    samples = _FiLoSamples()
    with torch.inference_mode():
        warm_start = time.perf_counter()
        for index in range(config.warmup):
            _iteration(built, *inputs[index % len(inputs)])
        warmup_seconds = time.perf_counter() - warm_start
        window_start, cpu_start = time.perf_counter(), cpu_snapshot()
        for index in range(config.iters):
            stages, wall = _iteration(built, *inputs[index % len(inputs)])
            samples.pipeline.append(wall)
            for stage, value in stages.items():
                samples.stages[stage].append(value)
            if out_of_time(config, index + 1, time.perf_counter() - window_start):
                break
        window_end, cpu_end = time.perf_counter(), cpu_snapshot()
    networks = [sum(v) for v in zip(*(samples.stages[s] for s in NETWORK_STAGES), strict=True)]
    model = stage_stats(networks, batch, config.repeats)
    return Measurement(
        backend=built.name,
        batch=batch,
        pipeline=stage_stats(samples.pipeline, batch, config.repeats),
        stages=_stage_stats(samples.stages, batch, config.repeats),
        model_p50_ms=model.p50_ms,
        model_throughput=model.throughput,
        speedup=None,
        model_speedup=None,
        achieved_tflops=0.0,
        ceiling_tflops=None,
        ceiling_percent=None,
        gpu_peak_allocated_bytes=int(torch.cuda.max_memory_allocated()) if cuda else None,
        gpu_used_bytes=_gpu_used() if cuda else None,
        host_rss_peak_bytes=host_rss_peak_bytes(),
        host_rss_peak_scope=rss_scope,
        warmup_seconds=warmup_seconds,
        other_cpu_share=other_cpu_share(cpu_start, cpu_end),
        power_mw=run.power.mean_mw(window_start, window_end),
        method=METHOD,
        stages_ms=per_image_means(samples.stages, batch),
    )


def _stage_stats(
    samples: Mapping[str, list[float]], batch: int, repeats: int
) -> dict[str, StageStats | None]:
    return {s: stage_stats(v, batch, repeats) if v else None for s, v in samples.items()}


def per_image_means(samples: Mapping[str, list[float]], batch: int) -> dict[str, float]:
    """Mean ms per image of each stage: means add up (medians need not), so the stages of a
    row sum to at most its pipeline mean."""
    return {s: float(np.mean(v)) / batch for s, v in samples.items() if v}


def _gpu_used() -> int:
    free, total = torch.cuda.mem_get_info()
    return int(total - free)


# ----------------------------------------------------------------- FLOPs


class _CountingStages:
    """FiLoStages that count each network's FLOPs (torch's FlopCounterMode) as they run."""

    def __init__(self, stages: Any) -> None:
        self.stages = stages
        self.flops: dict[str, int] = dict.fromkeys(NETWORK_STAGES, 0)

    @contextmanager
    def _counted(self, stage: str) -> Iterator[None]:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            yield
        self.flops[stage] += int(counter.get_total_flops())

    def grounding(
        self, gd_pixels: torch.Tensor, input_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with self._counted("grounding"):
            found: tuple[torch.Tensor, torch.Tensor] = self.stages.grounding(gd_pixels, input_ids)
        return found

    def vision(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self._counted("vision"):
            found: tuple[torch.Tensor, torch.Tensor] = self.stages.vision(pixels)
        return found

    def text(self, prompts: torch.Tensor, end_index: torch.Tensor) -> torch.Tensor:
        with self._counted("text"):
            found: torch.Tensor = self.stages.text(prompts, end_index)
        return found

    def score(
        self, head_features: torch.Tensor, text: torch.Tensor, conditioning: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with self._counted("score"):
            found: tuple[torch.Tensor, torch.Tensor] = self.stages.score(
                head_features, text, conditioning
            )
        return found


def count_flops(folder: FiLoFolder, config: BenchConfig) -> dict[str, int]:
    """FLOPs per network for one bench frame of the first category (matmuls and convolutions;
    Grounding DINO's deformable sampling is not counted). The text stage's count depends on
    the frame: Grounding DINO's position word picks one abnormal prompt per phrase, or all."""
    from fbclip_edge.methods.filo.stages import torch_pipeline

    pipeline = torch_pipeline(folder.model, folder.table, folder.detector)
    counting = _CountingStages(pipeline.stages)
    counted = FiLoPipeline(counting, pipeline.host, pipeline.use_boxes)
    frames, categories = frame_sets(config, 1, tuple(folder.table))[0]
    with torch.inference_mode():
        counted.run_frames(frames, categories)
    return counting.flops


def model_info(subject: FiLoSubject, config: BenchConfig) -> ModelInfo:
    """The measured FiLo: FLOPs counted on one frame (0 without a torch model)."""
    from fbclip_edge.methods.filo import METHOD_INFO

    flops = count_flops(subject.folder, config) if subject.folder is not None else {}
    if subject.folder is not None:
        cfg = subject.folder.model.config
        backbone, size = cfg.backbone.name, cfg.image_size
        layers, maps = list(cfg.feature_layers), cfg.num_maps
    else:
        from fbclip_edge.artifacts.manifest import read_manifest

        assert subject.artifacts is not None
        manifest = read_manifest(subject.artifacts)
        backbone, size = manifest.model.backbone, manifest.image_size
        layers, maps = [], manifest.num_maps
    return ModelInfo(
        method=METHOD,
        title=METHOD_INFO.title,
        source=subject.source,
        backbone=backbone,
        image_size=size,
        feature_layers=layers,
        num_maps=maps,
        flops_backbone=flops.get("vision", 0),
        flops_heads=flops.get("score", 0),
        flops_total=sum(flops.values()),
        stage_flops=flops or None,
    )


# ----------------------------------------------------------------- the method's run


def split_backends(
    chosen: list[str], skipped: Mapping[str, str]
) -> tuple[list[str], dict[str, str]]:
    """(FiLo's backends to run, name -> skip reason): the run's choice minus what FiLo has
    no runtime for."""
    run = [name for name in chosen if name in FILO_BACKENDS]
    reasons = dict(skipped)
    reasons.update({n: UNSUPPORTED.format(name=n) for n in chosen if n not in FILO_BACKENDS})
    return run, reasons


@dataclass
class _FiLoRun:
    """One FiLo method run inside a bench run (the harness's `BenchRun` gives config, clock
    helpers and the log)."""

    run: BenchRun
    config: BenchConfig
    subject: FiLoSubject
    names: list[str]
    flops: int

    def backend(self, name: str) -> tuple[BackendResult, list[Measurement]]:
        """Build and measure one backend at every batch; failures become reasons."""
        config, say = self.config, self.run.say
        label = f"{METHOD} {name}"
        result = BackendResult(name, "ok", method=METHOD)
        try:
            say(f"{label}: preparing")
            built = build_filo_backend(name, self.subject, config, self.names)
        except Exception as error:  # one broken backend must not end the run
            result.status, result.reason = "failed", one_line(error)
            say(f"{label}: failed ({result.reason})")
            return result, []
        result.device, result.precision = str(built.device), built.precision
        result.setup_seconds, result.details = built.setup_seconds, dict(built.details)
        ceiling = self.run.ceiling(built.device, "fp32")
        rows = []
        for batch in config.batches:
            say(f"{label}: batch {batch}")
            try:
                row = measure_filo(built, batch, config, self.run)
            except Exception as error:  # e.g. out of memory at the largest batch
                result.batch_failures[str(batch)] = one_line(error)
                say(f"{label}: batch {batch} failed ({one_line(error)})")
                continue
            row.achieved_tflops = self.flops * batch / (row.model_p50_ms / 1e3) / 1e12
            if ceiling is not None:
                row.ceiling_tflops = ceiling.tflops
                row.ceiling_percent = 100.0 * row.achieved_tflops / ceiling.tflops
            rows.append(row)
        if len(result.batch_failures) == len(config.batches):
            result.status, result.reason = "failed", next(iter(result.batch_failures.values()))
        return result, rows


def filo_outcome(run: BenchRun, chosen: list[str], skipped: Mapping[str, str]) -> MethodOutcome:
    """Every FiLo backend of the run, eager baseline first and again at the end for drift;
    the model, its detector and any export live in a temporary folder gone on return."""
    names, reasons = split_backends(chosen, skipped)
    with tempfile.TemporaryDirectory(prefix="fbclip-bench-filo-") as scratch:
        run.say(f"{METHOD}: building the model")
        subject = load_subject(run.config, Path(scratch))
        config, frames_note = frames_for(run.config, subject)
        run.say(f"{METHOD}: counting FLOPs on one frame")
        info = model_info(subject, config)
        results = [BackendResult(n, "skipped", r, method=METHOD) for n, r in reasons.items()]
        timing = _FiLoRun(run, config, subject, names, info.flops_total)
        rows: list[Measurement] = []
        for name in names:
            result, measured = timing.backend(name)
            results.append(result)
            rows.extend(measured)
            release()
        drift = None
        if config.recheck_baseline and len(names) > 1 and BASELINE in names:
            run.say(f"{METHOD} {BASELINE}: timing again, for the machine's drift")
            _, again = timing.backend(BASELINE)
            drift = baseline_drift(rows, again)
            release()
    notes = filo_notes(info) + ([frames_note] if frames_note else [])
    return MethodOutcome(info, results, rows, drift, export_note(subject), notes)


def export_note(subject: FiLoSubject) -> str | None:
    """How the onnxruntime rows' artifacts came about, for the results' notes."""
    if subject.artifacts is not None:
        return f"filo: onnxruntime rows opened {subject.artifacts}"
    if subject.export_seconds is None:
        return None
    return (
        "filo: exported for this run with export_filo (fp32 ONNX: grounding, vision, text, "
        f"score graphs, parity-checked on 2 frames); took {subject.export_seconds:.1f} s (not "
        "part of any timing)"
    )


def filo_notes(info: ModelInfo) -> list[str]:
    """How to read the FiLo rows."""
    notes = [
        "filo rows: uint8 frames + one category per frame -> FrameResults (score, map after the "
        "box step, boxes) through FiLoBackend.run_frames; stages from FiLoPipeline.times: "
        "grounding (Grounding DINO, one call per frame), vision (batched), text (CLIP text "
        "encoder on the frame's prompts, per frame), score (batched), host (both "
        "preprocessings, prompt embeddings, box filter, aggregation, box step); stages_ms is "
        "mean ms per image; 'model' is the four networks",
    ]
    if info.stage_flops:
        parts = ", ".join(f"{k} {v / 1e9:.3g}" for k, v in info.stage_flops.items())
        notes.append(
            f"filo FLOPs per image counted by torch's FlopCounterMode on one frame (GFLOP): "
            f"{parts}; Grounding DINO's deformable sampling is not counted, and text depends on "
            "the position word (one abnormal prompt per phrase, or all of them)"
        )
    return notes
