"""The accuracy rule every fused result is judged by, in the tests and the GPU check alike.

A fused result in float32, float16 or bfloat16 is compared with the float64 evaluation of the
materialised reference (`ref64`) and allowed what the materialised PyTorch path itself gets wrong at
the same dtype and matmul precision (`same_precision`), as FlashAttention's tests do:

    relative_error(actual, ref64) <= factor * relative_error(same_precision, ref64) + FLOORS[dtype]

so tolerances follow the problem (temperature, magnitudes, shape) instead of being tuned per case.
A float64 result has no lower-precision yardstick: it is held to a plain relative bound `rtol`.

    from cocos_kernels.testing import assert_close
    out = ck.correspondence_warp(q, k, v)                                        # float32
    same = ck.correspondence_warp(q, k, v, backend="reference")                  # float32, materialised
    ref64 = ck.reference.correspondence_warp(q.double(), k.double(), v.double())
    assert_close(out, ref64, same, name="out")
"""
from __future__ import annotations

import torch

# Allowed multiple of the materialised path's error, outputs and gradients alike.
FACTOR = 2.0
# The fused kernels recompute each softmax weight as exp(s - lse) from float32 logits s and their
# logsumexp, both rounded at eps * |s|: a relative error of up to 2 * eps * max |s| in every weight
# that the materialised softmax, exp(s - max s), exact at the maximum, does not make. The floors
# below hold for logits up to LOGIT_SCALE (temperature 0.01 on unit features); `softmax_floor`
# raises them for larger ones.
LOGIT_SCALE = 100.0
# A float64 result against the float64 reference: only the summation order differs.
FLOAT64_RTOL = 1e-9
# Added to the bound, per dtype of the result under test, because the materialised path's error
# can be near zero by accident where a fused kernel's is not. float32: the recomputed weights'
# rounding above; float16 and bfloat16 (computed in float32 by the fused kernels): one unit of
# rounding at magnitude 1 (2**-10, 2**-7), twice what storing the result in that dtype costs;
# float64: its materialised peer is the reference itself, so the floor is the whole bound.
FLOORS = {
    torch.float32: 2 * LOGIT_SCALE * torch.finfo(torch.float32).eps,
    torch.float16: 2.0 ** -10,
    torch.bfloat16: 2.0 ** -7,
    torch.float64: FLOAT64_RTOL,
}


def softmax_floor(dtype: torch.dtype, max_logit: float) -> float:
    """FLOORS[dtype], or the recomputed weights' rounding where the largest |logit| (score /
    temperature) exceeds LOGIT_SCALE, whichever is larger."""
    eps = torch.finfo(torch.promote_types(dtype, torch.float32)).eps
    return max(FLOORS[dtype], 2 * eps * max_logit)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(1, max |expected|): scaled by the largest reference magnitude,
    not element-wise, so that gradients reaching 1/temperature = 100 next to entries near zero are
    judged at their own scale. Entries where `expected` is not finite must equal it (NaN matching
    NaN); any other mismatch in finiteness is an infinite error."""
    actual, expected = (t.detach().to("cpu", torch.float64) for t in (actual, expected))
    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: {tuple(actual.shape)} != {tuple(expected.shape)}")
    finite = torch.isfinite(expected)
    same_nonfinite = (actual == expected) | (actual.isnan() & expected.isnan())
    if not (torch.isfinite(actual) | ~finite).all() or not (same_nonfinite | finite).all():
        return float("inf")
    if not finite.any():
        return 0.0
    scale = max(1.0, expected[finite].abs().max().item())
    return (actual[finite] - expected[finite]).abs().max().item() / scale


def _worst(actual: torch.Tensor, expected: torch.Tensor, n: int = 5) -> str:
    actual, expected = (t.detach().to("cpu", torch.float64) for t in (actual, expected))
    err = (actual - expected).abs()
    # A non-finite where the reference is finite is the worst there is.
    err = torch.where(torch.isfinite(actual) | ~torch.isfinite(expected), err.nan_to_num(0.0), torch.inf)
    rows = []
    for i in torch.topk(err.flatten(), min(n, err.numel())).indices.tolist():
        at = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), err.shape))
        rows.append(f"  at {at}: got {actual.flatten()[i].item():.8g}, expected {expected.flatten()[i].item():.8g}")
    return "\n".join(rows)


def bound(same_precision_error: float, dtype: torch.dtype, factor: float = FACTOR, floor: float | None = None) -> float:
    """The largest error the rule allows a result of `dtype` whose materialised peer is off by
    `same_precision_error`."""
    return factor * same_precision_error + (FLOORS[dtype] if floor is None else floor)


def assert_close(actual: torch.Tensor, ref64: torch.Tensor, same_precision: torch.Tensor | None = None, *,
                 name: str = "", rtol: float | None = None, floor: float | None = None,
                 factor: float = FACTOR) -> None:
    """Raise an AssertionError, listing the worst elements, unless `actual` is within the rule's
    bound of the float64 reference `ref64`.

    With `same_precision` (the materialised path on the same inputs at `actual`'s dtype and
    precision) the bound is `factor * relative_error(same_precision, ref64) + floor`, the floor
    being FLOORS[actual.dtype] unless given. Without it the bound is `rtol`, FLOAT64_RTOL by
    default for a float64 result; a lower-precision result needs one or the other.
    """
    label = f"{name}: " if name else ""
    if same_precision is not None:
        yardstick = relative_error(same_precision, ref64)
        if yardstick == float("inf"):
            raise AssertionError(f"{label}the materialised path is not finite where the float64 reference is: "
                                 "it cannot be the yardstick here")
        floor = FLOORS[actual.dtype] if floor is None else floor
        allowed = bound(yardstick, actual.dtype, factor, floor)
        rule = f"{factor:g} * {yardstick:.3g} (materialised {actual.dtype}) + {floor:.3g}"
    elif rtol is not None or actual.dtype == torch.float64:
        allowed = FLOAT64_RTOL if rtol is None else rtol
        rule = f"rtol {allowed:g}"
    else:
        raise TypeError(f"{label}a {actual.dtype} result is judged against same_precision= or an explicit rtol=")
    err = relative_error(actual, ref64)
    if not err <= allowed:
        raise AssertionError(f"{label}relative error {err:.3g} > {allowed:.3g} = {rule} "
                             f"(max |error| / max(1, max |float64|))\n{_worst(actual, ref64)}")
