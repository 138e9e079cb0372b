"""The implementations of correspondence_warp that the benchmark suite compares (see run.py).

Each takes the raw features query, key (B, C, H, W) and the value (B, Cv, H, W) and computes
softmax(theta^T phi / temperature) @ value with theta, phi the channel-centred, L2-normalised
features; every one but the fused backends and the reference does that prologue with the same
plain differentiable PyTorch (`cocos_kernels.features.normalize_features`) inside the timed call:

- reference:   `backend="reference"`, the materialised matmul-softmax-matmul (CoCosNet's code);
- chunked:     a loop over blocks of QUERY_CHUNK query rows, each materialising its rows of the
               softmax: the obvious user workaround. It saves memory in a forward under no_grad
               only: in training autograd keeps every block's probabilities, N^2 again;
- key_chunked: Rabe & Staats (arXiv 2112.05682): query blocks of 1024 rows, key blocks of 4096,
               each key block summarised (row max, sum of exponentials, exponentials @ value)
               under torch.utils.checkpoint and the summaries combined by their max: the
               no-kernel O(sqrt N) baseline;
- sdpa-<backend>[-pad-8|-pad-C]: F.scaled_dot_product_attention on the normalised features with
               scale=1/temperature, restricted to one SDPA backend (flash, efficient, cudnn,
               math). A backend declining the inputs is recorded as "refused" with its reasons.
               "-pad-8" zero-pads the value width to a multiple of 8 (the memory-efficient kernel
               takes a value width other than C only then), "-pad-C" to C (the flash kernels
               need value width == C); the padding is sliced off the output;
- keops:       pykeops' sumsoftmaxweight reduction (an optional extra: "refused" if not installed);
- every fused backend of `cocos_kernels.BACKENDS` for the device (cpu; triton, cuda on CUDA).
"""
from __future__ import annotations

import math
import re
import warnings

from benchmarks.harness import SEED, Refused

__all__ = ["check", "flops", "implementation", "impls", "make_step"]

TEMPERATURE = 0.01
QUERY_CHUNK = 1024  # the chunked loop's rows per block; also Rabe & Staats' query block
KEY_CHUNK = 4096  # Rabe & Staats' key block
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
# impl -> how the value is padded ("8": to a multiple of 8, "C": to the feature width C)
SDPA_IMPLS = {"sdpa-flash": None, "sdpa-flash-pad-C": "C", "sdpa-efficient": None, "sdpa-efficient-pad-8": "8",
              "sdpa-cudnn": None, "sdpa-math": None}
BASELINES = ("reference", "chunked", "key_chunked", *SDPA_IMPLS, "keops")


def impls(device: str) -> list[str]:
    """Every implementation to run on `device`: the baselines, then the fused backends registered
    for it (whether they can run here is decided, and recorded, by each config's worker)."""
    import cocos_kernels as ck

    return [*BASELINES, *(name for name, b in ck.BACKENDS.items() if b.fused and device in b.devices)]


def flops(config: dict) -> float:
    """Useful FLOPs of one call: a forward is 2 * Nq * Nk * (C + Cv) per batch element (scores and
    value product); forward+backward counts 3.5x that (FlashAttention's convention: the backward
    recomputes the scores and does four products)."""
    n = config["side"] ** 2
    width = config["channels"] * config.get("patch_size", 1) ** 2  # D: C, or 9C with 3x3 patches
    forward = 2.0 * config["batch"] * n * n * (width + config["value_channels"])
    return forward if config["mode"] == "forward" else 3.5 * forward


def _prologue(x, patch_size=1):
    """(B, C, H, W) -> (B, N, C * patch_size^2): (unfolded,) centred, L2-normalised rows, differentiable."""
    from cocos_kernels.features import DEFAULT_EPS, normalize_features

    return normalize_features(x, "channel", True, patch_size, DEFAULT_EPS).transpose(1, 2)


