"""Compile the Triton kernels for a CUDA architecture without a GPU, and read their resources.

Triton's interpreter (what CPU tests run) accepts code that the compiler rejects, and says
nothing about registers or spills. Triton lowers to PTX and calls its bundled ptxas on any
machine, so this builds each kernel exactly as a launch on that architecture would (same block
sizes, warps and dtypes) and reports registers, spills and shared memory from `ptxas -v`.

    python -m fbclip_edge.kernels.aot --arch 90 --arch 80
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fbclip_edge.errors import FBClipError

DEFAULT_ARCHS: tuple[int, ...] = (80, 89, 90)  # A100, L4 / L40S, H100 / H200
_PTX_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class ScoreCase:
    """One score_maps launch geometry: M maps, T tokens (CLS first), D dims, maps dtype."""

    name: str
    maps: int
    tokens: int
    dim: int
    dtype: torch.dtype = torch.float16
    rule: str = "logit_sum"


@dataclass(frozen=True)
class MapCase:
    """One anomaly_map launch geometry: the patch grid's side."""

    name: str
    grid: int


SCORE_CASES: tuple[ScoreCase, ...] = (
    ScoreCase("ViT-L-14-336 @ 518", 15, 1370, 768, torch.float16),
    ScoreCase("ViT-L-14-336 @ 518", 15, 1370, 768, torch.float32),
    ScoreCase("ViT-B-16 @ 224", 15, 197, 512, torch.float16),
    ScoreCase("AnomalyCLIP ViT-L-14-336 @ 518", 4, 1370, 768, torch.float16, "prob_sum"),
    ScoreCase("odd (tests)", 1, 37, 40, torch.float32),
)
MAP_CASES: tuple[MapCase, ...] = (
    MapCase("ViT-L-14-336 @ 518", 37),
    MapCase("ViT-L-14-336 @ 336", 24),
    MapCase("ViT-B-16 @ 224", 14),
    MapCase("128-wide grid", 128),
)


@dataclass(frozen=True)
class KernelBuild:
    """Resources of one compiled kernel, as ptxas reports them."""

    kernel: str
    case: str
    arch: str
    config: str
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_bytes: int
    shared_bytes: int

    @property
    def spills(self) -> bool:
        """Whether registers spilled to local memory (slow: every spill is a memory round trip)."""
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0


def _triton() -> tuple[Any, Any, Any]:
    """(triton, GPUTarget, ASTSource), or a one-line error naming the fix."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        raise FBClipError(f"building kernels needs triton ({exc}); pip install triton") from exc
    return triton, GPUTarget, ASTSource


def gpu_arch_name(capability: int) -> str:
    """ptxas's name for a compute capability, as Triton picks it (arch-specific 'a' from sm_90)."""
    return f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"


