"""The `fbclip-edge` command line: thin typer commands over library functions."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fbclip_edge.errors import FBClipError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()
F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(command: F) -> F:
    """Print user errors as one line (no traceback) and exit with status 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except FBClipError as error:
            message = escape(str(error))  # messages name extras like fbclip-edge[trt]
            Console(stderr=True).print(
                f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _layers(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise FBClipError(
            f"--feature-layers '{text}' must be comma-separated integers, e.g. 1,6,12,18,24"
        ) from None


@app.command()
@friendly_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the synthetic images and overlays.")] = Path(
        "demo-out"
    ),
    no_fixture: Annotated[
        bool, typer.Option(help="Ignore the reference fixture; use random tiny weights.")
    ] = False,
    image_size: Annotated[int, typer.Option(help="Input side in pixels (multiple of 14).")] = 518,
) -> None:
    """Run FB-CLIP, AnomalyCLIP (and FiLo, with its fixture) on the embedded tiny defaults:
    parity, then overlays."""
    from fbclip_edge.demo import run_demo

    for result in run_demo(out, use_fixture=not no_fixture, image_size=image_size):
        console.rule(f"{result.method}")
        console.print(f"model: {result.source}, {result.image_size} px")
        if result.parity:
            worst = max(result.parity.values())
            verdict = "[green]match[/]" if worst < 1e-5 else "[red]MISMATCH[/]"
            details = ", ".join(f"{k} {v:.1e}" for k, v in result.parity.items())
            console.print(
                f"parity with the authors' reference outputs: {verdict} (max abs diff: {details})"
            )
        filo = result.method == "filo"
        extra = ("category", "position", "anomaly boxes") if filo else ()
        table = Table("image", "image score", "decision", "defect px", *extra)
        for row in result.predictions.rows:
            name = "/".join(Path(row.file).parts[-4:])
            cells = [name, f"{row.score:.4f}", row.decision, str(row.defect_area)]
            if filo:
                cells += [row.category, row.position or "-", str(row.anomaly_boxes)]
            table.add_row(*cells)
        console.print(table)
        console.print(
            f"overlays (image | heat map | defect contour): {out}/{result.method}/predictions/"
            f"overlays/ ; table: {out}/{result.method}/predictions/results.csv"
        )
    console.print(
        "Decisions use the uncalibrated 0.5 threshold and tiny random-weight CLIPs: they show "
        "the pipeline works, not what a trained ViT-L-14-336 detects."
    )


@app.command("import-official")
@friendly_errors
def import_official_command(
    checkpoint: Annotated[Path, typer.Option(help="The authors' published checkpoint (.pth).")],
    out: Annotated[Path, typer.Option(help="Model folder to write.")],
    clip_weights: Annotated[
        Path | None,
        typer.Option(
            help="OpenAI CLIP weights: .pt TorchScript file or state dict (FiLo: optional)."
        ),
    ] = None,
    method: Annotated[str, typer.Option(help="fbclip, anomalyclip or filo.")] = "fbclip",
    image_size: Annotated[
        int | None, typer.Option(help="Input side in pixels (default 518; FiLo: its checkpoint's).")
    ] = None,
    feature_layers: Annotated[
        str | None,
        typer.Option(help="Comma-separated 1-based blocks (AnomalyCLIP's published: 24)."),
    ] = None,
    grounding_checkpoint: Annotated[
        Path | None, typer.Option(help="FiLo: Grounding DINO checkpoint (with --text-encoder).")
    ] = None,
    text_encoder: Annotated[
        Path | None, typer.Option(help="FiLo: Grounding DINO's BERT folder (config, vocab).")
    ] = None,
    descriptions: Annotated[
        Path | None, typer.Option(help="FiLo: category descriptions JSON (required).")
    ] = None,
    grounding_config: Annotated[
        Path | None,
        typer.Option(help="FiLo: JSON of the original Grounding DINO config (default SwinT_OGC)."),
    ] = None,
    backbone: Annotated[
        str | None,
        typer.Option(help="FiLo: CLIP arch, open_clip name or JSON (default: from the weights)."),
    ] = None,
) -> None:
    """Convert the authors' published checkpoint into an fbclip-edge model folder."""
    filo_options = {
        "--grounding-checkpoint": grounding_checkpoint,
        "--text-encoder": text_encoder,
        "--descriptions": descriptions,
        "--grounding-config": grounding_config,
        "--backbone": backbone,
    }
    if method.lower() == "filo":
        _import_filo(checkpoint, out, clip_weights, image_size, feature_layers, **filo_options)
        return
    given = [name for name, value in filo_options.items() if value is not None]
    if given:
        raise FBClipError(f"{', '.join(given)}: FiLo options; use them with --method filo")
    from fbclip_edge.checkpoint import import_official

    model = import_official(
        clip_weights, checkpoint, out, image_size or 518, _layers(feature_layers), method=method
    )
    cfg = model.config
    console.print(
        f"wrote {out} ({model.method}, {cfg.backbone.name}, {cfg.image_size} px, "
        f"layers {list(cfg.feature_layers)})"
    )


