"""Triton anomaly_map: bilinear resize and Gaussian blur in one pass over the output.

Each program computes an output tile as (A_h tile @ grid) @ A_w tile.T with the per-axis
operators from separable.py, so the map is written once and nothing else touches memory.
"""

# Triton reads parameter annotations as specialization hints: kernel arguments stay bare.
# ruff: noqa: ANN001, ANN202

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fbclip_edge.kernels.reference import as_grid
from fbclip_edge.kernels.separable import axis_operator_on
from fbclip_edge.kernels.triton_score import kernel_mode

TRITON_VERSION: str = triton.__version__


@triton.jit
def _anomaly_map_kernel(  # type: ignore[no-untyped-def]
    grid_ptr,
    ah_ptr,
    aw_ptr,
    out_ptr,
    H,
    W,
    GH,
    GW,
    stride_b,
    stride_h,
    stride_w,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    GHP: tl.constexpr,
    GWP: tl.constexpr,
    KW: tl.constexpr,
):
    pid_h = tl.program_id(0)
    pid_w = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    kh = tl.arange(0, GHP)
    ah = tl.load(
        ah_ptr + rows[:, None] * GH + kh[None, :],
        mask=(rows[:, None] < H) & (kh[None, :] < GH),
        other=0.0,
    )
    out = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.float32)
    # Grid columns in KW-wide slices keep the (GHP, KW) grid and (KW, BLOCK_W) operator tiles
    # in registers (a runtime loop: static unrolling hoists every slice's loads and spills).
    # ieee: TF32 would cost ~1e-3 relative error, and these dots are cheap next to the store.
    for kw0 in range(0, GWP, KW):
        kw = kw0 + tl.arange(0, KW)
        cells = tl.load(
            grid_ptr + b * stride_b + kh[:, None] * stride_h + kw[None, :] * stride_w,
            mask=(kh[:, None] < GH) & (kw[None, :] < GW),
            other=0.0,
        ).to(tl.float32)
        aw_t = tl.load(
            aw_ptr + cols[None, :] * GW + kw[:, None],
            mask=(cols[None, :] < W) & (kw[:, None] < GW),
            other=0.0,
        )
        rows_blurred = tl.dot(ah, cells, input_precision="ieee")
        out += tl.dot(rows_blurred, aw_t, input_precision="ieee")
    tl.store(
        out_ptr + b * H * W + rows[:, None] * W + cols[None, :],
        out,
        mask=(rows[:, None] < H) & (cols[None, :] < W),
    )


def block_sizes(gh: int, gw: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_H, BLOCK_W, GHP, GWP, KW, num_warps): spill-free on sm_90 up to 128-wide grids.

    Patch-grid sides are padded to a power of two >= 16 (tl.dot's minimum) and the grid's
    columns are consumed KW at a time.
    """
    ghp = max(16, triton.next_power_of_2(gh))
    gwp = max(16, triton.next_power_of_2(gw))
    return 32, 64, ghp, gwp, min(32, gwp), 8


def anomaly_map_triton(
    patch_prob: torch.Tensor,
    size: tuple[int, int],
    sigma: float = 4.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of anomaly_map_torch: float32 (B, H, W), same input layouts.

    out: optional preallocated contiguous float32 (B, H, W) to write into (reused buffers).
    """
    grid = as_grid(patch_prob)[:, 0]
    if not grid.is_floating_point():
        raise ValueError(f"patch_prob must be a float tensor, got {grid.dtype}")
    height, width = int(size[0]), int(size[1])
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive, got {tuple(size)}")
    batch, gh, gw = grid.shape
    shape = (batch, height, width)
    if out is None:
        out = torch.empty(shape, device=grid.device, dtype=torch.float32)
    elif (
        tuple(out.shape) != shape
        or out.dtype != torch.float32
        or out.device != grid.device
        or not out.is_contiguous()
    ):
        raise ValueError(f"out must be contiguous float32 {shape} on {grid.device}")
    if batch == 0:
        return out
    a_h = axis_operator_on(gh, height, sigma, grid.device)
    a_w = axis_operator_on(gw, width, sigma, grid.device)
    block_h, block_w, ghp, gwp, kw, num_warps = block_sizes(gh, gw)
    launch = (triton.cdiv(height, block_h), triton.cdiv(width, block_w), batch)
    _anomaly_map_kernel[launch](
        grid,
        a_h,
        a_w,
        out,
        height,
        width,
        gh,
        gw,
        grid.stride(0),
        grid.stride(1),
        grid.stride(2),
        BLOCK_H=block_h,
        BLOCK_W=block_w,
        GHP=ghp,
        GWP=gwp,
        KW=kw,
        num_warps=num_warps,
    )
    return out


MODE: str = kernel_mode(_anomaly_map_kernel)