def _ptxas(capability: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return str(get_ptxas(capability).path)


_USED = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")


def ptxas_resources(ptx: str, capability: int) -> tuple[int, int, int, int]:
    """(registers, stack, spill stores, spill loads) in bytes of the PTX's kernel, by `ptxas -v`."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [_ptxas(capability), "-v", f"--gpu-name={gpu_arch_name(capability)}", str(src)]
        done = subprocess.run(  # noqa: S603 (our ptxas, our PTX)
            [*cmd, "-o", str(Path(tmp) / "kernel.o")], capture_output=True, text=True, check=False
        )
    log = done.stdout + done.stderr
    used, spill = _USED.search(log), _SPILL.search(log)
    if done.returncode != 0 or used is None or spill is None:
        first = log.strip().splitlines()[:1] or ["no output"]
        raise FBClipError(f"ptxas failed for {gpu_arch_name(capability)}: {first[0]}")
    stack, stores, loads = (int(g) for g in spill.groups())
    return int(used.group(1)), stack, stores, loads


def _build(
    kernel: object,
    signature: dict[str, str],
    constexprs: dict[str, int],
    num_warps: int,
    capability: int,
) -> tuple[str, int]:
    """Compile to PTX + cubin for one architecture; (ptx, shared memory bytes)."""
    triton, gpu_target, ast_source = _triton()
    if type(kernel).__name__ == "InterpretedFunction":
        raise FBClipError(
            "the kernels were defined under TRITON_INTERPRET=1; build them in a Python "
            "started without it"
        )
    src = ast_source(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(
        src,
        target=gpu_target("cuda", capability, 32),
        options={"num_warps": num_warps, "enable_fp_fusion": True},
    )
    return compiled.asm["ptx"], int(compiled.metadata.shared)


def build_score(case: ScoreCase, capability: int) -> KernelBuild:
    """Compile score_maps' kernel for case's geometry with the block sizes a launch would use."""
    from fbclip_edge.kernels import triton_score

    block_m, block_t, block_d, warps = triton_score.block_sizes(case.maps, case.tokens, case.dim)
    pointers = ("maps_ptr", "text_ptr", "w_ptr", "score_ptr", "patch_ptr")
    signature = {name: "*fp32" for name in pointers}
    signature["maps_ptr"] = signature["text_ptr"] = f"*{_PTX_TYPES[case.dtype]}"
    signature |= {"M": "i32", "T": "i32", "inv_temp": "fp32"}
    signature |= {s: "i32" for s in ("stride_b", "stride_m", "stride_t", "stride_text")}
    consts = {"D": case.dim, "BLOCK_M": block_m, "BLOCK_T": block_t, "BLOCK_D": block_d}
    consts["PROB_SUM"] = int(case.rule == "prob_sum")
    signature |= {name: "constexpr" for name in consts}
    ptx, shared = _build(triton_score._score_maps_kernel, signature, consts, warps, capability)
    regs, stack, stores, loads = ptxas_resources(ptx, capability)
    config = f"{case.rule} M={case.maps} T={case.tokens} D={case.dim} {_PTX_TYPES[case.dtype]} " + (
        f"BLOCK_M={block_m} BLOCK_T={block_t} BLOCK_D={block_d} warps={warps}"
    )
    return KernelBuild(
        "score_maps", case.name, gpu_arch_name(capability), config, regs, stores, loads, stack,
        shared,
    )  # fmt: skip


def build_map(case: MapCase, capability: int) -> KernelBuild:
    """Compile anomaly_map's kernel for case's grid with the block sizes a launch would use."""
    from fbclip_edge.kernels import triton_map

    block_h, block_w, ghp, gwp, kw, warps = triton_map.block_sizes(case.grid, case.grid)
    signature = {"grid_ptr": "*fp32", "ah_ptr": "*fp32", "aw_ptr": "*fp32", "out_ptr": "*fp32"}
    signature |= {s: "i32" for s in ("H", "W", "GH", "GW", "stride_b", "stride_h", "stride_w")}
    consts = {"BLOCK_H": block_h, "BLOCK_W": block_w, "GHP": ghp, "GWP": gwp, "KW": kw}
    signature |= {name: "constexpr" for name in consts}
    ptx, shared = _build(triton_map._anomaly_map_kernel, signature, consts, warps, capability)
    regs, stack, stores, loads = ptxas_resources(ptx, capability)
    config = f"grid {case.grid}x{case.grid} " + " ".join(f"{k}={v}" for k, v in consts.items())
    return KernelBuild(
        "anomaly_map", case.name, gpu_arch_name(capability), f"{config} warps={warps}", regs,
        stores, loads, stack, shared,
    )  # fmt: skip


def build_all(
    archs: Sequence[int] = DEFAULT_ARCHS,
    score_cases: Sequence[ScoreCase] = SCORE_CASES,
    map_cases: Sequence[MapCase] = MAP_CASES,
) -> list[KernelBuild]:
    """Every case of both kernels on every architecture."""
    builds = []
    for arch in archs:
        builds += [build_score(case, arch) for case in score_cases]
        builds += [build_map(case, arch) for case in map_cases]
    return builds


def table(builds: Sequence[KernelBuild]) -> str:
    """Markdown table of builds."""
    lines = [
        "| kernel | case | arch | registers | spill st/ld (B) | smem (B) | config |",
        "| --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for b in builds:
        spill = f"{b.spill_store_bytes}/{b.spill_load_bytes}"
        lines.append(
            f"| {b.kernel} | {b.case} | {b.arch} | {b.registers} | {spill} | {b.shared_bytes} "
            f"| {b.config} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Build every case; print the table; exit 1 when any kernel spills."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90")
    args = parser.parse_args(argv)
    builds = build_all(tuple(args.arch or DEFAULT_ARCHS))
    print(table(builds))
    spilled = [b for b in builds if b.spills]
    for b in spilled:
        print(f"SPILLS: {b.kernel} {b.case} on {b.arch} ({b.config})")
    return 1 if spilled else 0


if __name__ == "__main__":
    raise SystemExit(main())