def _import_filo(
    checkpoint: Path,
    out: Path,
    clip_weights: Path | None,
    image_size: int | None,
    feature_layers: str | None,
    **options: Any,
) -> None:
    """import-official --method filo: FiLo (+ Grounding DINO) -> a FiLo model folder."""
    from fbclip_edge.methods.filo.folder import import_filo_folder

    if options["--descriptions"] is None:
        raise FBClipError(
            "FiLo needs --descriptions FILE (JSON: category -> class_word, descriptions, "
            "grounding_descriptions)"
        )
    meta = import_filo_folder(
        checkpoint,
        out,
        options["--descriptions"],
        grounding_checkpoint=options["--grounding-checkpoint"],
        text_encoder=options["--text-encoder"],
        clip_weights=clip_weights,
        image_size=image_size,
        grounding_config=options["--grounding-config"],
        backbone=options["--backbone"],
        feature_layers=_layers(feature_layers),
    )
    cfg = meta["config"]
    boxes = (
        "with Grounding DINO"
        if meta["grounding"]
        else "no Grounding DINO: no box prior (no position word, no box step)"
    )
    console.print(
        f"wrote {out} (filo, {cfg['backbone']['name']}, {cfg['image_size']} px, "
        f"layers {list(cfg['feature_layers'])}; {boxes})"
    )


@app.command()
@friendly_errors
def flops(
    backbone: Annotated[str, typer.Option(help="open_clip ViT name or 'tiny'.")] = "ViT-L-14-336",
    image_size: Annotated[int, typer.Option(help="Input side in pixels.")] = 518,
    method: Annotated[str, typer.Option(help="fbclip, anomalyclip or all.")] = "all",
) -> None:
    """Print analytic forward-pass GFLOPs per image (backbone and the method's heads)."""
    from rich.table import Table

    from fbclip_edge.clip import backbone_config
    from fbclip_edge.methods import METHODS, get_method

    names = sorted(METHODS) if method == "all" else [get_method(method).name]
    table = Table(title=f"GFLOPs per image, {backbone} @ {image_size} px")
    for column in ("method", "backbone", "heads", "total"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for name in names:
        spec = get_method(name)
        count = spec.flops(spec.new_config(backbone_config(backbone), image_size=image_size))
        table.add_row(
            spec.title, *(f"{n / 1e9:.1f}" for n in (count.backbone, count.heads, count.total))
        )
    console.print(table)


@app.command("make-synthetic")
@friendly_errors
def make_synthetic_command(
    out: Annotated[Path, typer.Argument(help="Folder to create (MVTec AD layout).")],
    categories: Annotated[
        int, typer.Option(help="Number of categories, 1-12 (one per family).")
    ] = 4,
    images: Annotated[int, typer.Option(help="Train images and test images per category.")] = 10,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 224,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same files.")] = 0,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an earlier synthetic dataset at OUT.")
    ] = False,
) -> None:
    """Write a procedural anomaly dataset: textures and objects with exact defect masks."""
    from fbclip_edge.data.synthetic import make_synthetic

    names = make_synthetic(
        out, categories=categories, images=images, size=size, seed=seed, overwrite=overwrite
    )
    console.print(
        f"wrote {len(names)} categories ({', '.join(names)}) x {images} train + {images} test "
        f"images at {size} px to {out}"
    )


@app.command("bench-ab")
@friendly_errors
def bench_ab(
    backends: Annotated[
        str,
        typer.Option(
            help="Comma-separated: torch-eager-fp32, onnxruntime-cpu, openvino-cpu-fp32, "
            "openvino-cpu-bf16 (two or more)."
        ),
    ] = "torch-eager-fp32,onnxruntime-cpu",
    backbone: Annotated[str, typer.Option(help="open_clip ViT name or 'tiny'.")] = "ViT-B-16",
    image_size: Annotated[int, typer.Option(help="Input side in pixels.")] = 224,
    method: Annotated[str, typer.Option(help="fbclip or anomalyclip.")] = "fbclip",
    batch: Annotated[int, typer.Option(help="Images per run.")] = 1,
    rounds: Annotated[int, typer.Option(help="Alternating rounds.")] = 4,
    repeats: Annotated[int, typer.Option(help="Runs per backend per round (best kept).")] = 2,
    out: Annotated[Path, typer.Option(help="Folder for ab.json and ab.md.")] = Path("bench-ab"),
) -> None:
    """Interleaved A/B of backends whose bench rows fell inside the machine's drift."""
    from fbclip_edge.bench.ab import ABConfig, ab_markdown, run_ab, write_ab

    if rounds < 1 or repeats < 1 or batch < 1:
        raise FBClipError("--rounds, --repeats and --batch must be at least 1")
    config = ABConfig(
        tuple(b.strip() for b in backends.split(",") if b.strip()),
        backbone,
        image_size,
        method,
        batch,
        rounds,
        repeats,
    )
    result = run_ab(config, log=lambda text: console.print(text, highlight=False))
    write_ab(result, out)
    console.print(ab_markdown(result), highlight=False)
    console.print(f"wrote {out}/ab.json, {out}/ab.md")


