"""Triton kernels for `correspondence_warp` on prepared features (the fused backend "triton").

The backend's kernels object (`cocos_kernels/triton/backend.py`, the contract of
`cocos_kernels/kernels.py`) calls these entry points; besides `key_mask=` they take `precision=`
("ieee", "tf32x3", "tf32": how float32 tile products use the tensor cores), and `input_dtype`
tells the op layer to hand half-precision features over as they are.

Forward: one program per (query block, batch[, key split]); it loops over key blocks, builds the
score tile from D in chunks of BLOCK_D (D reaches 2304 with 3x3 patches), keeps an online softmax
with a running max (logits reach 1/temperature = 100: exp overflows float32 above ~88.7 without
it) and accumulates the value tile. Cv is padded to BLOCK_CV (a power of two >= 16, the smallest
tl.dot size) inside the kernel only, through masks. When the query blocks alone are too few to
fill the GPU, the key axis is split across programs and the partial results are combined
through their logsumexps.

Backward (FlashAttention-2): delta = rowsum(dOut * Out), then a dQ kernel over query blocks and a
dK/dV kernel over key blocks, each recomputing P from the saved logsumexp; no atomics, so the
result is deterministic. When D fits one chunk the dQ (dK) rows stay in registers; otherwise
each program accumulates its own rows in global memory chunk by chunk (no other program writes
them, so this too is race-free).

Accumulation and the softmax are float32 for every input dtype; float16/bfloat16 features and
values stay half in the tile products (tensor cores), as P and dS are cast to half for theirs.

Prologue (`prepare_features`, `prepare_features_backward`): centring over channels and L2
normalisation per position for patch_size=1, in float32, writing the rows in the input dtype;
the op layer falls back to its PyTorch prologue for patches and spatial centring.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..constants import PRECISIONS, TRITON_INTERPRETED
from .common import accumulate_rows, accumulate_window_rows, check_contiguous, scores, window_scores
# Autotuning compiles and times every config for each new (D, Cv, dtype): worth it for a
# training run, not for a test suite sweeping dozens of shapes (`COCOS_KERNELS_TRITON_AUTOTUNE=0`).
AUTOTUNE = not TRITON_INTERPRETED and os.environ.get("COCOS_KERNELS_TRITON_AUTOTUNE", "1") != "0"

# Every BLOCK_N of the configs divides this, so a key split of a multiple of it never leaves a
# program a partial block in the middle of the key axis.
_KEY_SPLIT_GRANULE = 128

_LOG2E = 1.4426950408889634  # the kernels work in base 2 (exp2, log2): scores are scaled by it


def input_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype these kernels take features, value and grad_out in, for inputs of `dtype`."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


def _config(block_m, block_n, block_d, warps, stages):
    return triton.Config(dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d), num_warps=warps, num_stages=stages)


def _configs() -> tuple[list, list]:
    """(float32 configs, half configs)."""
    if TRITON_INTERPRETED:
        # One small config: big enough that the suite's shapes take few (slow, Python-level)
        # interpreter steps, small enough that they still span several, partly filled blocks.
        config = _config(32, 32, 128, 4, 1)
        return [config], [config]
    if not AUTOTUNE:
        config = _config(64, 64, 64, 4, 2)
        return [config], [config]
    # Chosen by `python -m benchmarks.kernel_report` (sm_90): the BLOCK_M = 128, 8-warp and 3-4-stage
    # configs are spill-free and within an H100's 227 KiB of shared memory in the forward and in most
    # backward cases of the headline shapes (the autotuner drops one that does not fit: OutOfResources;
    # the compile test keeps at least one per case); float32 keeps M32 N32 (the tile that spills least in
    # the tf32x3 / ieee backward) beside wgmma-sized ones with 32-column chunks (tf32x3 splits
    # each operand in two, doubling its registers). D only sets the number of chunks, so the same
    # configs serve D=2304; at half precision BLOCK_D=256 keeps a D=256 query tile resident
    # (ONE_CHUNK). Each config is compiled and timed per (D, Cv, PATCH, dtype).
    float32 = [_config(32, 32, 64, 4, 2), _config(64, 64, 32, 4, 3), _config(128, 64, 32, 8, 3),
               _config(64, 64, 64, 8, 2)]
    half = [_config(64, 64, 64, 4, 3), _config(128, 64, 64, 8, 4), _config(128, 128, 64, 8, 3),
            _config(64, 64, 256, 4, 2), _config(128, 64, 256, 8, 2)]
    return float32, half


_FLOAT32_CONFIGS, _HALF_CONFIGS = _configs()


def _configs_for_dtype(configs, named_args, **kwargs):
    wanted = _FLOAT32_CONFIGS if named_args["Q"].dtype == torch.float32 else _HALF_CONFIGS
    # Tiles that spill (kernel report): windows never keep a tile resident, a tap's 256-column chunk
    # spills in their backward, and so do 128 x 128 tiles in their dQ kernel; the dK/dV kernel holds
    # dK and dV for its BLOCK_N keys besides the forward's tiles, and spills with 128 keys, a resident
    # 256-column dK tile or, for windows, 128 queries a block.
    windows = kwargs.get("PATCH", 1) > 1
    limits = {"BLOCK_D": 64} if windows else {}
    if windows and "DQ" in named_args:
        limits["BLOCK_N"] = 64
    if "DK" in named_args:
        limits.update(BLOCK_N=64, BLOCK_D=64, **({"BLOCK_M": 64} if windows else {}))
    return [c for c in configs if any(c is w for w in wanted) and all(c.kwargs[k] <= v for k, v in limits.items())]


def _tune(key=("D", "CV")):
    # The autotuner adds the dtypes of the tensor arguments to the key itself. A query tile stays
    # resident (ONE_CHUNK) when it is one chunk wide and, for windows, one tap.
    heuristics = triton.heuristics({"ONE_CHUNK": lambda a: a["D"] <= a["BLOCK_D"] and a.get("PATCH", 1) == 1})
    configs = _FLOAT32_CONFIGS + [c for c in _HALF_CONFIGS if not any(c is f for f in _FLOAT32_CONFIGS)]

    def wrap(fn):
        return triton.autotune(configs=configs, key=list(key),
                               prune_configs_by={"early_config_prune": _configs_for_dtype})(heuristics(fn))
    return wrap


@triton.jit
def _keys_kept(KeyMask, batch, Nk, offs_n, mask_n, HAS_MASK: tl.constexpr):
    """Which keys of the block take part: in range and, with a key mask, not masked out."""
    if HAS_MASK:
        return mask_n & (tl.load(KeyMask + batch * Nk + offs_n, mask=mask_n, other=0) != 0)
    return mask_n


@_tune(("D", "CV", "PATCH"))
@triton.jit
def _forward_kernel(Q, K, V, KeyMask, MQ, AQ, MK, AK, Out, Lse, scale_log2, dwin, Nq, Nk, Lq, Lk, lo_q, lo_k,
                    width_q, width_k, keys_per_split,
                    D: tl.constexpr, CV: tl.constexpr, BLOCK_CV: tl.constexpr, PRECISION: tl.constexpr,
                    HAS_MASK: tl.constexpr, PATCH: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ONE_CHUNK: tl.constexpr):
    # PATCH == 1: rows are prepared features (Lq = Nq, lo = 0). PATCH > 1: rows are a padded grid
    # of Lq rows per sample, centre i at row lo_q + i, with per-centre window means M and score
    # factors A (windows.py): s = (sum over taps - dwin * m_q m_k) * a_q * a_k.
    pid_m, pid_b, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    batch = pid_b.to(tl.int64)
    q_rows = Q + (batch * Lq + lo_q) * D
    k_rows = K + (batch * Lk + lo_k) * D
    v_cols = V + batch * CV * Nk
    n_lo = pid_s * keys_per_split
    n_hi = tl.minimum(n_lo + keys_per_split, Nk)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < Nq
    offs_c = tl.arange(0, BLOCK_CV)
    mask_c = offs_c < CV
    offs_d = tl.arange(0, BLOCK_D)
    if ONE_CHUNK:  # the query tile stays in registers across the key loop
        q = tl.load(q_rows + offs_m[:, None] * D + offs_d[None, :], mask=mask_m[:, None] & (offs_d[None, :] < D), other=0.0)
    if PATCH > 1:
        mq = tl.load(MQ + batch * Nq + offs_m, mask=mask_m, other=0.0)
        aq = tl.load(AQ + batch * Nq + offs_m, mask=mask_m, other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running max, log2 units
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_CV), dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_hi
        if ONE_CHUNK:
            k = tl.load(k_rows + offs_n[:, None] * D + offs_d[None, :], mask=mask_n[:, None] & (offs_d[None, :] < D), other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        elif PATCH == 1:
            s = scores(q_rows, k_rows, offs_m, offs_n, mask_m, mask_n, D, BLOCK_D, BLOCK_M, BLOCK_N, PRECISION)
        else:
            s = window_scores(q_rows, k_rows, offs_m, offs_n, mask_m, mask_n, width_q, width_k,
                              D, BLOCK_D, BLOCK_M, BLOCK_N, PRECISION, PATCH)
            mk = tl.load(MK + batch * Nk + offs_n, mask=mask_n, other=0.0)
            ak = tl.load(AK + batch * Nk + offs_n, mask=mask_n, other=0.0)
            s = (s - dwin * mq[:, None] * mk[None, :]) * (aq[:, None] * ak[None, :])
        s = tl.where(_keys_kept(KeyMask, batch, Nk, offs_n, mask_n, HAS_MASK)[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # -inf while every key so far is masked out: shift by 0 so the exps are 0, not NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - shift[:, None])
        alpha = tl.exp2(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cols + offs_c[None, :] * Nk + offs_n[:, None], mask=mask_n[:, None] & mask_c[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    # Out/Lse are (splits, B, CV, Nq) / (splits, B, Nq); splits == 1 writes the final result.
    part = pid_s.to(tl.int64) * tl.num_programs(1) + batch
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # l = 0 (every key masked out): acc is 0
    tl.store(Out + part * CV * Nq + offs_c[None, :] * Nq + offs_m[:, None], out, mask=mask_m[:, None] & mask_c[None, :])
    tl.store(Lse + part * Nq + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=mask_m)


@triton.jit
def _window_factors(M, A, batch, N, offs, mask):
    """A block's per-centre window means and score factors (windows.py)."""
    return (tl.load(M + batch * N + offs, mask=mask, other=0.0),
            tl.load(A + batch * N + offs, mask=mask, other=0.0))


