"""Triton kernels for `contextual_loss` on prepared rows (the fused backend "triton").

Entry points (the contract every fused backend implements, as csrc/cpu/contextual_loss.h):
  contextual_loss_forward(x (B,Nx,C), y (B,Ny,C), bandwidth, dist_eps) -> (m, argmin, s, t), each (B, Nx)
  contextual_loss_backward(grad_s, x, y, m, argmin, s, t, bandwidth, dist_eps, need_dx, need_dy) -> (dx, dy)
with d_ij = 1 - <x_i, y_j>, m_i = min_j d_ij (argmin: the lowest such j), s_i = sum_j e_ij and
t_i = sum_j e_ij d_ij, e_ij = exp((m_i - d_ij) / (bandwidth (m_i + dist_eps))).

Forward: one program per (row block, batch), two passes over the column blocks (the row minimum,
then the sums with the row's own scale). Backward: the loss's gradient w.r.t. d is the dense
-g_i e_ij / c_i plus, at j = argmin_i only, the minimum's term; one kernel per side (dX over row
blocks, dY over column blocks: one kernel, FOR_Y) recomputes the tiles of d and applies both:
no atomics.

Tile products are full float32 ("ieee") whatever torch's matmul precision: a distance's rounding
is divided by bandwidth * (m_i + 1e-3), down to 5e-5, so tf32's 1e-3 would swamp the loss.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..constants import TRITON_INTERPRETED
from .common import accumulate_rows, check_contiguous, scores

# Fixed square tiles (rows of x and of y): under the interpreter small ones (few Python-level
# steps, still several partly filled blocks at the tests' sizes); on a GPU 64 x 64 tiles over
# 16 feature columns at a time: the float32 tile products run on FMAs, each thread holding its
# operand slices of a chunk in registers, and wider chunks spill in the backward (d, P and the
# output chunk are live together) and in the forward on sm_80.
BLOCK, BLOCK_D = (32, 128) if TRITON_INTERPRETED else (64, 16)


@triton.jit
def _distance_tile(x_rows, y_rows, offs_m, offs_n, mask_m, mask_n, C: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    return 1.0 - scores(x_rows, y_rows, offs_m, offs_n, mask_m, mask_n, C, BLOCK_D, BLOCK_M, BLOCK_N, "ieee")


@triton.jit
def _forward_kernel(X, Y, M, Arg, S, T, h, dist_eps, Nx, Ny, C: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < Nx
    x_rows = X + b.to(tl.int64) * Nx * C
    y_rows = Y + b.to(tl.int64) * Ny * C
    m = tl.full((BLOCK_M,), float("inf"), tl.float32)
    arg = tl.zeros((BLOCK_M,), tl.int32)
    # Pass 1: the row minimum; ties go to the lowest j (the first block wins across blocks, the
    # leftmost entry within one).
    for j0 in range(0, Ny, BLOCK_N):
        offs_n = j0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < Ny
        d = _distance_tile(x_rows, y_rows, offs_m, offs_n, mask_m, mask_n, C, BLOCK_D, BLOCK_M, BLOCK_N)
        d = tl.where(mask_n[None, :], d, float("inf"))
        tile_min = tl.min(d, axis=1)
        tile_arg = tl.argmin(d, axis=1, tie_break_left=True)
        better = tile_min < m
        arg = tl.where(better, j0 + tile_arg, arg)
        m = tl.where(better, tile_min, m)
    # Pass 2: the sums, each row with its own scale.
    inv_c = 1.0 / (h * (m + dist_eps))
    s = tl.zeros((BLOCK_M,), tl.float32)
    t = tl.zeros((BLOCK_M,), tl.float32)
    for j0 in range(0, Ny, BLOCK_N):
        offs_n = j0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < Ny
        d = _distance_tile(x_rows, y_rows, offs_m, offs_n, mask_m, mask_n, C, BLOCK_D, BLOCK_M, BLOCK_N)
        e = tl.exp(tl.minimum((m[:, None] - d) * inv_c[:, None], 0.0))
        e = tl.where(mask_n[None, :], e, 0.0)
        s += tl.sum(e, axis=1)
        t += tl.sum(e * d, axis=1)
    o = b.to(tl.int64) * Nx + offs_m
    tl.store(M + o, m, mask=mask_m)
    tl.store(Arg + o, arg.to(tl.int64), mask=mask_m)
    tl.store(S + o, s, mask=mask_m)
    tl.store(T + o, t, mask=mask_m)


@triton.jit
def _grad_tile(x_rows, y_rows, M, Arg, G, Q, row0, offs_m, offs_n, mask_m, mask_n, h, dist_eps,
               C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """d loss / d d_ij on one tile, negated: g_i e_ij / c_i, minus q_i where j is row i's argmin."""
    m = tl.load(M + row0 + offs_m, mask=mask_m, other=0.0)
    g = tl.load(G + row0 + offs_m, mask=mask_m, other=0.0)
    q = tl.load(Q + row0 + offs_m, mask=mask_m, other=0.0)
    arg = tl.load(Arg + row0 + offs_m, mask=mask_m, other=-1)
    inv_c = 1.0 / (h * (m + dist_eps))
    d = _distance_tile(x_rows, y_rows, offs_m, offs_n, mask_m, mask_n, C, BLOCK_D, BLOCK_M, BLOCK_N)
    p = (g * inv_c)[:, None] * tl.exp(tl.minimum((m[:, None] - d) * inv_c[:, None], 0.0))
    p -= tl.where(arg[:, None] == offs_n[None, :], q[:, None], 0.0)
    return tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)


