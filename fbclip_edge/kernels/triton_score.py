"""Triton score_maps: one coalesced read of the token maps, fp32 accumulation, 2-way softmax.

Imported lazily by dispatch; TRITON_INTERPRET=1 only works if set before triton is imported.
"""

# Triton reads parameter annotations as specialization hints: kernel arguments stay bare.
# ruff: noqa: ANN001, ANN202

from __future__ import annotations

import torch
import triton
import triton.language as tl

TRITON_VERSION: str = triton.__version__
_TILE_ELEMENTS = 8192  # elements per (BLOCK_M, BLOCK_T, BLOCK_D) load: 16 KiB of fp16 in flight


@triton.jit
def _score_maps_kernel(  # type: ignore[no-untyped-def]
    maps_ptr,
    text_ptr,
    w_ptr,
    score_ptr,
    patch_ptr,
    M,
    T,
    inv_temp,
    stride_b,
    stride_m,
    stride_t,
    stride_text,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PROB_SUM: tl.constexpr,
):
    # One program: BLOCK_T tokens of one image, all M maps, D in static chunks.
    # softmax over 2 classes == sigmoid of the logit difference, so only x.(t1 - t0) is needed.
    # PROB_SUM (AnomalyCLIP): sum_m w_m sigmoid(z_m) per token, image score sigmoid(z_0[CLS]);
    # otherwise (FB-CLIP): sigmoid(sum_m w_m z_m).
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, BLOCK_D)
    rows_t = maps_ptr + b * stride_b + offs_t[None, :, None] * stride_t
    logit = tl.zeros([BLOCK_T], dtype=tl.float32)
    first = tl.zeros([BLOCK_T], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + offs_m0
        m_ok = offs_m < M
        rows = rows_t + offs_m[:, None, None] * stride_m
        row_ok = m_ok[:, None, None] & t_ok[None, :, None]
        # Element-wise partials, reduced once: the chunk loads carry no dependency on a
        # cross-lane reduction, so all of them can be in flight together.
        sq_part = tl.zeros([BLOCK_M, BLOCK_T, BLOCK_D], dtype=tl.float32)
        dot_part = tl.zeros([BLOCK_M, BLOCK_T, BLOCK_D], dtype=tl.float32)
        for d0 in tl.static_range(0, D, BLOCK_D):
            offs_d = d0 + offs_d0
            d_ok = offs_d < D
            x = tl.load(
                rows + offs_d[None, None, :], mask=row_ok & d_ok[None, None, :], other=0.0
            ).to(tl.float32)
            t0 = tl.load(text_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)
            t1 = tl.load(text_ptr + stride_text + offs_d, mask=d_ok, other=0.0).to(tl.float32)
            sq_part += x * x
            dot_part += x * (t1 - t0)[None, None, :]
        sumsq = tl.sum(sq_part, axis=2)
        dot = tl.sum(dot_part, axis=2)
        w = tl.load(w_ptr + offs_m, mask=m_ok, other=0.0).to(tl.float32)
        norm = tl.maximum(tl.sqrt(sumsq), 1e-12)  # F.normalize's eps
        if PROB_SUM:
            sig = 1.0 / (1.0 + tl.exp(-(dot / norm) * inv_temp))
            logit += tl.sum(w[:, None] * sig, axis=0)
            first += tl.sum(tl.where(offs_m[:, None] == 0, sig, 0.0), axis=0)
        else:
            logit += tl.sum(w[:, None] * (dot / norm), axis=0)
    if PROB_SUM:
        prob = logit
        image = first
    else:
        prob = 1.0 / (1.0 + tl.exp(-(logit * inv_temp)))
        image = prob
    tl.store(score_ptr + b + offs_t * 0, image, mask=offs_t == 0)
    tl.store(patch_ptr + b * (T - 1) + (offs_t - 1), prob, mask=t_ok & (offs_t > 0))


def block_sizes(m: int, t: int, d: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_T, BLOCK_D, num_warps): ~16 KiB fp16 tiles, many programs at batch 1.

    D is tiled in 256-wide chunks (512 B rows, one warp per row); the maps of a token tile are
    loaded together so that small batches still keep enough bytes in flight per SM.
    """
    block_d = min(256, triton.next_power_of_2(d))
    block_m = min(16, triton.next_power_of_2(m))
    block_t = max(2, _TILE_ELEMENTS // (block_m * block_d))
    block_t = min(block_t, max(2, triton.next_power_of_2(t)))
    num_warps = 8 if block_m * block_t * block_d >= _TILE_ELEMENTS else 4
    return block_m, block_t, block_d, num_warps


def _check_inputs(maps: torch.Tensor, text: torch.Tensor, map_weights: torch.Tensor) -> None:
    if maps.dim() != 4 or not maps.is_floating_point():
        raise ValueError(f"maps must be a float (B, M, T, D) tensor, got {tuple(maps.shape)}")
    _, m, t, d = maps.shape
    if m < 1 or t < 1 or d < 1:
        raise ValueError(f"maps needs M, T (CLS first) and D >= 1, got {tuple(maps.shape)}")
    if tuple(text.shape) != (2, d):
        raise ValueError(f"text must be (2, {d}), got {tuple(text.shape)}")
    if tuple(map_weights.shape) != (m,):
        raise ValueError(f"map_weights must be ({m},), got {tuple(map_weights.shape)}")
    if text.device != maps.device or map_weights.device != maps.device:
        raise ValueError("maps, text and map_weights must be on the same device")


def _check_out(tensor: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if (
        tuple(tensor.shape) != shape
        or tensor.dtype != torch.float32
        or tensor.device != device
        or not tensor.is_contiguous()
    ):
        raise ValueError(f"out tensor must be contiguous float32 {shape} on {device}")


def score_maps_triton(
    maps: torch.Tensor,
    text: torch.Tensor,
    map_weights: torch.Tensor,
    temperature: float = 0.07,
    rule: str = "logit_sum",
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of score_maps_torch: same inputs, float32 (B,) and (B, T-1) outputs.

    out: optional preallocated contiguous float32 (score, patch) to write into (reused buffers).
    """
    _check_inputs(maps, text, map_weights)
    if rule not in ("logit_sum", "prob_sum"):
        raise ValueError(f"unknown scoring rule {rule!r}; use 'logit_sum' or 'prob_sum'")
    if maps.stride(-1) != 1:
        maps = maps.contiguous()
    text = text if text.stride(-1) == 1 else text.contiguous()
    map_weights = map_weights.contiguous()
    batch, m, t, d = maps.shape
    if out is None:
        score = torch.empty(batch, device=maps.device, dtype=torch.float32)
        patch = torch.empty(batch, t - 1, device=maps.device, dtype=torch.float32)
    else:
        score, patch = out
        _check_out(score, (batch,), maps.device)
        _check_out(patch, (batch, t - 1), maps.device)
    if batch == 0:
        return score, patch
    block_m, block_t, block_d, num_warps = block_sizes(m, t, d)
    _score_maps_kernel[(triton.cdiv(t, block_t), batch)](
        maps,
        text,
        map_weights,
        score,
        patch,
        m,
        t,
        1.0 / float(temperature),
        maps.stride(0),
        maps.stride(1),
        maps.stride(2),
        text.stride(0),
        D=d,
        BLOCK_M=block_m,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        PROB_SUM=rule == "prob_sum",
        num_warps=num_warps,
    )
    return score, patch


def kernel_mode(kernel: object) -> str:
    """'compiled', 'interpreted', or 'mixed' when TRITON_INTERPRET changed after triton.language
    was imported: then triton's own @jit helpers (tl.sum, tl.zeros) can run neither way."""
    ours = type(kernel).__name__ == "InterpretedFunction"
    library = type(tl.zeros).__name__ == "InterpretedFunction"
    if ours != library:
        return "mixed"
    return "interpreted" if ours else "compiled"


MODE: str = kernel_mode(_score_maps_kernel)