@_tune(("D", "CV", "PATCH"))
@triton.jit
def _backward_dq_kernel(Q, K, V, KeyMask, MQ, AQ, MK, AK, DO, Lse, Delta, DQ, Sums, scale_log2, scale, dwin,
                        Nq, Nk, Lq, Lk, lo_q, lo_k, width_q, width_k,
                        D: tl.constexpr, CV: tl.constexpr, BLOCK_CV: tl.constexpr, PRECISION: tl.constexpr,
                        HAS_MASK: tl.constexpr, PATCH: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ONE_CHUNK: tl.constexpr):
    # PATCH > 1 (rows and factors as in _forward_kernel): DQ is (PATCH^2, B, Nq, D), plane t holding
    # sum_v H_uv K(v + tap t) for centre u (the caller adds each plane at its tap's offset), and Sums
    # (2, B, Nq) the per-centre sum_v H_uv m_v and sum_v dS_uv * score_uv (H = dL/dscore * a_u a_v).
    pid_m, pid_b = tl.program_id(0), tl.program_id(1)
    batch = pid_b.to(tl.int64)
    q_rows = Q + (batch * Lq + lo_q) * D
    k_rows = K + (batch * Lk + lo_k) * D
    dq_rows = DQ + batch * Nq * D
    v_cols = V + batch * CV * Nk

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < Nq
    offs_c = tl.arange(0, BLOCK_CV)
    mask_c = offs_c < CV
    offs_d = tl.arange(0, BLOCK_D)
    lse2 = tl.load(Lse + batch * Nq + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + batch * Nq + offs_m, mask=mask_m, other=0.0)
    do = tl.load(DO + batch * CV * Nq + offs_c[None, :] * Nq + offs_m[:, None], mask=mask_m[:, None] & mask_c[None, :], other=0.0)
    if ONE_CHUNK:
        q = tl.load(q_rows + offs_m[:, None] * D + offs_d[None, :], mask=mask_m[:, None] & (offs_d[None, :] < D), other=0.0)
        dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if PATCH > 1:
        mq, aq = _window_factors(MQ, AQ, batch, Nq, offs_m, mask_m)
        sum_hm = tl.zeros((BLOCK_M,), dtype=tl.float32)
        sum_es = tl.zeros((BLOCK_M,), dtype=tl.float32)

    for n0 in range(0, Nk, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < Nk
        if ONE_CHUNK:
            k = tl.load(k_rows + offs_n[:, None] * D + offs_d[None, :], mask=mask_n[:, None] & (offs_d[None, :] < D), other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        elif PATCH == 1:
            s = scores(q_rows, k_rows, offs_m, offs_n, mask_m, mask_n, D, BLOCK_D, BLOCK_M, BLOCK_N, PRECISION)
        else:
            s = window_scores(q_rows, k_rows, offs_m, offs_n, mask_m, mask_n, width_q, width_k,
                              D, BLOCK_D, BLOCK_M, BLOCK_N, PRECISION, PATCH)
            mk, ak = _window_factors(MK, AK, batch, Nk, offs_n, mask_n)
            s = (s - dwin * mq[:, None] * mk[None, :]) * (aq[:, None] * ak[None, :])
        keep = _keys_kept(KeyMask, batch, Nk, offs_n, mask_n, HAS_MASK)
        # Masked before exp2: a padded key's score of 0 can sit far above a row's logsumexp.
        p = tl.exp2(tl.where(keep[None, :], s * scale_log2 - lse2[:, None], float("-inf")))
        v = tl.load(v_cols + offs_c[None, :] * Nk + offs_n[:, None], mask=mask_n[:, None] & mask_c[None, :], other=0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None]) * scale
        if ONE_CHUNK:
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
        elif PATCH == 1:
            accumulate_rows(dq_rows, ds, k_rows, offs_m, offs_n, mask_m, mask_n, n0 > 0, D, BLOCK_D, PRECISION)
        else:
            h = ds * (aq[:, None] * ak[None, :])
            sum_hm += tl.sum(h * mk[None, :], 1)
            sum_es += tl.sum(ds * s, 1)
            accumulate_window_rows(dq_rows, tl.num_programs(1).to(tl.int64) * Nq * D, h, k_rows, width_k, offs_m,
                                   offs_n, mask_m, mask_n, n0 > 0, D, BLOCK_D, PRECISION, PATCH)
    if ONE_CHUNK:
        tl.store(dq_rows + offs_m[:, None] * D + offs_d[None, :], dq, mask=mask_m[:, None] & (offs_d[None, :] < D))
    if PATCH > 1:
        tl.store(Sums + batch * Nq + offs_m, sum_hm, mask=mask_m)
        tl.store(Sums + (tl.num_programs(1) + batch) * Nq + offs_m, sum_es, mask=mask_m)


@_tune(("D", "CV", "PATCH"))
@triton.jit
def _backward_dkdv_kernel(Q, K, V, KeyMask, MQ, AQ, MK, AK, DO, Lse, Delta, DK, DV, Sums, scale_log2, scale, dwin,
                          Nq, Nk, Lq, Lk, lo_q, lo_k, width_q, width_k,
                          D: tl.constexpr, CV: tl.constexpr, BLOCK_CV: tl.constexpr, PRECISION: tl.constexpr,
                          HAS_MASK: tl.constexpr, PATCH: tl.constexpr, NEED_DK: tl.constexpr, NEED_DV: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ONE_CHUNK: tl.constexpr):
    # PATCH > 1: DK is (PATCH^2, B, Nk, D) tap planes and Sums (2, B, Nk), as in _backward_dq_kernel.
    pid_n, pid_b = tl.program_id(0), tl.program_id(1)
    batch = pid_b.to(tl.int64)
    q_rows = Q + (batch * Lq + lo_q) * D
    k_rows = K + (batch * Lk + lo_k) * D
    dk_rows = DK + batch * Nk * D

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < Nk
    keep = _keys_kept(KeyMask, batch, Nk, offs_n, mask_n, HAS_MASK)
    offs_c = tl.arange(0, BLOCK_CV)
    mask_c = offs_c < CV
    offs_d = tl.arange(0, BLOCK_D)
    v = tl.load(V + batch * CV * Nk + offs_c[None, :] * Nk + offs_n[:, None], mask=mask_n[:, None] & mask_c[None, :], other=0.0)
    if ONE_CHUNK:
        k = tl.load(k_rows + offs_n[:, None] * D + offs_d[None, :], mask=mask_n[:, None] & (offs_d[None, :] < D), other=0.0)
        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    if PATCH > 1:
        mk, ak = _window_factors(MK, AK, batch, Nk, offs_n, mask_n)
        sum_hm = tl.zeros((BLOCK_N,), dtype=tl.float32)
        sum_es = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_CV), dtype=tl.float32)

    for m0 in range(0, Nq, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < Nq
        if ONE_CHUNK:
            q = tl.load(q_rows + offs_m[:, None] * D + offs_d[None, :], mask=mask_m[:, None] & (offs_d[None, :] < D), other=0.0)
            st = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        elif PATCH == 1:
            st = scores(k_rows, q_rows, offs_n, offs_m, mask_n, mask_m, D, BLOCK_D, BLOCK_N, BLOCK_M, PRECISION)
        else:
            st = window_scores(k_rows, q_rows, offs_n, offs_m, mask_n, mask_m, width_k, width_q,
                               D, BLOCK_D, BLOCK_N, BLOCK_M, PRECISION, PATCH)
            mq, aq = _window_factors(MQ, AQ, batch, Nq, offs_m, mask_m)
            st = (st - dwin * mk[:, None] * mq[None, :]) * (ak[:, None] * aq[None, :])
        lse2 = tl.load(Lse + batch * Nq + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
        pt = tl.exp2(tl.where(keep[:, None] & mask_m[None, :], st * scale_log2 - lse2[None, :], float("-inf")))
        do = tl.load(DO + batch * CV * Nq + offs_c[None, :] * Nq + offs_m[:, None], mask=mask_m[:, None] & mask_c[None, :], other=0.0)
        if NEED_DV:
            dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
        if NEED_DK:
            delta = tl.load(Delta + batch * Nq + offs_m, mask=mask_m, other=0.0)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dst = pt * (dpt - delta[None, :]) * scale
            if ONE_CHUNK:
                dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PRECISION)
            elif PATCH == 1:
                accumulate_rows(dk_rows, dst, q_rows, offs_n, offs_m, mask_n, mask_m, m0 > 0, D, BLOCK_D, PRECISION)
            else:
                ht = dst * (ak[:, None] * aq[None, :])
                sum_hm += tl.sum(ht * mq[None, :], 1)
                sum_es += tl.sum(dst * st, 1)
                accumulate_window_rows(dk_rows, tl.num_programs(1).to(tl.int64) * Nk * D, ht, q_rows, width_q,
                                       offs_n, offs_m, mask_n, mask_m, m0 > 0, D, BLOCK_D, PRECISION, PATCH)
    if NEED_DV:
        tl.store(DV + batch * CV * Nk + offs_c[None, :] * Nk + offs_n[:, None], dv, mask=mask_n[:, None] & mask_c[None, :])
    if NEED_DK and ONE_CHUNK:
        tl.store(dk_rows + offs_n[:, None] * D + offs_d[None, :], dk, mask=mask_n[:, None] & (offs_d[None, :] < D))
    if NEED_DK and PATCH > 1:
        tl.store(Sums + batch * Nk + offs_n, sum_hm, mask=mask_n)
        tl.store(Sums + (tl.num_programs(1) + batch) * Nk + offs_n, sum_es, mask=mask_n)


def _block_cv(cv: int) -> int:
    return max(16, triton.next_power_of_2(cv))


def _dot_precision(dtype: torch.dtype, precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    # input_precision only concerns float32 x float32 products; half products take the default.
    return precision if dtype == torch.float32 else "tf32"


def _mask_args(key_mask, q):
    """(tensor for the KeyMask pointer, HAS_MASK): without a mask the kernels never read it."""
    if key_mask is None:
        return q, False
    check_contiguous(key_mask)
    return key_mask.view(torch.uint8), True


def _num_key_splits(batch: int, nq: int, nk: int, device: torch.device) -> int:
    """How many programs share each query block's keys: enough for ~2 programs per SM."""
    if TRITON_INTERPRETED or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = batch * triton.cdiv(nq, 128)  # the largest BLOCK_M: the fewest query programs
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(nk, 2 * _KEY_SPLIT_GRANULE)))


