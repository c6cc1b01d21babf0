"""The bench issue's targets (ViT-L-14-336 @ 518 on an H100), checked against one run.

Each check reports the best row of the run for it, so a recorded results.md says at a glance
how far the fastest backend is from each target; verdicts apply only in the issue's setting.
The targets are FB-CLIP's: in a multi-method run only the fbclip rows are checked.
"""

from __future__ import annotations

from dataclasses import dataclass

from fbclip_edge.bench.schema import BenchResults, Measurement

TARGET_METHOD = "fbclip"
TARGET_MODEL = ("ViT-L-14-336", 518)
TARGET_GPU = "H100"
CEILING_SHARE = 60.0  # percent of the measured matmul ceiling, pipeline throughput, batch 32
CEILING_BATCH = 32
LATENCY_MS = 5.0  # pipeline p50 at batch 1
SPEEDUP = 30.0  # pipeline throughput over torch-eager-fp32, same batch, same run


@dataclass(frozen=True)
class TargetCheck:
    """One target: the goal, the best value this run reached and where, and the verdict."""

    name: str
    goal: str
    value: float | None  # None: nothing in the run measures it
    where: str  # "backend, batch N" of the best row, or why nothing was measured
    met: bool | None  # None: not measured, or the run is not the setting


def _target_rows(results: BenchResults) -> list[Measurement]:
    """The rows the targets judge: FB-CLIP's, whatever else the run timed."""
    return [row for row in results.measurements if row.method == TARGET_METHOD]


def setting_applies(results: BenchResults) -> tuple[bool, str]:
    """Whether the verdicts apply to this run, and the reason when they do not."""
    info = results.model_info(TARGET_METHOD)
    if info is None:
        return False, f"the targets are for {TARGET_METHOD}, which this run did not time"
    model = (info.backbone, info.image_size)
    gpu = results.device.gpu
    if model != TARGET_MODEL:
        return False, f"the targets are for {TARGET_MODEL[0]} @ {TARGET_MODEL[1]}"
    if gpu is None or TARGET_GPU not in gpu.name:
        return False, f"the targets are for an {TARGET_GPU}"
    return True, ""


def _pipeline_ceiling_percent(row: Measurement, flops_per_image: int) -> float | None:
    """End-to-end (uint8 frame to map) TFLOP/s as a percentage of the row's matmul ceiling."""
    if not row.ceiling_tflops:
        return None
    return 100.0 * flops_per_image * row.pipeline.throughput / 1e12 / row.ceiling_tflops


def _best(
    name: str, goal: str, rows: list[tuple[float, Measurement]], highest: bool, missing: str
) -> tuple[str, str, float | None, str]:
    if not rows:
        return name, goal, None, missing
    value, row = (max if highest else min)(rows, key=lambda pair: pair[0])
    return name, goal, value, f"{row.backend}, batch {row.batch}"


def check_targets(results: BenchResults) -> list[TargetCheck]:
    """The three targets of the bench issue, each with the run's best FB-CLIP row."""
    info = results.model_info(TARGET_METHOD)
    flops = info.flops_total if info is not None else 0
    rows = _target_rows(results)
    at_ceiling_batch = [
        (share, row)
        for row in rows
        if row.batch == CEILING_BATCH
        and (share := _pipeline_ceiling_percent(row, flops)) is not None
    ]
    batch_1 = [(row.pipeline.p50_ms, row) for row in rows if row.batch == 1]
    speedups = [(row.speedup, row) for row in rows if row.speedup is not None]
    found = [
        _best(
            f"end-to-end throughput at batch {CEILING_BATCH}, share of the matmul ceiling",
            f">= {CEILING_SHARE:g}%",
            at_ceiling_batch,
            True,
            f"no batch-{CEILING_BATCH} row with a measured ceiling",
        ),
        _best(
            "batch-1 latency (pipeline p50)",
            f"<= {LATENCY_MS:g} ms",
            batch_1,
            False,
            "no batch-1 row",
        ),  # fmt: skip
        _best(
            "throughput over torch-eager-fp32",
            f">= {SPEEDUP:g}x",
            speedups,
            True,
            "no row with a same-batch baseline",
        ),  # fmt: skip
    ]
    applies, _ = setting_applies(results)
    passes = (
        lambda v: v >= CEILING_SHARE,
        lambda v: v <= LATENCY_MS,
        lambda v: v >= SPEEDUP,
    )
    checks = []
    for (name, goal, value, where), passed in zip(found, passes, strict=True):
        met = passed(value) if applies and value is not None else None
        checks.append(TargetCheck(name, goal, value, where, met))
    return checks


def _shown(check: TargetCheck) -> str:
    if check.value is None:
        return "-"
    if check.goal.endswith("%"):
        return f"{check.value:.1f}%"
    return f"{check.value:.2f} ms" if check.goal.endswith("ms") else f"{check.value:.2f}x"


def markdown_lines(results: BenchResults) -> list[str]:
    """The targets section of results.md."""
    applies, why = setting_applies(results)
    verdict = {True: "met", False: "not met", None: "-" if applies else "not applicable"}
    lines = [
        f"## Targets ({TARGET_MODEL[0]} @ {TARGET_MODEL[1]} on an {TARGET_GPU})",
        "",
    ]
    if len(results.methods) > 1:
        lines += [f"The targets are FB-CLIP's: only the {TARGET_METHOD} rows are checked.", ""]
    if not applies:
        lines += [f"Verdicts do not apply to this run: {why}; the best values are shown.", ""]
    lines += [
        "| target | goal | best in this run | where | verdict |",
        "|---|---|---|---|---|",
    ]
    for check in check_targets(results):
        lines.append(
            f"| {check.name} | {check.goal} | {_shown(check)} | {check.where} | "
            f"{verdict[check.met]} |"
        )
    return [*lines, ""]