def _rows(v):
    """(B, Cv, H, W) -> (B, N, Cv)."""
    return v.flatten(2).transpose(1, 2)


def _chunked(q, k, v, patch_size=1):
    import torch

    qh, kt, vr = _prologue(q, patch_size), _prologue(k, patch_size).transpose(1, 2), _rows(v)
    out = torch.cat([torch.softmax(qh[:, i:i + QUERY_CHUNK] @ kt / TEMPERATURE, dim=-1) @ vr
                     for i in range(0, qh.shape[1], QUERY_CHUNK)], dim=1)
    return out.transpose(1, 2).reshape(v.shape[0], v.shape[1], *q.shape[2:])


def _summarize(qc, kc, vc):
    """One key block's (exp(s - m) @ v, sum of exp(s - m), m) for a block of query rows."""
    s = qc @ kc.transpose(1, 2) / TEMPERATURE
    m = s.amax(dim=-1, keepdim=True).detach()  # any per-row shift is exact; no gradient through it
    e = (s - m).exp()
    return e @ vc, e.sum(dim=-1, keepdim=True), m


def _key_chunked(q, k, v, patch_size=1):
    import torch
    from torch.utils.checkpoint import checkpoint

    qh, kh, vr = _prologue(q, patch_size), _prologue(k, patch_size), _rows(v)
    blocks = []
    for i in range(0, qh.shape[1], QUERY_CHUNK):
        parts = [checkpoint(_summarize, qh[:, i:i + QUERY_CHUNK], kh[:, j:j + KEY_CHUNK], vr[:, j:j + KEY_CHUNK],
                            use_reentrant=False) for j in range(0, kh.shape[1], KEY_CHUNK)]
        values, sums, maxes = (torch.stack(t) for t in zip(*parts))
        w = (maxes - maxes.amax(dim=0)).exp()
        blocks.append((values * w).sum(dim=0) / (sums * w).sum(dim=0))
    return torch.cat(blocks, dim=1).transpose(1, 2).reshape(v.shape[0], v.shape[1], *q.shape[2:])


def _sdpa(impl: str):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    name = impl.split("-")[1]
    backend = getattr(SDPBackend, {"math": "MATH"}.get(name, f"{name.upper()}_ATTENTION"), None)
    if backend is None:
        raise Refused(f"this torch has no SDPBackend for {name!r}")
    pad = SDPA_IMPLS[impl]

    def run(q, k, v, patch_size=1):
        cv = v.shape[1]
        width = {None: cv, "8": 8 * math.ceil(cv / 8), "C": max(cv, q.shape[1] * patch_size ** 2)}[pad]
        vr = F.pad(_rows(v), (0, width - cv)).unsqueeze(1)
        with warnings.catch_warnings(record=True) as caught, sdpa_kernel([backend]):
            warnings.simplefilter("always")
            try:
                # The fused SDPA kernels want unit stride in the last dimension: one O(N*C) copy each.
                out = F.scaled_dot_product_attention(_prologue(q, patch_size).contiguous().unsqueeze(1),
                                                     _prologue(k, patch_size).contiguous().unsqueeze(1), vr,
                                                     scale=1.0 / TEMPERATURE)
            except RuntimeError as e:
                if not any(s in str(e) for s in ("No available kernel", "No viable backend")):
                    raise
                # torch gives each kernel's reasons for declining as warnings, the error only says "none".
                reasons = [re.sub(r"\s*\(Triggered internally at [^)]*\)\.?", "", " ".join(str(w.message).split()))
                           for w in caught]
                raise Refused(" ".join(r for r in reasons if r)
                              or f"no {name} SDPA kernel for {q.device.type} {q.dtype} inputs in this torch") from None
        return out.squeeze(1)[..., :cv].transpose(1, 2).reshape(v.shape[0], cv, *q.shape[2:])
    return run