def correspondence_warp_forward(q, k, v, scale, key_mask=None, precision="ieee", num_splits=None):
    """out (B, Cv, Nq) in v's dtype and the float32 row logsumexp lse (B, Nq) of scale * q k^T.

    key_mask: None or (B, Nk) bool, False for keys that get no weight (a row with none left
    gets out 0 and lse -inf). num_splits: how many programs share one query block's keys (None:
    as the grid needs).
    """
    check_contiguous(q, k, v)
    return _forward(q, k, v, scale, key_mask, precision, num_splits, _row_geometry(q, k))


class _Geometry(NamedTuple):
    """Where the kernels find each centre's rows: the launch arguments shared by all three kernels."""
    factors: tuple  # (MQ, AQ, MK, AK): per-centre window means and score factors
    dwin: float  # D = k*k*C, for the means' correction
    Nq: int  # query / key centres
    Nk: int
    Lq: int  # rows per sample
    Lk: int
    lo_q: int  # row of centre 0
    lo_k: int
    width_q: int  # padded row width (tap (dy, dx) is row offset dy * width + dx)
    width_k: int
    patch: int


def _row_geometry(q, k) -> _Geometry:
    """Prepared rows: one tap per centre, no per-centre factors (placeholders the kernels never read)."""
    return _Geometry((q, q, q, q), 0.0, q.shape[1], k.shape[1], q.shape[1], k.shape[1], 0, 0, 0, 0, 1)