@app.command("bench-kernels")
@friendly_errors
def bench_kernels(
    out: Annotated[Path, typer.Option(help="Folder for kernels.json and kernels.md.")] = Path(
        "bench-out/kernels"
    ),
    device: Annotated[
        str | None, typer.Option(help="cuda, cuda:1 or cpu (default: cuda when present).")
    ] = None,
    batches: Annotated[
        str | None, typer.Option(help="Comma-separated batch sizes (default 1,8,32 on CUDA).")
    ] = None,
    iters: Annotated[
        int | None, typer.Option(help="Timed calls per case; the median is reported.")
    ] = None,
    flush_l2: Annotated[
        bool, typer.Option(help="Evict the L2 cache before each timed call (CUDA).")
    ] = True,
) -> None:
    """Microbenchmark the fused scoring and anomaly-map kernels against the unfused torch code."""
    from fbclip_edge.bench.kernels import markdown, run_kernel_bench, write_kernel_bench

    sizes = None
    if batches:
        try:
            sizes = tuple(int(part) for part in batches.split(","))
        except ValueError:
            raise FBClipError(
                f"--batches '{batches}' must be comma-separated integers, e.g. 1,8,32"
            ) from None
    report = run_kernel_bench(device=device, batches=sizes, iters=iters, flush_l2=flush_l2)
    json_path, md_path = write_kernel_bench(report, out)
    console.print(markdown(report), markup=False, highlight=False)
    console.print(f"wrote {json_path} and {md_path}")


def _names(text: str | None) -> tuple[str, ...] | None:
    """'a,b' -> ('a', 'b'); empty or None -> None."""
    if not text:
        return None
    return tuple(part.strip() for part in text.split(",") if part.strip()) or None


@app.command("train")
@friendly_errors
def train_command(
    data: Annotated[Path, typer.Option(help="Auxiliary dataset root (trained on its test split).")],
    out: Annotated[
        Path, typer.Option(help="Run folder: epoch-NNN/ model folders, last, history.json.")
    ],
    dataset: Annotated[str, typer.Option(help="Layout: auto, mvtec, visa or meta.")] = "auto",
    split: Annotated[str, typer.Option(help="Split to train on (the recipe: test).")] = "test",
    categories: Annotated[
        str | None, typer.Option(help="Comma-separated categories to train on.")
    ] = None,
    exclude: Annotated[
        str | None, typer.Option(help="Comma-separated categories to hold out.")
    ] = None,
    backbone: Annotated[str, typer.Option(help="open_clip ViT name or 'tiny'.")] = "ViT-L-14-336",
    pretrained: Annotated[
        str, typer.Option(help="open_clip pretrained tag; 'none' for random CLIP.")
    ] = "openai",
    clip_weights: Annotated[
        Path | None,
        typer.Option(help="Local OpenAI CLIP .pt or state dict (wins over --backbone)."),
    ] = None,
    image_size: Annotated[
        int | None, typer.Option(help="Input side in pixels (multiple of 14); default: recipe.")
    ] = None,
    feature_layers: Annotated[
        str | None, typer.Option(help="Comma-separated 1-based blocks.")
    ] = None,
    method: Annotated[str, typer.Option(help="fbclip, anomalyclip or filo.")] = "fbclip",
    epochs: Annotated[
        int | None,
        typer.Option(
            help="Total epochs (a resumed run continues up to it; filo: stage 1); default: recipe."
        ),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Images per step; default: recipe.")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate; default: recipe.")] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed for init, shuffling and RNGs; default: recipe.")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="cuda, cuda:1 or cpu (default: cuda if any).")
    ] = None,
    precision: Annotated[
        str, typer.Option(help="auto (bf16/fp16 on GPU, fp32 on CPU), fp32, bf16, fp16.")
    ] = "auto",
    num_workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = 0,
    max_steps: Annotated[
        int | None, typer.Option(help="Cap on steps per epoch (smoke tests).")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Epoch folder to continue from, e.g. OUT/last.")
    ] = None,
    progress: Annotated[
        bool, typer.Option(help="Show the progress bar with the loss terms.")
    ] = True,
    descriptions: Annotated[
        Path | None, typer.Option(help="filo: category descriptions JSON (required).")
    ] = None,
    adapter_epochs: Annotated[
        int | None, typer.Option(help="filo: stage-2 (adapter) epochs; default: recipe (5).")
    ] = None,
    prompt_lr: Annotated[
        float | None, typer.Option(help="filo: stage-1 prompt-learner lr; default: 1e-3.")
    ] = None,
    adapter_lr: Annotated[
        float | None, typer.Option(help="filo: stage-2 adapter lr; default: 1e-5.")
    ] = None,
    init: Annotated[
        Path | None,
        typer.Option(help="filo: start from an official {'filo': ...} checkpoint or a folder."),
    ] = None,
    mosaic: Annotated[
        bool | None,
        typer.Option("--mosaic/--no-mosaic", help="filo: MVTec 2x2 mosaic, p 0.2 (default on)."),
    ] = None,
    share_class_words: Annotated[
        bool | None,
        typer.Option(
            "--share-class-words/--own-descriptions",
            help="filo: categories sharing a class word take the last one's list (reference).",
        ),
    ] = None,
) -> None:
    """Train a method's learned parts on an auxiliary dataset with frozen CLIP (its recipe)."""
    filo_options = {
        "--descriptions": descriptions,
        "--adapter-epochs": adapter_epochs,
        "--prompt-lr": prompt_lr,
        "--adapter-lr": adapter_lr,
        "--init": init,
        "--mosaic/--no-mosaic": mosaic,
        "--share-class-words/--own-descriptions": share_class_words,
    }
    if method.strip().lower() == "filo":
        from fbclip_edge.train_filo import FiLoTrainConfig, train_filo

        if descriptions is None:
            raise FBClipError(
                "--method filo needs --descriptions FILE (JSON: category -> class word and "
                "defect phrases)"
            )
        if precision not in ("auto", "fp32"):
            raise FBClipError(
                f"--method filo trains in fp32 (as the reference); drop --precision {precision}"
            )
        settings: dict[str, Any] = {
            "epochs": epochs,
            "adapter_epochs": adapter_epochs,
            "batch_size": batch_size,
            "lr": lr,
            "prompt_lr": prompt_lr,
            "adapter_lr": adapter_lr,
            "seed": seed,
            "image_size": image_size,
            "mosaic": mosaic,
            "share_class_words": share_class_words,
        }
        filo_config = FiLoTrainConfig(
            data=data,
            out=out,
            descriptions=descriptions,
            dataset=dataset,  # type: ignore[arg-type]
            split=split,
            categories=_names(categories),
            exclude=_names(exclude) or (),
            init=init,
            backbone=backbone,
            pretrained=pretrained,
            clip_weights=clip_weights,
            feature_layers=_layers(feature_layers),
            device=device,
            num_workers=num_workers,
            max_steps=max_steps,
            resume=resume,
            progress=progress,
            **{k: v for k, v in settings.items() if v is not None},
        )
        filo_result = train_filo(filo_config)
        for entry in filo_result.history:
            terms = ", ".join(f"{k} {v:.4f}" for k, v in entry.losses.items())
            console.print(
                f"stage {entry.stage} epoch {entry.epoch}: {entry.steps} steps, "
                f"{entry.images} images, {terms}"
            )
        console.print(
            f"wrote {len(filo_result.checkpoints)} checkpoint(s) to {out}; latest: "
            f"{filo_result.last}"
        )
        return
    given = [name for name, value in filo_options.items() if value is not None]
    if given:
        raise FBClipError(
            f"{', '.join(given)}: FiLo-only option(s); use --method filo or drop them"
        )
    from fbclip_edge.train import TrainConfig, train

    config = TrainConfig.for_method(
        method,
        data=data,
        out=out,
        dataset=dataset,
        split=split,
        categories=_names(categories),
        exclude=_names(exclude) or (),
        backbone=backbone,
        pretrained=pretrained,
        clip_weights=clip_weights,
        image_size=image_size,
        feature_layers=_layers(feature_layers),
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
        precision=precision,
        num_workers=num_workers,
        max_steps=max_steps,
        resume=resume,
        progress=progress,
    )
    result = train(config)
    for log in result.history:
        terms = ", ".join(f"{k} {v:.4f}" for k, v in log.losses.items())
        console.print(f"epoch {log.epoch}: {log.steps} steps, {log.images} images, {terms}")
    console.print(f"wrote {len(result.checkpoints)} checkpoint(s) to {out}; latest: {result.last}")


