"""Benchmarks: the fused-kernel microbenchmark (kernels.py)."""

from fbclip_edge.bench.kernels import (
    FULL,
    REDUCED,
    BenchShape,
    KernelBenchReport,
    KernelCase,
    run_kernel_bench,
    write_kernel_bench,
)

__all__ = [
    "FULL",
    "REDUCED",
    "BenchShape",
    "KernelBenchReport",
    "KernelCase",
    "run_kernel_bench",
    "write_kernel_bench",
]