def _window_geometry(xq, mq, aq, xk, mk, ak, patch, width_q, width_k) -> _Geometry:
    """k x k windows on padded grids (windows.py): centre i at row (k//2) * width + k//2 + i."""
    r = patch // 2
    return _Geometry((mq, aq, mk, ak), float(patch * patch * xq.shape[2]), mq.shape[1], mk.shape[1], xq.shape[1],
                     xk.shape[1], r * width_q + r, r * width_k + r, width_q, width_k, patch)


def correspondence_warp_windows_forward(xq, mq, aq, xk, mk, ak, v, patch, width_q, width_k, scale, key_mask=None,
                                        precision="ieee", num_splits=None):
    """The forward on k x k windows without the unfold (see windows.py and the cpu backend's
    csrc/cpu/correspondence_warp.h): xq (B, Lq, C) / xk padded grids of rows, mq / aq and mk / ak
    (B, N) float32 per-centre means and score factors, v (B, Cv, Nk) on the key centres.
    Returns out (B, Cv, Nq) and lse (B, Nq) on the query centres."""
    check_contiguous(xq, mq, aq, xk, mk, ak, v)
    geometry = _window_geometry(xq, mq, aq, xk, mk, ak, patch, width_q, width_k)
    return _forward(xq, xk, v, scale, key_mask, precision, num_splits, geometry)


