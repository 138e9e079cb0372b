"""Triton helpers shared by the kernel modules (`correspondence_warp`, `contextual_loss`): tile
products of rows over D in chunks, on prepared rows or on k x k windows of a padded grid
(cocos_kernels/windows.py), and the launch check."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def tap_offset(t, width, PATCH: tl.constexpr):
    """Row offset of tap t (row-major over the PATCH x PATCH window) on a padded grid of row width `width`."""
    return (t // PATCH - PATCH // 2) * width + (t % PATCH - PATCH // 2)


@triton.jit
def window_scores(a_rows, b_rows, offs_a, offs_b, mask_a, mask_b, width_a, width_b,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                  PRECISION: tl.constexpr, PATCH: tl.constexpr):
    """(BLOCK_A, BLOCK_B) float32 tile of <a_i, b_j> summed over the PATCH x PATCH taps: on a padded
    grid of row width `width`, tap (dy, dx) of every centre is the row offset dy * width + dx
    (windows.py). One loop over (tap, D chunk) pairs into one accumulator, so the compiler
    pipelines one load stream (unrolled taps would each hold their own buffers and registers)."""
    CHUNKS: tl.constexpr = (D + BLOCK_D - 1) // BLOCK_D
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for i in range(0, PATCH * PATCH * CHUNKS):
        t = i // CHUNKS
        offs_d = (i % CHUNKS) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        a = tl.load(a_rows + (tap_offset(t, width_a, PATCH) + offs_a[:, None]) * D + offs_d[None, :],
                    mask=mask_a[:, None] & mask_d[None, :], other=0.0)
        b = tl.load(b_rows + (tap_offset(t, width_b, PATCH) + offs_b[:, None]) * D + offs_d[None, :],
                    mask=mask_b[:, None] & mask_d[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def scores(a_rows, b_rows, offs_a, offs_b, mask_a, mask_b,
            D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
            PRECISION: tl.constexpr):
    """(BLOCK_A, BLOCK_B) float32 tile of <a_i, b_j> over the D feature columns, chunk by chunk."""
    return window_scores(a_rows, b_rows, offs_a, offs_b, mask_a, mask_b, 0, 0, D, BLOCK_D, BLOCK_A, BLOCK_B,
                         PRECISION, 1)


@triton.jit
def accumulate_window_rows(acc_planes, plane_stride, weights, src_rows, width, offs_a, offs_b, mask_a, mask_b,
                           accumulate, D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                           PATCH: tl.constexpr):
    """Plane t of acc: acc[t, a, :] (+)= weights (A x B) @ src[b + tap t, :] for each of the PATCH x PATCH
    taps (offsets as in window_scores), in global memory (float32), planes `plane_stride` apart;
    one loop over (tap, D chunk) pairs.

    The program's first block (accumulate false) overwrites instead of adding, so the buffer needs no
    zeroing and a re-run (the autotuner times each config on the real buffers) leaves it right.
    """
    CHUNKS: tl.constexpr = (D + BLOCK_D - 1) // BLOCK_D
    # The previous block's stores of these rows may have come from other threads of the program
    # (the store and load layouts are the compiler's choice): make them visible before reading.
    tl.debug_barrier()
    for i in range(0, PATCH * PATCH * CHUNKS):
        t = i // CHUNKS
        offs_d = (i % CHUNKS) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        src = tl.load(src_rows + (tap_offset(t, width, PATCH) + offs_b[:, None]) * D + offs_d[None, :],
                      mask=mask_b[:, None] & mask_d[None, :], other=0.0)
        ptrs = acc_planes + t * plane_stride + offs_a[:, None] * D + offs_d[None, :]
        mask = mask_a[:, None] & mask_d[None, :]
        old = tl.load(ptrs, mask=mask & accumulate, other=0.0)
        tl.store(ptrs, tl.dot(weights.to(src.dtype), src, old, input_precision=PRECISION), mask=mask)


@triton.jit
def accumulate_rows(acc_rows, weights, src_rows, offs_a, offs_b, mask_a, mask_b, accumulate,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """acc[a, :] (+)= weights (A x B) @ src[b, :] over D in chunks, in global memory (float32)."""
    accumulate_window_rows(acc_rows, 0, weights, src_rows, 0, offs_a, offs_b, mask_a, mask_b, accumulate, D, BLOCK_D,
                           PRECISION, 1)


def check_contiguous(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError("the Triton kernels take contiguous tensors")
