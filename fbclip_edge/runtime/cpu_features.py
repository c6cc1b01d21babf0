"""What this CPU can run fast: model name, cores and the ISA flags reduced precision needs.

Read from /proc/cpuinfo (no lscpu, no cpuid library). bf16 needs avx512_bf16 or AMX-BF16,
INT8 needs VNNI (avx512_vnni or the VEX avx_vnni) or AMX-INT8: without them OpenVINO and
onnxruntime emulate those precisions slower than float32 (onnxruntime's pre-VNNI u8s8 path
can also saturate), so artifacts in them are refused with the reason instead of run.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from fbclip_edge.artifacts.options import Precision
from fbclip_edge.errors import FBClipError

if TYPE_CHECKING:
    from fbclip_edge.artifacts.manifest import Manifest

# Any one flag of a tuple is enough (the kernel names them as in /proc/cpuinfo).
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# Flags the bench and the refusal messages name, in this order.
REPORTED_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def required_isa(precision: Precision | str) -> tuple[str, ...]:
    """Flags of which one must be present to run `precision` fast; () for fp32 and fp16
    (fp16 is a GPU precision: CPU runtimes open its float32 graph)."""
    wanted = Precision(precision)
    if wanted == Precision.BF16:
        return BF16_FLAGS
    if wanted == Precision.INT8:
        return INT8_FLAGS
    return ()


@dataclass(frozen=True)
class CpuFeatures:
    """One CPU as the kernel reports it."""

    model: str
    logical_cores: int
    physical_cores: int | None
    flags: frozenset[str]

    @property
    def has_avx512(self) -> bool:
        """AVX-512 Foundation (what every AVX-512 kernel of oneDNN and MLAS starts from)."""
        return "avx512f" in self.flags

    @property
    def has_vnni(self) -> bool:
        """int8 dot products in one instruction: avx512_vnni or avx_vnni."""
        return bool({"avx512_vnni", "avx_vnni"} & self.flags)

    @property
    def has_bf16(self) -> bool:
        """bf16 dot products: avx512_bf16 or AMX-BF16."""
        return bool(set(BF16_FLAGS) & self.flags)

    @property
    def has_amx(self) -> bool:
        """Advanced Matrix Extensions (tile registers; bf16 and int8 matrix multiply)."""
        return bool({"amx_tile", "amx_bf16", "amx_int8"} & self.flags)

    @property
    def isa(self) -> list[str]:
        """The reported flags this CPU has, in REPORTED_FLAGS order."""
        return [flag for flag in REPORTED_FLAGS if flag in self.flags]

    def lacks(self, precision: Precision | str) -> tuple[str, ...]:
        """The required flags when none of them is present, else ()."""
        needed = required_isa(precision)
        return () if not needed or set(needed) & self.flags else needed

    def runs(self, precision: Precision | str) -> bool:
        """Whether `precision` has its instructions here."""
        return not self.lacks(precision)

    def refusal(self, precision: Precision | str, fix: str | None = None) -> str | None:
        """One line: what `precision` needs, what this CPU has, and `fix` (default: what to
        export instead); None when it runs here."""
        missing = self.lacks(precision)
        if not missing:
            return None
        wanted = Precision(precision).value
        other = Precision.INT8 if wanted == "bf16" else Precision.BF16
        instead = f"--precision {other.value} or fp32" if self.runs(other) else "--precision fp32"
        present = ", ".join(self.isa) or "none of " + ", ".join(REPORTED_FLAGS)
        names = ", ".join(missing[:-1]) + f" or {missing[-1]}"
        return (
            f"{wanted} needs {names}, and this CPU ({self.model}) has {present}; "
            + (fix or f"re-export with {instead}")
        )


def _physical_cores(text: str) -> int | None:
    """Distinct (physical id, core id) pairs over the processor blocks; None where cpuinfo
    does not list them (ARM, some containers)."""
    pairs = set()
    for block in text.split("\n\n"):
        package = re.search(r"^physical id\s*:\s*(\d+)", block, re.M)
        core = re.search(r"^core id\s*:\s*(\d+)", block, re.M)
        if package and core:
            pairs.add((package.group(1), core.group(1)))
    return len(pairs) or None


def parse_cpuinfo(text: str, logical_cores: int) -> CpuFeatures:
    """CpuFeatures from /proc/cpuinfo text (x86 'flags', ARM 'Features'; first CPU's); a
    model name without digits gets the x86 family and model numbers, as the bench shows it."""
    model = platform.processor() or platform.machine()
    for key in ("model name", "Model", "Hardware"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", text, re.M)
        if match:
            model = match.group(1).strip()
            break
    family = re.search(r"^cpu family\s*:\s*(\d+)$", text, re.M)
    number = re.search(r"^model\s*:\s*(\d+)$", text, re.M)
    if not re.search(r"\d", model) and family and number:
        # VMs often say just 'Intel(R) Xeon(R) Processor': the numbers tell the generation
        model += f" (family {family.group(1)}, model {number.group(1)})"
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.M)
    found = frozenset(flags.group(1).split()) if flags else frozenset()
    return CpuFeatures(model, logical_cores, _physical_cores(text), found)


@lru_cache(maxsize=1)
def detect() -> CpuFeatures:
    """This machine's CPU, read once; no flags where /proc/cpuinfo is missing (non-Linux)."""
    text = ""
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    return parse_cpuinfo(text, os.cpu_count() or 1)


def cpu_precision(manifest: Manifest, precision: str | None = None) -> Precision:
    """What a CPU runtime runs: the asked precision, else the export's bf16 or int8, else
    fp32 (an fp16 export's mixed graph is for GPUs; its float32 graph runs here)."""
    if precision is not None:
        return Precision(precision)
    return manifest.precision if manifest.precision.cpu_only else Precision.FP32


def refuse_without_isa(precision: Precision, artifacts: Path) -> None:
    """A bf16 or int8 request on a CPU without the instructions: one line with the fix."""
    fix = (
        f"re-export {artifacts} with --precision fp32, or open it with precision='fp32' to "
        "run its float32 graph"
    )
    refusal = detect().refusal(precision, fix)
    if refusal is not None:
        raise FBClipError(refusal)