def _forward(q, k, v, scale, key_mask, precision, num_splits, g: _Geometry):
    mask_args = _mask_args(key_mask, q)
    B, D = q.shape[0], q.shape[2]
    Cv = v.shape[1]
    Nq, Nk = g.Nq, g.Nk
    splits = _num_key_splits(B, Nq, Nk, q.device) if num_splits is None else int(num_splits)
    keys_per_split = triton.cdiv(triton.cdiv(Nk, max(1, splits)), _KEY_SPLIT_GRANULE) * _KEY_SPLIT_GRANULE
    splits = triton.cdiv(Nk, keys_per_split)  # no split is left without keys
    if splits == 1:
        out = torch.empty((1, B, Cv, Nq), device=q.device, dtype=v.dtype)
    else:
        out = torch.empty((splits, B, Cv, Nq), device=q.device, dtype=torch.float32)
    lse = torch.empty((splits, B, Nq), device=q.device, dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(Nq, meta["BLOCK_M"]), B, splits)

    _forward_kernel[grid](
        q, k, v, mask_args[0], *g.factors, out, lse, float(scale) * _LOG2E, g.dwin, Nq, Nk, g.Lq, g.Lk, g.lo_q,
        g.lo_k, g.width_q, g.width_k, keys_per_split,
        D=D, CV=Cv, BLOCK_CV=_block_cv(Cv), PRECISION=_dot_precision(q.dtype, precision), HAS_MASK=mask_args[1],
        PATCH=g.patch,
    )
    if splits == 1:
        return out[0], lse[0]
    # Each split holds its keys' softmax-weighted mean and logsumexp: reweight by exp(lse_s - lse).
    total = torch.logsumexp(lse, dim=0)
    weights = torch.where(total == float("-inf"), 0.0, torch.exp(lse - total))  # -inf: all keys masked
    return (out * weights[:, :, None, :]).sum(0).to(v.dtype), total