@triton.jit
def _backward_kernel(X, Y, M, Arg, G, Q, Out, h, dist_eps, Nx, Ny, C: tl.constexpr, FOR_Y: tl.constexpr,
                     BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """dX_i = sum_j P_ij y_j, one program per row block; with FOR_Y, dY_j = sum_i P_ij x_i, one per column block."""
    b = tl.program_id(1).to(tl.int64)
    x_rows = X + b * Nx * C
    y_rows = Y + b * Ny * C
    own = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if FOR_Y:
        n_other = Nx
    else:
        n_other = Ny
    for k0 in range(0, n_other, BLOCK):
        other = k0 + tl.arange(0, BLOCK)
        if FOR_Y:
            offs_m = other
            offs_n = own
        else:
            offs_m = own
            offs_n = other
        mask_m = offs_m < Nx
        mask_n = offs_n < Ny
        p = _grad_tile(x_rows, y_rows, M, Arg, G, Q, b * Nx, offs_m, offs_n, mask_m, mask_n, h, dist_eps,
                       C, BLOCK_D, BLOCK, BLOCK)
        if FOR_Y:
            accumulate_rows(Out + b * Ny * C, tl.trans(p), x_rows, offs_n, offs_m, mask_n, mask_m, k0 > 0,
                            C, BLOCK_D, "ieee")
        else:
            accumulate_rows(Out + b * Nx * C, p, y_rows, offs_m, offs_n, mask_m, mask_n, k0 > 0,
                            C, BLOCK_D, "ieee")


def _check_rows(x: torch.Tensor, y: torch.Tensor) -> None:
    check_contiguous(x, y)
    if x.dtype != torch.float32 or y.dtype != torch.float32:
        raise ValueError(f"the Triton contextual_loss kernels take float32 rows, got {x.dtype}, {y.dtype}")


def contextual_loss_forward(x, y, bandwidth, dist_eps):
    """Per-row (m, argmin, s, t), each (B, Nx): m, s, t float32, argmin int64."""
    _check_rows(x, y)
    B, Nx, C = x.shape
    Ny = y.shape[1]
    m, s, t = (torch.empty((B, Nx), device=x.device, dtype=torch.float32) for _ in range(3))
    argmin = torch.empty((B, Nx), device=x.device, dtype=torch.int64)
    _forward_kernel[(triton.cdiv(Nx, BLOCK), B)](
        x, y, m, argmin, s, t, float(bandwidth), float(dist_eps), Nx, Ny,
        C=C, BLOCK_M=BLOCK, BLOCK_N=BLOCK, BLOCK_D=BLOCK_D,
    )
    return m, argmin, s, t


def contextual_loss_backward(grad_s, x, y, m, argmin, s, t, bandwidth, dist_eps, need_dx, need_dy):
    """(dx, dy) in float32 w.r.t. the rows, None where not requested."""
    _check_rows(x, y)
    check_contiguous(grad_s, m, argmin, s, t)
    B, Nx, C = x.shape
    Ny = y.shape[1]
    # The minimum's term: m_i = d_{i, argmin_i} moves every e_ij, ds_i/dm_i = (t_i + eps s_i) / (c_i (m_i + eps)).
    q = (grad_s * (t + dist_eps * s) / (bandwidth * (m + dist_eps) ** 2)).contiguous()
    dx = torch.empty_like(x) if need_dx else None
    dy = torch.empty_like(y) if need_dy else None
    for out, rows, for_y in ((dx, Nx, False), (dy, Ny, True)):
        if out is not None:
            _backward_kernel[(triton.cdiv(rows, BLOCK), B)](
                x, y, m, argmin, grad_s, q, out, float(bandwidth), float(dist_eps), Nx, Ny,
                C=C, FOR_Y=for_y, BLOCK=BLOCK, BLOCK_D=BLOCK_D,
            )
    return dx, dy