def _keops(q, k, v, patch_size=1):
    try:
        from pykeops.torch import LazyTensor
    except ImportError as e:
        raise Refused(f"pykeops is not installed (optional: pip install -e '.[bench]'): {e}") from None
    qi = LazyTensor(_prologue(q, patch_size)[:, :, None, :].contiguous())
    kj = LazyTensor(_prologue(k, patch_size)[:, None, :, :].contiguous())
    vj = LazyTensor(_rows(v)[:, None, :, :].contiguous())
    out = ((qi * kj).sum(-1) / TEMPERATURE).sumsoftmaxweight(vj, axis=2)  # (B, Nq, Cv)
    return out.transpose(1, 2).reshape(v.shape[0], v.shape[1], *q.shape[2:])


def _fused(impl: str, device, dtype):
    import cocos_kernels as ck

    try:
        ck.select(impl, device, dtype, op="correspondence_warp")
    except ValueError as e:
        raise Refused(str(e)) from None
    return lambda q, k, v, patch_size=1: ck.correspondence_warp(q, k, v, TEMPERATURE, patch_size=patch_size,
                                                                backend=impl)


def implementation(impl: str, device, dtype):
    """impl name -> callable(query, key, value, patch_size=1) -> out (B, Cv, H, W); Refused where it cannot run."""
    import cocos_kernels as ck

    if impl == "reference":
        return lambda q, k, v, patch_size=1: ck.reference.correspondence_warp(q, k, v, TEMPERATURE, patch_size=patch_size)
    named = {"chunked": _chunked, "key_chunked": _key_chunked, "keops": _keops}
    if impl in named:
        return named[impl]
    if impl in SDPA_IMPLS:
        return _sdpa(impl)
    return _fused(impl, device, dtype)


def check(impl: str, device: str = "cpu", side: int = 65) -> None:
    """Raise unless `impl`'s output and gradients (query, key, value) equal the reference's in float64
    (to 1e-9) at a side x side grid, batch 1, C=8, Cv=3; at 65 (N = 4225) past the edges of both the
    query and key blocks, neither dividing N. Refused where the implementation declines the inputs."""
    import torch

    g = torch.Generator().manual_seed(SEED)
    q, k = (torch.randn(1, 8, side, side, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    v, grad = (torch.rand(1, 3, side, side, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    results = []
    for name in ("reference", impl):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = implementation(name, torch.device(device), torch.float64)(*inputs)
        out.backward(grad)
        results.append([out, *(t.grad for t in inputs)])
    for what, expected, got in zip(("output", "grad query", "grad key", "grad value"), *results):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9, msg=lambda m, what=what: f"{what}: {m}")


def make_step(config: dict, side: int):
    """Inputs of this config at `side`, and a function running one call of its impl and mode:
    "forward" under torch.no_grad(), "forward+backward" with query, key and value requiring grad
    and out.backward() of a fixed random gradient."""
    import torch

    device, dtype = torch.device(config["device"]), getattr(torch, config["dtype"])
    run = implementation(config["impl"], device, dtype)
    gen = torch.Generator().manual_seed(SEED)
    B, C, Cv = config["batch"], config["channels"], config["value_channels"]
    patch = config.get("patch_size", 1)
    query, key = (torch.randn(B, C, side, side, generator=gen).to(device, dtype) for _ in range(2))
    value = torch.rand(B, Cv, side, side, generator=gen).to(device, dtype)

    if config["mode"] == "forward":
        def step():
            with torch.no_grad():
                run(query, key, value, patch)
        return step

    grad_out = torch.randn(B, Cv, side, side, generator=gen).to(device, dtype)
    inputs = (query, key, value)
    for t in inputs:
        t.requires_grad_(True)

    def step():
        for t in inputs:
            t.grad = None  # drop the previous call's gradients rather than accumulating into them
        run(query, key, value, patch).backward(grad_out)
    return step


if __name__ == "__main__":  # the suite restricted to this op: python -m benchmarks.run --ops correspondence_warp
    from benchmarks import run

    run.main(["--ops", "correspondence_warp", *__import__("sys").argv[1:]])