def correspondence_warp_backward(grad_out, q, k, v, out, lse, scale, need_dq, need_dk, need_dv, key_mask=None,
                                 precision="ieee"):
    """(dq, dk, dv) in float32, None where not requested."""
    check_contiguous(grad_out, q, k, v, out, lse)
    dq, dk, dv, _, _ = _backward(grad_out, q, k, v, out, lse, scale, need_dq, need_dk, need_dv, key_mask, precision,
                                 _row_geometry(q, k))
    return dq, dk, dv


def correspondence_warp_windows_backward(grad_out, xq, mq, aq, xk, mk, ak, v, out, lse, patch, width_q, width_k, scale,
                                         need_dq, need_dk, need_dv, key_mask=None, precision="ieee"):
    """The backward on k x k windows (arguments as `correspondence_warp_windows_forward`, plus its out
    and lse on the query centres). Returns [planes_q (k*k, B, Nq, C), planes_k (k*k, B, Nk, C), dv,
    rows (2, B, Nq), cols (2, B, Nk)], None where not requested: one gradient plane per tap, each
    written by one program (no atomics), for the op layer to add (windows.sum_tap_planes)."""
    check_contiguous(grad_out, xq, mq, aq, xk, mk, ak, v, out, lse)
    g = _window_geometry(xq, mq, aq, xk, mk, ak, patch, width_q, width_k)
    return list(_backward(grad_out, xq, xk, v, out, lse, scale, need_dq, need_dk, need_dv, key_mask, precision, g))