@app.command("eval")
@friendly_errors
def eval_command(
    data: Annotated[Path, typer.Option(help="Dataset root to evaluate on (its test split).")],
    model: Annotated[
        Path | None,
        typer.Option(
            help="Model folder (runs with --backend torch); a FiLo folder runs its torch "
            "pipeline with its Grounding DINO, each image with its dataset category."
        ),
    ] = None,
    artifacts: Annotated[
        Path | None,
        typer.Option(
            help="Export folder (for --backend onnxruntime|tensorrt|openvino|auto; FiLo "
            "artifacts: torch|onnxruntime|auto)."
        ),
    ] = None,
    backend: Annotated[
        str, typer.Option(help="torch, onnxruntime, tensorrt, openvino or auto.")
    ] = "torch",
    dataset: Annotated[str, typer.Option(help="Layout: auto, mvtec, visa or meta.")] = "auto",
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "test",
    categories: Annotated[
        str | None, typer.Option(help="Comma-separated categories (default: all).")
    ] = None,
    exclude: Annotated[str | None, typer.Option(help="Comma-separated categories to skip.")] = None,
    device: Annotated[str | None, typer.Option(help="Torch device (default: cuda if any).")] = None,
    precision: Annotated[
        str | None,
        typer.Option(
            help="fp32 or fp16; for artifacts also bf16 or int8 (default: fp32 for torch, the "
            "runtime's for artifacts)."
        ),
    ] = None,
    provider: Annotated[str | None, typer.Option(help="onnxruntime execution provider.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per backend call.")] = 8,
    sigma: Annotated[
        float,
        typer.Option(
            help="Gaussian sigma of the anomaly map (spec: 4); not for FiLo, whose maps come "
            "blurred."
        ),
    ] = 4.0,
    out: Annotated[
        Path | None, typer.Option(help="JSON report to write; the Markdown goes beside it (.md).")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Zero-shot metrics per category and mean: image/pixel AUROC, AP, max-F1 and AU-PRO.

    FiLo takes each image's category from the dataset; every category must be in its
    descriptions file (checked before scoring)."""
    from fbclip_edge.eval import EvalConfig, report_table, run_eval, write_report

    config = EvalConfig(
        data=data,
        model=model,
        artifacts=artifacts,
        backend=backend,
        dataset=dataset,  # type: ignore[arg-type]
        split=split,
        categories=_names(categories),
        exclude=_names(exclude) or (),
        device=device,
        precision=precision,
        provider=provider,
        batch_size=batch_size,
        sigma=sigma,
        progress=progress,
    )
    report = run_eval(config)
    console.print(report_table(report))
    for note in report.notes:
        console.print(f"note: {note}", highlight=False)
    if out is not None:
        json_path, md_path = write_report(report, out)
        console.print(f"wrote {json_path} and {md_path}")


@app.command()
@friendly_errors
def export(
    model: Annotated[Path, typer.Option(help="Model folder (config.json + model.safetensors).")],
    out: Annotated[Path, typer.Option(help="Artifacts folder to write (replaced atomically).")],
    image_size: Annotated[
        int | None, typer.Option(help="Input side in pixels; default: the model's.")
    ] = None,
    batch: Annotated[str, typer.Option(help="Batch profile MIN:OPT:MAX.")] = "1:8:32",
    precision: Annotated[
        str,
        typer.Option(
            help="fp16 (GPU; LayerNorm, Softmax, reductions in FP32), fp32, or for the CPU: "
            "bf16 (OpenVINO) or int8 (static QDQ; onnxruntime and OpenVINO)."
        ),
    ] = "fp16",
    targets: Annotated[
        str, typer.Option(help="Comma-separated: auto (onnx, + trt with a GPU), onnx, trt, triton.")
    ] = "auto",
    scoring: Annotated[
        str, typer.Option(help="kernel: vision graph + fused kernels; graph: all in the graph.")
    ] = "kernel",
    parity_images: Annotated[
        Path | None,
        typer.Option(
            help="Images for the parity check (subfolders: good = normal); default: synthetic."
        ),
    ] = None,
    calibration_frames: Annotated[
        Path | None,
        typer.Option(
            help="Good images to calibrate --precision int8 on (a folder; with subfolders, "
            "good/ is used); default: the parity images labelled good."
        ),
    ] = None,
    workspace_gb: Annotated[float, typer.Option(help="TensorRT memory-pool limit, GiB.")] = 8.0,
    opt_level: Annotated[int, typer.Option(help="TensorRT builder optimization level 0-5.")] = 3,
    timing_cache: Annotated[
        Path | None, typer.Option(help="Timing cache to start from; default: OUT/timing.cache.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="CUDA device, e.g. cuda:1.")] = None,
    frame_size: Annotated[
        str | None,
        typer.Option(
            help="FiLo: camera frame WxH, which sizes Grounding DINO's input; default: S x S."
        ),
    ] = None,
) -> None:
    """Export ONNX graphs and TensorRT engines with a manifest and a parity report."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from fbclip_edge.export import ParityError, export_artifacts, parity_table, read_parity_images
    from fbclip_edge.methods.filo.folder import is_filo_folder

    if is_filo_folder(model):
        not_filo = {
            "--image-size": image_size is not None,
            f"--targets {targets}": targets.strip().lower() not in ("auto", "onnx"),
            f"--scoring {scoring}": scoring != "kernel",
            "--calibration-frames": calibration_frames is not None,
            "--workspace-gb/--opt-level/--timing-cache (TensorRT)": (workspace_gb, opt_level)
            != (8.0, 3)
            or timing_cache is not None,
            "--device": device is not None,
        }
        _export_filo(model, out, batch, precision, frame_size, parity_images, not_filo)
        return
    if frame_size is not None:
        raise FBClipError("--frame-size is for FiLo model folders only; drop it")

    frames, labels = read_parity_images(parity_images) if parity_images else (None, None)
    calibration = None
    if calibration_frames is not None:
        found, kinds = read_parity_images(calibration_frames)
        calibration = [f for f, k in zip(found, kinds or [0] * len(found), strict=True) if k == 0]
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("export", total=None)

        def step(text: str, done: int, total: int) -> None:
            bar.update(task, description=text, completed=done, total=total)

        try:
            result = export_artifacts(
                model,
                out,
                image_size=image_size,
                batch=batch,
                precision=precision,
                targets=targets,
                scoring=scoring,
                parity_frames=frames,
                parity_labels=labels,
                calibration_frames=calibration,
                workspace_gb=workspace_gb,
                optimization_level=opt_level,
                timing_cache=timing_cache,
                device=device,
                progress=step,
            )
        except ParityError as error:
            console.print(parity_table(error.report))
            raise
    if result.parity is not None:
        console.print(parity_table(result.parity))
    manifest = result.manifest
    engine = manifest.engine()
    built = ""
    if engine:
        built = f", engine {engine.file} (TensorRT {engine.tensorrt_version}, "
        built += f"sm {engine.compute_capability})"
    console.print(
        f"wrote {out}: {len(manifest.files)} files, {manifest.precision.value}, "
        f"scoring={manifest.scoring.value}, batch {manifest.batch}{built}"
    )


def _export_filo(
    model: Path,
    out: Path,
    batch: str,
    precision: str,
    frame_size: str | None,
    parity_images: Path | None,
    not_filo: dict[str, bool],
) -> None:
    """`export` on a FiLo model folder: its split ONNX export (export.filo)."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from fbclip_edge.export import ParityError, parity_table, read_parity_images
    from fbclip_edge.export.filo import export_filo
    from fbclip_edge.methods.filo.folder import load_filo

    given = [name for name, present in not_filo.items() if present]
    if given:
        raise FBClipError(
            f"{', '.join(given)}: not for FiLo model folders; FiLo exports ONNX graphs for "
            "onnxruntime with --precision fp32|fp16, --batch, --frame-size WxH, --parity-images"
        )
    height_width = _frame_size(frame_size) if frame_size is not None else None
    size = (height_width[1], height_width[0]) if height_width is not None else None
    frames = read_parity_images(parity_images)[0] if parity_images else None
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("load FiLo model folder", total=None)

        def step(text: str, done: int, total: int) -> None:
            bar.update(task, description=text, completed=done, total=total)

        try:
            result = export_filo(
                load_filo(model), out, precision, batch, size, step, parity_frames=frames
            )
        except ParityError as error:
            console.print(parity_table(error.report))
            raise
    if result.parity is not None:
        console.print(parity_table(result.parity))
    manifest = result.manifest
    graphs = ", ".join(spec.file for spec in manifest.graphs)
    console.print(
        f"wrote {out}: {len(manifest.files)} files, FiLo {manifest.precision.value}, "
        f"batch {manifest.batch}; graphs {graphs}"
    )


@app.command()
@friendly_errors
def calibrate(
    artifacts: Annotated[Path, typer.Option(help="Artifacts folder from `fbclip-edge export`.")],
    good: Annotated[Path, typer.Option(help="Folder of known-good images (searched recursively).")],
    target_fpr: Annotated[
        float, typer.Option(help="Wanted false-alarm rate on good frames.")
    ] = 0.01,
    backend: Annotated[
        str, typer.Option(help="auto, torch, onnxruntime, tensorrt or openvino.")
    ] = "auto",
    device: Annotated[str | None, typer.Option(help="Device, e.g. cuda:0.")] = None,
    category: Annotated[
        str | None,
        typer.Option(help="FiLo: the good images' category; its thresholds are kept apart."),
    ] = None,
) -> None:
    """Set image and pixel thresholds from known-good images; store them in the manifest."""
    from fbclip_edge.line.calibrate import calibrate_folder, write_calibration
    from fbclip_edge.line.detector import Detector

    detector = Detector.open(artifacts, backend=backend, device=device, category=category)
    run = calibrate_folder(detector, good, target_fpr)
    for name, reason in run.failed.items():
        console.print(f"[yellow]skipped[/] {escape(name)}: {escape(reason)}", highlight=False)
    c = run.calibration
    write_calibration(artifacts, c, category=detector.category)
    if detector.category is not None:
        console.print(f"category {detector.category}:")
    console.print(
        f"image threshold {c.image_threshold:.6f} (the {c.rank}-th of {c.n_images} good scores), "
        f"pixel threshold {c.pixel_threshold:.6f}; expected false-alarm rate on new good frames "
        f"{100 * c.expected_fpr:.2f}% (target {100 * c.target_fpr:.2f}%, "
        f"{100 * c.calibration_fpr:.2f}% on these frames); stored in {artifacts}/manifest.json"
    )
    if c.expected_fpr > c.target_fpr:
        needed = int(np.ceil(1 / c.target_fpr)) - 1
        console.print(
            f"[yellow]warning:[/] {c.n_images} good frames cannot reach the target; "
            f"use at least {needed}"
        )


@app.command()
@friendly_errors
def predict(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders or glob patterns.")],
    artifacts: Annotated[Path, typer.Option(help="Artifacts folder from `fbclip-edge export`.")],
    out: Annotated[Path, typer.Option(help="Folder for overlays/, results.csv and results.json.")],
    backend: Annotated[
        str, typer.Option(help="auto, torch, onnxruntime, tensorrt or openvino.")
    ] = "auto",
    device: Annotated[str | None, typer.Option(help="Device, e.g. cuda:0.")] = None,
    batch: Annotated[int, typer.Option(help="Images per backend call.")] = 8,
    category: Annotated[
        str | None, typer.Option(help="FiLo: the images' category (from the descriptions).")
    ] = None,
) -> None:
    """Score images; write heat-map overlays and a results table (unreadable files are listed)."""
    from fbclip_edge.line.detector import Detector
    from fbclip_edge.line.predict import predict_files

    detector = Detector.open(artifacts, backend=backend, device=device, category=category)
    result = predict_files(detector, inputs, out, batch_size=batch)
    for name, reason in result.failed.items():
        console.print(f"[yellow]unreadable[/] {escape(name)}: {escape(reason)}", highlight=False)
    flagged = sum(row.decision == "anomalous" for row in result.rows)
    calibrated = "calibrated" if detector.thresholds.calibrated else "uncalibrated: threshold 0.5"
    console.print(
        f"scored {len(result.rows)} images ({flagged} anomalous, {calibrated}), "
        f"{len(result.failed)} unreadable, with {detector.backend.info.name}; "
        f"overlays in {out}/overlays, table in {out}/results.csv"
    )


@app.command()
@friendly_errors
def bench(
    model: Annotated[
        Path | None, typer.Option(help="Model folder (default: a random-weight --backbone model).")
    ] = None,
    artifacts: Annotated[
        Path | None,
        typer.Option(
            help="Exported artifacts for onnxruntime / TensorRT (default: export for this run)."
        ),
    ] = None,
    backbone: Annotated[str, typer.Option(help="Backbone of the random-weight model.")] = "tiny",
    method: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated methods timed side by side (fbclip, anomalyclip, filo), or "
            "all (default: the folder's, else fbclip)."
        ),
    ] = None,
    backends: Annotated[
        str | None,
        typer.Option(help="Comma-separated backends (default: every one available here)."),
    ] = None,
    batch: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8",
    image_size: Annotated[
        int | None, typer.Option(help="Network input side (default: the model's, else 224).")
    ] = None,
    warmup: Annotated[int, typer.Option(help="Untimed iterations per backend and batch.")] = 2,
    iters: Annotated[int, typer.Option(help="Most timed iterations per backend and batch.")] = 10,
    repeats: Annotated[int, typer.Option(help="Groups of timed iterations (min/median/max).")] = 5,
    max_seconds: Annotated[
        float,
        typer.Option(
            help="Stop timing a backend and batch after this long (>= 3 iters); 0: no cap."
        ),
    ] = 8.0,
    preprocess: Annotated[
        str,
        typer.Option(help="Preprocess on cpu (PIL), gpu (torch) or auto (gpu for CUDA backends)."),
    ] = "auto",
    recheck_baseline: Annotated[
        bool,
        typer.Option(help="Time eager fp32 again at the end to measure the machine's drift."),
    ] = True,
    isolate: Annotated[
        bool,
        typer.Option(
            help="Time each exported backend (onnxruntime, OpenVINO, TensorRT; all its batches) "
            "in a child process of its own that loads only its runtime and the artifacts, so "
            "its RSS peak is its own ('own process'), not the bench's with the eager model in it."
        ),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(help="Output folder (default: benchmarks/results/<device>-<date>/...)."),
    ] = None,
) -> None:
    """Time every method's backends end to end and per stage against its eager fp32; write
    JSON, MD, plot."""
    from fbclip_edge.bench.harness import (
        DEFAULT_METHODS,
        BenchConfig,
        folder_methods,
        parse_backends,
        parse_batches,
        parse_methods,
        run_bench,
    )
    from fbclip_edge.bench.report import default_out_dir, terminal_report, write_results

    found = folder_methods(model, artifacts)  # a folder's method is the default
    methods = parse_methods(method) or ((found[0][0],) if found else DEFAULT_METHODS)
    config = BenchConfig(
        model=model,
        artifacts=artifacts,
        methods=methods,
        backbone=backbone,
        image_size=image_size,
        backends=parse_backends(backends),
        batches=parse_batches(batch),
        warmup=warmup,
        iters=iters,
        repeats=repeats,
        max_seconds=max_seconds or None,
        preprocess=preprocess,
        recheck_baseline=recheck_baseline,
        isolate=isolate,
    )
    with console.status("benchmarking") as status:
        results = run_bench(config, log=lambda message: status.update(message))
    console.print(terminal_report(results, console.width))
    files = write_results(results, out or default_out_dir(results))
    console.print(f"wrote {files.json}, {files.markdown}, {files.plot}")


def _sizes(text: str, option: str) -> tuple[int, ...]:
    """'1,4,16' -> (1, 4, 16), or a one-line error naming the option."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise FBClipError(
            f"{option} '{text}' must be comma-separated integers, e.g. 1,4,16"
        ) from None
    if not values or min(values) < 1:
        raise FBClipError(f"{option} '{text}' must hold integers >= 1")
    return values


def _frame_size(text: str) -> tuple[int, int]:
    """'640x480' (width x height, as cameras name it) -> (height, width)."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise FBClipError(f"--frame-size '{text}' must be WIDTHxHEIGHT, e.g. 640x480") from None
    return height, width


def _batching_modes(text: str) -> tuple[bool, ...]:
    modes = {"on": True, "off": False}
    try:
        return tuple(modes[part.strip()] for part in text.split(","))
    except KeyError:
        raise FBClipError(f"--batching '{text}' must be on, off or on,off") from None


@app.command("serve")
@friendly_errors
def serve_command(
    artifacts: Annotated[Path, typer.Argument(help="Artifacts folder from `fbclip-edge export`.")],
    host: Annotated[
        str, typer.Option(help="Address to listen on; 0.0.0.0 to serve the plant's network.")
    ] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(help="KServe v2 HTTP port.")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="KServe v2 gRPC port.")] = 8001,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port (/metrics).")] = 8002,
    max_batch: Annotated[
        int | None, typer.Option(help="Largest batch Triton forms (default: the export's max).")
    ] = None,
    max_queue_delay_us: Annotated[
        int, typer.Option(help="How long a request may wait for others to batch with, in us.")
    ] = 2000,
    dynamic_batching: Annotated[
        bool, typer.Option(help="Merge concurrent requests into one network call.")
    ] = True,
    instances: Annotated[
        int, typer.Option(help="Model instances, each with its own backend (parallel calls).")
    ] = 1,
    backend: Annotated[
        str, typer.Option(help="auto, torch, onnxruntime, tensorrt or openvino.")
    ] = "auto",
    model_name: Annotated[
        str, typer.Option(help="Model name clients ask for (+ NAME_pixels for pixels).")
    ] = "fbclip",
    max_frame_side: Annotated[
        int, typer.Option(help="Frames with a longer side are refused, in pixels.")
    ] = 4096,
    exit_timeout_s: Annotated[
        int,
        typer.Option(help="On SIGTERM, how long requests and open HTTP connections may take."),
    ] = 20,
) -> None:
    """Serve an export on a Triton Inference Server: KServe v2 over HTTP and gRPC, dynamic
    batching, health, Prometheus metrics; SIGTERM stops after the requests in flight."""
    from fbclip_edge.serve.server import ServeConfig, Server

    config = ServeConfig(
        artifacts=artifacts,
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        max_batch=max_batch,
        max_queue_delay_us=max_queue_delay_us,
        dynamic_batching=dynamic_batching,
        instances=instances,
        backend=backend,
        model_name=model_name,
        max_frame_side=max_frame_side,
        exit_timeout_s=exit_timeout_s,
    )

    def ready(server: Server) -> None:
        urls = server.urls
        batching = (
            f"dynamic batching up to {server.max_batch} frames, {max_queue_delay_us} us"
            if dynamic_batching
            else f"no dynamic batching, requests of up to {server.max_batch} frames"
        )
        console.print(
            f"serving {model_name} (uint8 frames) and {model_name}_pixels: "
            f"{server.backend_info}, {batching}, {instances} instance(s)\n"
            f"  {urls.http}  {urls.grpc}  metrics {urls.metrics}\n"
            "  SIGTERM or Ctrl-C stops after the requests in flight",
            highlight=False,
        )

    Server(config).serve_forever(on_ready=ready)
    console.print("stopped after answering the requests in flight", highlight=False)


@app.command("loadtest")
@friendly_errors
def loadtest_command(
    artifacts: Annotated[
        Path | None,
        typer.Argument(help="Artifacts to serve on loopback (a server per batching mode)."),
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(help="Load a server already running on this machine instead."),
    ] = None,
    clients: Annotated[str, typer.Option(help="Comma-separated client counts.")] = "1,4,16",
    frames: Annotated[int, typer.Option(help="Frames each client sends.")] = 16,
    frame_size: Annotated[str, typer.Option(help="Camera frame WIDTHxHEIGHT.")] = "640x480",
    maps: Annotated[
        str, typer.Option(help="Outputs asked for, comma-separated: full, patch, mask, score.")
    ] = "full",
    protocol: Annotated[str, typer.Option(help="http or grpc.")] = "http",
    batching: Annotated[
        str, typer.Option(help="Dynamic batching modes to run: on, off or on,off.")
    ] = "on,off",
    max_batch: Annotated[int, typer.Option(help="Server's largest batch.")] = 8,
    max_queue_delay_us: Annotated[int, typer.Option(help="Server's queue delay, us.")] = 2000,
    backend: Annotated[
        str, typer.Option(help="Server backend (as `fbclip-edge serve --backend`).")
    ] = "auto",
    max_seconds: Annotated[
        float, typer.Option(help="Per run: no client sends after this many seconds.")
    ] = 120.0,
    model_name: Annotated[str, typer.Option(help="Model name (with --url).")] = "fbclip",
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for results.json and results.md (default: benchmarks/...)."),
    ] = None,
) -> None:
    """Bounded load test on loopback: N clients x M frames, throughput, p50/p99 latency,
    errors and the batch sizes Triton formed, with dynamic batching on and off."""
    import sys

    from fbclip_edge.serve.loadtest import (
        SuiteConfig,
        default_out_dir,
        model_label,
        report_markdown,
        run_existing,
        run_suite,
        write_report,
    )

    if (artifacts is None) == (url is None):
        raise FBClipError("give either ARTIFACTS (servers are started here) or --url, not both")
    if protocol not in ("http", "grpc"):
        raise FBClipError(f"--protocol must be http or grpc, not {protocol!r}")
    counts, size = _sizes(clients, "--clients"), _frame_size(frame_size)
    command = "fbclip-edge " + " ".join(sys.argv[1:])
    if artifacts is not None:
        suite = SuiteConfig(
            artifacts=artifacts,
            clients=counts,
            frames=frames,
            frame_size=size,
            maps=tuple(maps.split(",")),
            protocol=protocol,
            batching=_batching_modes(batching),
            max_batch=max_batch,
            max_queue_delay_us=max_queue_delay_us,
            backend=backend,
            max_seconds=max_seconds,
        )
        with console.status("load test") as status:
            report = run_suite(suite, command, log=lambda message: status.update(message))
        label = model_label(artifacts)
    else:
        with console.status("load test"):
            report = run_existing(
                url or "",
                clients=counts,
                frames=frames,
                frame_size=size,
                maps=tuple(maps.split(",")),
                model=model_name,
                max_seconds=max_seconds,
                command=command,
            )
        label = model_name
    console.print(report_markdown(report), highlight=False, soft_wrap=True)
    json_path, md_path = write_report(report, out or default_out_dir(report, label))
    console.print(f"wrote {json_path} and {md_path}")