def _backward(grad_out, q, k, v, out, lse, scale, need_dq, need_dk, need_dv, key_mask, precision, g: _Geometry):
    mask_ptr, has_mask = _mask_args(key_mask, q)
    B, D = q.shape[0], q.shape[2]
    Cv = v.shape[1]
    Nq, Nk, patch = g.Nq, g.Nk, g.patch
    taps = patch * patch
    delta = (grad_out.float() * out.float()).sum(1)  # (B, Nq)
    lse = lse.float()
    f32 = dict(device=q.device, dtype=torch.float32)
    common = dict(D=D, CV=Cv, BLOCK_CV=_block_cv(Cv), PRECISION=_dot_precision(q.dtype, precision), HAS_MASK=has_mask,
                  PATCH=patch)
    grid_args = (float(scale) * _LOG2E, float(scale), g.dwin, Nq, Nk, g.Lq, g.Lk, g.lo_q, g.lo_k, g.width_q, g.width_k)
    dq = dk = dv = rows = cols = None
    if need_dq:
        dq = torch.empty((taps, B, Nq, D) if patch > 1 else (B, Nq, D), **f32)
        rows = torch.empty((2, B, Nq) if patch > 1 else (1,), **f32)
        _backward_dq_kernel[lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), B)](
            q, k, v, mask_ptr, *g.factors, grad_out, lse, delta, dq, rows, *grid_args, **common,
        )
    if need_dk or need_dv:
        dk_buf = torch.empty(((taps, B, Nk, D) if patch > 1 else (B, Nk, D)) if need_dk else (1,), **f32)
        dv_buf = torch.empty((B, Cv, Nk) if need_dv else (1,), **f32)
        cols = torch.empty((2, B, Nk) if patch > 1 and need_dk else (1,), **f32)
        _backward_dkdv_kernel[lambda meta: (triton.cdiv(Nk, meta["BLOCK_N"]), B)](
            q, k, v, mask_ptr, *g.factors, grad_out, lse, delta, dk_buf, dv_buf, cols, *grid_args,
            NEED_DK=bool(need_dk), NEED_DV=bool(need_dv), **common,
        )
        dk = dk_buf if need_dk else None
        dv = dv_buf if need_dv else None
    return dq, dk, dv, rows if need_dq else None, cols if need_dk else None


# ----------------------------------------------------------------------------- prologue

@triton.jit
def _center_and_norm(x_cols, offs_n, mask_n, N, C: tl.constexpr, CENTER: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per position (column of the (C, N) map): the channel mean (0 without CENTER) and |x - mean|.
    Two passes rather than sum(x^2) - C mean^2, which cancels when the mean dwarfs the spread;
    the squares are taken of (x - mean) / max|x - mean|, so float32 features of magnitude 1e20
    (squares 1e40) or 1e-30 (squares 0) still get their norm."""
    mean = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if CENTER:
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            x = tl.load(x_cols + offs_c[:, None] * N + offs_n[None, :], mask=(offs_c[:, None] < C) & mask_n[None, :], other=0.0)
            mean += tl.sum(x.to(tl.float32), 0)
        mean = mean / C
    big = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = (offs_c[:, None] < C) & mask_n[None, :]
        x = tl.load(x_cols + offs_c[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
        c = tl.where(mask, x.to(tl.float32) - mean[None, :], 0.0)
        big = tl.maximum(big, tl.max(tl.abs(c), 0))
    scale = tl.where(big > 0, big, 1.0)
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = (offs_c[:, None] < C) & mask_n[None, :]
        x = tl.load(x_cols + offs_c[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
        c = tl.where(mask, (x.to(tl.float32) - mean[None, :]) / scale[None, :], 0.0)
        sq += tl.sum(c * c, 0)
    return mean, tl.sqrt(sq) * scale


@triton.jit
def _prologue_kernel(X, Rows, N, eps, C: tl.constexpr, CENTER: tl.constexpr, NORMALIZE: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n, pid_b = tl.program_id(0), tl.program_id(1)
    batch = pid_b.to(tl.int64)
    x_cols = X + batch * C * N
    rows = Rows + batch * N * C
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mean, norm = _center_and_norm(x_cols, offs_n, mask_n, N, C, CENTER, BLOCK_C, BLOCK_N)
    if NORMALIZE:
        inv = 1.0 / (norm + eps)
    else:
        inv = tl.full((BLOCK_N,), 1.0, dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = (offs_c[:, None] < C) & mask_n[None, :]
        x = tl.load(x_cols + offs_c[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
        f = tl.where(mask, (x.to(tl.float32) - mean[None, :]) * inv[None, :], 0.0)
        tl.store(rows + offs_n[None, :] * C + offs_c[:, None], f, mask=mask)


@triton.jit
def _prologue_backward_kernel(X, G, DX, N, eps, C: tl.constexpr, CENTER: tl.constexpr, NORMALIZE: tl.constexpr,
                              BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n, pid_b = tl.program_id(0), tl.program_id(1)
    batch = pid_b.to(tl.int64)
    x_cols = X + batch * C * N
    g_rows = G + batch * N * C
    dx_cols = DX + batch * C * N
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mean, norm = _center_and_norm(x_cols, offs_n, mask_n, N, C, CENTER, BLOCK_C, BLOCK_N)
    g_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    g_dot_c = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = (offs_c[:, None] < C) & mask_n[None, :]
        x = tl.load(x_cols + offs_c[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
        g = tl.load(g_rows + offs_n[None, :] * C + offs_c[:, None], mask=mask, other=0.0)
        g_sum += tl.sum(g, 0)
        g_dot_c += tl.sum(g * tl.where(mask, x.to(tl.float32) - mean[None, :], 0.0), 0)
    # f = c / s with s = |c| + eps: df/dc = I/s - c c^T / (s^2 |c|), and 0 radially where |c| = 0
    # (autograd's norm backward); centring then subtracts the channel mean of the gradient,
    # whose radial part has mean 0 because c does.
    # Evaluated as inv * (g - (c/|c|) (g . c/|c|) |c|/s): every factor stays in float32's range
    # even for |c| ~ 1e30 or 1e-30 (inv^2 / |c| would not).
    safe_norm = tl.where(norm > 0, norm, 1.0)
    if NORMALIZE:
        inv = 1.0 / (norm + eps)
        radial = tl.where(norm > 0, g_dot_c / safe_norm, 0.0) * (norm * inv)
    else:
        inv = tl.full((BLOCK_N,), 1.0, dtype=tl.float32)
        radial = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if CENTER:
        g_mean = g_sum / C
    else:
        g_mean = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = (offs_c[:, None] < C) & mask_n[None, :]
        x = tl.load(x_cols + offs_c[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
        g = tl.load(g_rows + offs_n[None, :] * C + offs_c[:, None], mask=mask, other=0.0)
        direction = (x.to(tl.float32) - mean[None, :]) / safe_norm[None, :]
        dx = ((g - g_mean[None, :]) - direction * radial[None, :]) * inv[None, :]
        tl.store(dx_cols + offs_c[:, None] * N + offs_n[None, :], dx, mask=mask)


_PROLOGUE_BLOCKS = dict(BLOCK_C=32, BLOCK_N=64)


def _prologue_supported(center, patch_size) -> bool:
    # Patch unfolding and spatial centring (a mean across positions) stay in PyTorch.
    return patch_size == 1 and center in ("channel", None)


def prepare_features(x, center, normalize, patch_size, eps, dtype):
    """(B, C, H, W) -> rows (B, N, C) in `dtype`, centred/normalised in float32; None where the
    op layer's PyTorch prologue must do it (patches, spatial centring)."""
    if not _prologue_supported(center, patch_size):
        return None
    B, C = x.shape[:2]
    xs = x.reshape(B, C, -1).contiguous()
    N = xs.shape[2]
    rows = torch.empty((B, N, C), device=x.device, dtype=dtype)
    _prologue_kernel[(triton.cdiv(N, _PROLOGUE_BLOCKS["BLOCK_N"]), B)](
        xs, rows, N, float(eps), C=C, CENTER=center == "channel", NORMALIZE=bool(normalize), **_PROLOGUE_BLOCKS)
    return rows


def prepare_features_backward(grad_rows, x, center, normalize, patch_size, eps):
    """Gradient w.r.t. x (float32, x's shape) of `prepare_features` given float32 `grad_rows`;
    None where `prepare_features` is None."""
    if not _prologue_supported(center, patch_size):
        return None
    B, C = x.shape[:2]
    xs = x.reshape(B, C, -1).contiguous()
    N = xs.shape[2]
    dx = torch.empty((B, C, N), device=x.device, dtype=torch.float32)
    _prologue_backward_kernel[(triton.cdiv(N, _PROLOGUE_BLOCKS["BLOCK_N"]), B)](
        xs, grad_rows.float().contiguous(), dx, N, float(eps), C=C, CENTER=center == "channel",
        NORMALIZE=bool(normalize), **_PROLOGUE_BLOCKS)
    return dx.view(x.shape)


__all__ = ["correspondence_warp_backward", "correspondence_warp_forward",
           "correspondence_warp_windows_backward", "correspondence_warp_windows_forward", "input_dtype",
           "prepare_features", "prepare_features_backward"]
