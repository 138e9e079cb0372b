"""GPU check of the fused GPU backends (triton, cuda): tests, accuracy per precision, timings.

    python benchmarks/gpu_check.py              # on a machine with a CUDA GPU: at most ~9.5 min (--deadline-s)
    python benchmarks/gpu_check.py --dry-run    # CPU smoke run of the same code (Triton interpreter)

Phases, each in its own process so that each sets up Triton as it needs:
  0. build:    the CUDA extension of the "cuda" backend (JIT, cached for the later phases); if it
               fails, the later phases run with COCOS_KERNELS_CUDA_BUILD=0 (no retries) and the
               "cuda" rows say why they were skipped;
  1. tests:    `pytest <the op tests> --device cuda` (GPU_TESTS; Triton autotuning off: the suite sweeps dozens of
               shapes, and every new (D, Cv, dtype) would compile and time every config);
  2. accuracy: forward and gradients of each fused GPU backend against the float64 reference at
               16^2..128^2 grids, patch sizes 1 and 3, temperature 0.01, for every precision (float32 with ieee,
               tf32x3 and tf32 products -- cuda has full float32 only; float16; bfloat16). A mode
               passes when its error is at most 2x (3x for gradients) the error of the
               materialised PyTorch path at the same precision, plus an absolute floor of 1e-5
               (FlashAttention's criterion);
  3. timing:   forward and forward+backward of the materialised reference, scaled_dot_product_
               attention with each SDPA backend (benchmarks/bench_correspondence_warp.py's wrappers:
               prologue included, value padded for the flash / efficient kernels) and
               the triton and cuda backends, at 64^2, 128^2, 256^2 grids, C=256, Cv=3 and 48,
               batch 4, in float32 and bfloat16: median time (triton.testing.do_bench), peak memory
               beyond the inputs (torch.cuda.max_memory_allocated), TFLOP/s and the ratio to the
               reference;
  4. contextual_loss: every backend implementing it against float64 (loss, grad x, grad y; the
               same bound as phase 2), then the reference against each fused backend,
               forward+backward in float32, batch 1, at the VGG-19 layers CoCosNet's loss sees
               (relu2_2 at side/2 with 128 channels, relu3_2 /4 256, relu4_2 /8 512, relu5_2 /16
               512), unpooled, for 256, 512 and 1024 px images: time and peak memory; an OOM is
               recorded, and a row whose predicted time (from the impl's rate on the smaller rows)
               exceeds what is left of --contextual-budget-s is skipped with that prediction.
  5. train_step: one CoCosNet training step (benchmarks/bench_train_step.py: ADE20K recipe, batch 1,
               steady state) at 512 and 1024 px, materialised (reference) vs triton with and without
               --activation_checkpointing, each in a fresh process under an 80 GiB cap (the card's
               memory if smaller): peak and total memory, time per step; configs in TRAIN_STEP_CONFIGS
               order until --train-step-budget-s is spent. Targets: at 512 px the fused model's total
               < 1/4 of the materialised one's, and 1024 px fits in 80 GiB.
Writes benchmarks/results/gpu_check_<card>.md and .json, and exits non-zero if the cuda build or a
test fails, an accuracy bound is broken or a timed fused output is wrong (non-finite, or off the
float32 reference).

FLOPs: a forward counts 2 * Nq * Nk * (C + Cv) per batch element (scores and value product);
forward+backward counts 3.5x that (the backward recomputes the scores and does four products).
The timing phase stops starting new measurements after --budget-s seconds of the whole run, so
a slow card still finishes (the rows it skipped say so); the most important rows go first.
Deadline: no phase or measurement starts after --deadline-s seconds of the whole run (default 540,
under the device tool's 600 s per command), each phase's time limit is cut to what is left, and the
report is rewritten after every phase: a run stopped from outside still leaves what it finished.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import itertools
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(ROOT))
TEMPERATURE = 0.01
ACCURACY_MODES = {  # name: (dtype, precision= of the triton backend, torch float32 matmul precision)
    "float32-ieee": ("float32", "ieee", "highest"),
    "float32-tf32x3": ("float32", "tf32x3", "high"),
    "float32-tf32": ("float32", "tf32", "medium"),
    "float16": ("float16", None, "highest"),
    "bfloat16": ("bfloat16", None, "highest"),
}
ERROR_FACTOR = {"out": 2.0, "grad query": 3.0, "grad key": 3.0, "grad value": 3.0, "loss": 2.0, "grad x": 3.0,
                "grad y": 3.0}
ERROR_FLOOR = 1e-5
# The triton backend's timed output against the float32 reference, relative to its largest magnitude.
TIMING_RTOL = {"float32": 1e-3, "float16": 3e-2, "bfloat16": 1e-1}
# The fused GPU backends of correspondence_warp under test: checked, timed, and failing the run when wrong.
FUSED_GPU = ("triton", "cuda")
# Phase 1: the op tests that take --device cuda, most important first (the phase has a time limit).
# They include determinism (bit-identical reruns of every fused backend), key masks, top-k, the
# cycle, the image warp and the window form of patches; the CPU-only suites (builds, cocosnet,
# benchmarks) are left out.
GPU_TESTS = ("tests/test_correspondence_warp.py", "tests/test_windows.py", "tests/test_key_mask.py",
             "tests/test_cycle_warp.py", "tests/test_contextual_loss.py", "tests/test_correspondence_warp_triton.py",
             "tests/test_correspondence_topk.py", "tests/test_warp_image.py", "tests/test_check_finite.py",
             "tests/test_properties.py")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="run on CPU tensors through the Triton interpreter at tiny shapes, without pytest: "
                        "checks the measuring and table code, not the GPU")
    p.add_argument("--skip-tests", action="store_true", help="skip phase 1 (pytest)")
    p.add_argument("--test-paths", nargs="+", default=list(GPU_TESTS), help="what phase 1 runs (default: %(default)s)")
    # Defaults: (GPU run, --dry-run); see DEFAULTS.
    p.add_argument("--sides", type=int, nargs="+", help="timing grid sides (64 128 256; dry run: 4 6)")
    p.add_argument("--accuracy-sides", type=int, nargs="+", help="accuracy grid sides (16 32 64 128; dry run: 4)")
    p.add_argument("--accuracy-patches", type=int, nargs="+", default=[1, 3],
                   help="accuracy patch sizes (3: the window kernels, CoCosNet's match_kernel; default: %(default)s)")
    p.add_argument("--channels", type=int, help="feature channels C (256; dry run: 8)")
    p.add_argument("--value-channels", type=int, nargs="+", help="timing value channels Cv (3 48; dry run: 3)")
    p.add_argument("--batch", type=int, help="timing batch size (4; dry run: 1)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "float16", "bfloat16"],
                   help="timing dtypes")
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="start no timing measurement after this many seconds of the whole run")
    p.add_argument("--test-timeout-s", type=float, default=200.0, help="limit of phase 1")
    p.add_argument("--build-timeout-s", type=float, default=300.0, help="limit of phase 0 (the CUDA build)")
    p.add_argument("--contextual-images", type=int, nargs="+",
                   help="contextual_loss image sides in px (256 512 1024; dry run: 16)")
    p.add_argument("--contextual-budget-s", type=float, default=45.0,
                   help="start no contextual_loss timing after this many seconds of its phase")
    p.add_argument("--train-step-budget-s", type=float, default=120.0,
                   help="start no training-step config after this many seconds of its phase (0: skip the phase)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--phase", choices=["accuracy", "timing", "contextual", "train_step"], help=argparse.SUPPRESS)  # internal: one phase, JSON out
    p.add_argument("--deadline-s", type=float, default=540.0,
                   help="start nothing after this many seconds of the whole run; the report is written after "
                        "every phase")
    p.add_argument("--started", type=float, default=None, help=argparse.SUPPRESS)
    return p


DEFAULTS = {  # option: (GPU run, dry run)
    "sides": ([64, 128, 256], [4, 6]),
    "accuracy_sides": ([16, 32, 64, 128], [4]),
    "channels": (256, 8),
    "value_channels": ([3, 48], [3]),
    "batch": (4, 1),
    "contextual_images": ([256, 512, 1024], [16]),
}
# Phase 5, most important first ("fused": triton on the GPU, cpu in the dry run).
TRAIN_STEP_CONFIGS = {  # (side, impl, activation checkpointing)
    "gpu": ((512, "reference", False), (512, "fused", True), (1024, "fused", True), (512, "fused", False),
            (1024, "fused", False)),
    "dry": ((64, "reference", False), (64, "fused", True)),
}
TRAIN_STEP_CAP_GB = 80.0
DEADLINE_GRACE_S = 30.0  # past --deadline-s: a running measurement may finish, then the phase is killed
# contextual_loss: VGG-19 layer -> (channels, image side / feature side), as CoCosNet uses them.
CONTEXTUAL_LAYERS = {"relu2_2": (128, 2), "relu3_2": (256, 4), "relu4_2": (512, 8), "relu5_2": (512, 16)}
CONTEXTUAL_BANDWIDTH = 0.1
CONTEXTUAL_DRY_CHANNELS = 16  # the dry run divides the layers' channels by this


def _environment(dry_run: bool, autotune: bool) -> dict:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1" if dry_run else "0"
    env["COCOS_KERNELS_TRITON_AUTOTUNE"] = "1" if autotune else "0"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


# ----------------------------------------------------------------------------- phase processes

def _setup(dry_run: bool):
    import torch

    import cocos_kernels as ck

    device = torch.device("cpu" if dry_run else "cuda")
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --dry-run for the CPU smoke run)")
    return torch, ck, device


def _rel_err(actual, expected) -> float:
    import torch

    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(actual).all():
        return math.inf
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1.0)).item()


def _warp_and_grads(ck, q, k, v, grad, **kwargs):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = ck.correspondence_warp(q, k, v, TEMPERATURE, **kwargs)
    out.backward(grad.to(out.dtype))
    return {"out": out, "grad query": q.grad, "grad key": k.grad, "grad value": v.grad}


def _judged(exact: dict, mine: dict, theirs: dict) -> dict:
    """status and errors of a fused result `mine` against float64 `exact`, next to the materialised `theirs`."""
    errors = {name: (_rel_err(mine[name], exact[name]), _rel_err(theirs[name], exact[name])) for name in exact}
    broken = [name for name, (e_mine, e_ref) in errors.items()
              if not e_mine <= ERROR_FACTOR[name] * e_ref + ERROR_FLOOR]
    return {"status": "ok" if not broken else "FAILED: " + ", ".join(broken),
            "errors": {name: {"fused": a, "materialised": b} for name, (a, b) in errors.items()}}


def accuracy_phase(args) -> list[dict]:
    torch, ck, device = _setup(args.dry_run)
    rows = []
    cv = 48
    for side, patch_size in itertools.product(args.accuracy_sides, args.accuracy_patches):
        g = torch.Generator().manual_seed(side)
        q, k = (torch.randn(1, args.channels, side, side, generator=g, dtype=torch.float64) for _ in range(2))
        v = torch.randn(1, cv, side, side, generator=g, dtype=torch.float64)
        grad = torch.randn(1, cv, side, side, generator=g, dtype=torch.float64)
        q, k, v, grad = (t.to(device) for t in (q, k, v, grad))
        exact = _warp_and_grads(ck, q, k, v, grad, backend="reference", patch_size=patch_size)
        for (mode, (dtype_name, precision, matmul_precision)), backend in itertools.product(
                ACCURACY_MODES.items(), FUSED_GPU):
            dtype = getattr(torch, dtype_name)
            row = {"backend": backend, "mode": mode, "side": side, "patch_size": patch_size, "channels": args.channels,
                   "value_channels": cv}
            reason = ck.BACKENDS[backend].refusal(device, dtype)
            if reason is None and precision not in (None, "ieee") and not ck.BACKENDS[backend].precision_arg:
                reason = "no precision= (its float32 products are full float32)"
            if reason is not None:
                rows.append(row | {"status": f"skipped: {reason}"})
                continue
            inputs = [t.to(dtype) for t in (q, k, v, grad)]
            kwargs = {"precision": precision} if ck.BACKENDS[backend].precision_arg else {}
            previous = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision(matmul_precision)
            try:
                mine = _warp_and_grads(ck, *inputs, backend=backend, patch_size=patch_size, **kwargs)
                theirs = _warp_and_grads(ck, *inputs, backend="reference", patch_size=patch_size)
            finally:
                torch.set_float32_matmul_precision(previous)
            rows.append(row | _judged(exact, mine, theirs))
            del mine, theirs, inputs
        del exact
        gc.collect()
    return rows


def _flops(B, n, c, cv, mode) -> float:
    forward = 2.0 * n * n * (c + cv) * B
    return forward if mode == "forward" else 3.5 * forward


def _timer(torch, device):
    if device.type == "cuda":
        import triton.testing

        def bench(fn, grads):
            return triton.testing.do_bench(fn, warmup=10, rep=40, grad_to_none=grads, quantiles=[0.5, 0.2, 0.8])
        return bench

    def bench(fn, grads):  # the dry run: a few perf_counter calls
        times = []
        for _ in range(3):
            for t in grads:
                t.grad = None
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        times.sort()
        return [times[1], times[0], times[-1]]
    return bench


def _timed_impls() -> tuple[str, ...]:
    """What phase 3 times: the benchmark suite's implementations (benchmarks/bench_correspondence_warp.py:
    the same SDPA wrappers, prologue included, value padded where the name says)."""
    from benchmarks.bench_correspondence_warp import SDPA_IMPLS

    return ("reference", *FUSED_GPU, *SDPA_IMPLS)


def _truth(torch, ck, q, k, v):
    """The float32 reference ("highest" precision) of these inputs, in blocks of query rows and
    one batch element at a time, so that it fits where the whole materialised call does not
    (exact for channel centring, which is per position)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    rows = max(1, (1 << 28) // (k.shape[2] * k.shape[3] * q.shape[3] * 4))  # ~1 GiB of scores a block
    try:
        with torch.no_grad():
            return torch.cat([
                torch.cat([ck.reference.correspondence_warp(q[b:b + 1, :, r:r + rows].float(), k[b:b + 1].float(),
                                                            v[b:b + 1].float(), TEMPERATURE)
                           for r in range(0, q.shape[2], rows)], dim=2)
                for b in range(q.shape[0])])
    finally:
        torch.set_float32_matmul_precision(previous)


def timing_phase(args) -> list[dict]:
    from benchmarks.bench_correspondence_warp import implementation
    from benchmarks.harness import Refused

    torch, ck, device = _setup(args.dry_run)
    bench = _timer(torch, device)
    started = args.started or time.time()
    rows, truths = [], {}
    # The targets' rows first: 128^2 float32 and 256^2 bfloat16 forward+backward.
    order = sorted(
        ((d, cv, side, mode) for d in args.dtypes for cv in args.value_channels for side in args.sides
         for mode in ("forward+backward", "forward")),
        key=lambda c: (c[3] != "forward+backward", c[1] != args.value_channels[0], c[2] not in (128, 256), c[0]),
    )
    for dtype_name, cv, side, mode in order:
        dtype = getattr(torch, dtype_name)
        g = torch.Generator().manual_seed(0)
        B, C = args.batch, args.channels
        q, k = (torch.randn(B, C, side, side, generator=g).to(device, dtype) for _ in range(2))
        v = torch.rand(B, cv, side, side, generator=g).to(device, dtype)
        grad = torch.randn(B, cv, side, side, generator=g).to(device, dtype)
        if (dtype_name, cv, side) not in truths and _within(started, args.budget_s, _deadline(args)):
            truths[dtype_name, cv, side] = _truth(torch, ck, q, k, v)  # same seed: same inputs in both modes
        expected = truths.get((dtype_name, cv, side))
        for name in _timed_impls():
            row = {"impl": name, "dtype": dtype_name, "side": side, "value_channels": cv, "mode": mode,
                   "batch": B, "channels": C}
            rows.append(row)
            if not _within(started, args.budget_s, _deadline(args)):
                row["status"] = "skipped: time budget"
                continue
            try:
                impl = implementation(name, device, dtype)
            except Refused as e:
                row["status"] = f"skipped: {e}"
                continue
            backward = mode == "forward+backward"
            inputs = [t.detach().requires_grad_(backward) for t in (q, k, v)]

            def step():
                if backward:
                    impl(*inputs).backward(grad)
                else:
                    with torch.no_grad():
                        return impl(*inputs)
            out = None
            try:
                with torch.no_grad():
                    out = impl(*inputs)  # compiles/autotunes outside the memory measurement
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    row["peak_bytes"] = torch.cuda.max_memory_allocated() - base
                median, low, high = bench(step, [t for t in inputs if t.requires_grad])
            except Exception as e:  # noqa: BLE001 -- recorded in the row; the run goes on
                message = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                if isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)):
                    row["status"] = "OOM"
                elif isinstance(e, Refused):  # an SDPA kernel declining these inputs, with torch's reasons
                    row["status"] = "unsupported"
                else:
                    row["status"] = f"FAILED: {type(e).__name__}: {message}"
                row["error"] = message
            else:
                row.update(status="ok", time_ms=median, time_ms_p20=low, time_ms_p80=high,
                           tflops=_flops(B, side * side, C, cv, mode) / (median * 1e-3) / 1e12)
                if expected is not None:
                    row["error_vs_float32"] = _rel_err(out, expected)
                # Only the backend under test fails the check; the others' errors are information.
                if name in FUSED_GPU and not torch.isfinite(out).all():
                    row["status"] = "FAILED: non-finite output"
                elif name in FUSED_GPU and row.get("error_vs_float32", 0.0) > TIMING_RTOL[dtype_name]:
                    row["status"] = f"FAILED: output off the float32 reference by {row['error_vs_float32']:.3g}"
            finally:
                inputs = out = None
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def _contextual_and_grads(ck, x, y, grad, backend):
    x, y = (t.detach().requires_grad_() for t in (x, y))
    loss = ck.contextual_loss(x, y, CONTEXTUAL_BANDWIDTH, backend=backend)
    loss.backward(grad.to(loss.dtype))
    return {"loss": loss, "grad x": x.grad, "grad y": y.grad}


def _fused_for(ck, device) -> list[str]:
    """The fused backends registered for this device type (each says itself whether it implements the op)."""
    return [name for name, b in ck.BACKENDS.items() if b.fused and device.type in b.devices]


def _contextual_refusal(ck, backend, device, dtype) -> str | None:
    try:
        ck.select(backend, device, dtype, op="contextual_loss")
    except ValueError as e:
        return str(e)
    return None


def _contextual_accuracy(args, torch, ck, device) -> list[dict]:
    rows = []
    channels = 64 if not args.dry_run else 8
    for side in args.accuracy_sides[:2]:
        g = torch.Generator().manual_seed(side)
        x, y = (torch.randn(2, channels, side, side, generator=g, dtype=torch.float64).relu_().to(device)
                for _ in range(2))
        grad = torch.rand(2, generator=g, dtype=torch.float64).to(device)
        exact = _contextual_and_grads(ck, x, y, grad, "reference")
        for backend, dtype_name in itertools.product(_fused_for(ck, device), args.dtypes):
            dtype = getattr(torch, dtype_name)
            row = {"backend": backend, "mode": dtype_name, "side": side, "channels": channels}
            if (reason := _contextual_refusal(ck, backend, device, dtype)) is not None:
                rows.append(row | {"status": f"skipped: {reason}"})
                continue
            inputs = [t.to(dtype) for t in (x, y, grad)]
            mine = _contextual_and_grads(ck, *inputs, backend)
            theirs = _contextual_and_grads(ck, *inputs, "reference")
            rows.append(row | _judged(exact, mine, theirs))
    return rows


def _contextual_timing(args, torch, ck, device) -> list[dict]:
    """Reference vs fused contextual_loss forward+backward (float32, batch 1) at the VGG-19 layers,
    cheapest rows first; each impl's rate on the rows it ran predicts the time of its next ones."""
    started = time.time()
    bench = _timer(torch, device)
    impls = ["reference", *_fused_for(ck, device)]
    configs = []
    for image, (layer, (channels, div)) in itertools.product(args.contextual_images, CONTEXTUAL_LAYERS.items()):
        if args.dry_run:
            channels //= CONTEXTUAL_DRY_CHANNELS
        side = image // div
        if side >= 1:
            configs.append((side * side * side * side * channels, image, layer, channels, side))
    rates: dict[str, float] = {}  # impl -> FLOP/s measured so far
    rows = []
    for flops, image, layer, channels, side in sorted(configs):
        flops *= 4.0  # forward 2 N^2 C; the backward recomputes the similarities and takes one more product
        for impl in impls:
            row = {"impl": impl, "image": image, "layer": layer, "channels": channels, "side": side,
                   "dtype": "float32", "batch": 1, "mode": "forward+backward"}
            rows.append(row)
            left = min(args.contextual_budget_s - (time.time() - started), _deadline(args) - time.time())
            if impl != "reference" and (reason := _contextual_refusal(ck, impl, device, torch.float32)) is not None:
                row["status"] = f"skipped: {reason}"
                continue
            predicted = flops / rates[impl] if impl in rates else 0.0
            if left <= 0 or predicted > left:
                row["status"] = f"skipped: time budget (predicted {predicted:.1f} s, {max(left, 0):.0f} s left)"
                continue
            g = torch.Generator().manual_seed(0)
            x, y = (torch.randn(1, channels, side, side, generator=g).relu_().to(device) for _ in range(2))
            grad = torch.rand(1, generator=g).to(device)
            x.requires_grad_(True)

            def step():
                ck.contextual_loss(x, y, CONTEXTUAL_BANDWIDTH, backend=impl).backward(grad)
            try:
                step()  # compiles/autotunes outside the measurement
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                once = time.perf_counter()
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    row["peak_bytes"] = torch.cuda.max_memory_allocated() - base
                once = time.perf_counter() - once
                # Calls over a second are timed once: do_bench would repeat them for tens of seconds.
                median = once * 1e3 if once > 1.0 else bench(step, [x])[0]
            except Exception as e:  # noqa: BLE001 -- recorded in the row; the run goes on
                message = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                oom = isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError))
                row["status"] = "OOM" if oom else f"FAILED: {type(e).__name__}: {message}"
            else:
                row.update(status="ok", time_ms=median, tflops=flops / (median * 1e-3) / 1e12)
                rates[impl] = max(rates.get(impl, 0.0), flops / (median * 1e-3))
            finally:
                x = y = grad = None
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def contextual_phase(args) -> list[dict]:
    torch, ck, device = _setup(args.dry_run)
    accuracy = [r | {"part": "accuracy"} for r in _contextual_accuracy(args, torch, ck, device)]
    return accuracy + [r | {"part": "timing"} for r in _contextual_timing(args, torch, ck, device)]


def train_step_phase(args) -> list[dict]:
    import torch

    from benchmarks.harness import measure

    cap = TRAIN_STEP_CAP_GB
    if not args.dry_run:
        cap = min(cap, torch.cuda.get_device_properties(0).total_memory / 2**30)
    rows, started = [], time.time()
    for side, impl, ckpt in TRAIN_STEP_CONFIGS["dry" if args.dry_run else "gpu"]:
        impl = impl.replace("fused", "cpu" if args.dry_run else "triton")
        config = {"op": "train_step", "impl": impl, "side": side, "mode": "forward+backward", "batch": 1,
                  "device": "cpu" if args.dry_run else "cuda", "activation_checkpointing": ckpt}
        if not _within(started, args.train_step_budget_s, _deadline(args)):
            rows.append({**config, "status": "skipped: time budget", "peak_bytes": None})
            continue
        timeout = max(10.0, min(600.0, _deadline(args) - time.time()))
        rows.append({**measure({**config, "repeats": 1 if args.dry_run else 2, "warmup": 0, "memory_cap_gb": cap,
                                "timeout_s": timeout}), "activation_checkpointing": ckpt, "memory_cap_gb": cap})
    return rows


def _train_step_targets(rows: list) -> list[str]:
    from benchmarks.bench_train_step import label, total_bytes

    ok = {(r["side"], r["impl"], r["activation_checkpointing"]): r for r in rows if r.get("status") == "ok"}
    out = []
    ref = ok.get((512, "reference", False))
    for (side, impl, _), r in sorted(ok.items()):
        if impl == "reference":
            continue
        total = total_bytes(r)
        if side == 512 and ref:
            share = total / total_bytes(ref)
            out.append(f"512 px train step: {label(r)} total {share:.2f}x the materialised one's (target < 0.25): "
                       f"{'met' if share < 0.25 else 'NOT met'}")
        if side == 1024:
            out.append(f"1024 px train step: {label(r)} total {total / 2**30:.1f} GiB (target: fits in 80 GiB): "
                       f"{'met' if total < 80 * 2**30 else 'NOT met'}")
    return out


def matmul_rate(args) -> float | None:
    """The card's measured bfloat16 matmul TFLOP/s (8192^3), the yardstick of the bf16 target."""
    if args.dry_run:
        return None
    import torch
    import triton.testing

    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=100)
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


# ----------------------------------------------------------------------------- driver and report

def _deadline(args) -> float:
    """The epoch second after which nothing starts (in a phase process too: it gets --started)."""
    return (args.started or time.time()) + args.deadline_s


def _within(started: float, budget_s: float, deadline: float) -> bool:
    now = time.time()
    return now - started <= budget_s and now < deadline


def _run_phase(args, phase: str, autotune: bool) -> tuple[list, str]:
    deadline = _deadline(args)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--started", str(args.started),
           "--deadline-s", str(args.deadline_s)]
    for flag in ("sides", "accuracy_sides", "value_channels", "dtypes"):
        cmd += [f"--{flag.replace('_', '-')}", *map(str, getattr(args, flag))]
    cmd += ["--contextual-images", *map(str, args.contextual_images)]
    cmd += ["--channels", str(args.channels), "--batch", str(args.batch), "--budget-s", str(args.budget_s),
            "--contextual-budget-s", str(args.contextual_budget_s), "--train-step-budget-s",
            str(args.train_step_budget_s)]
    if args.dry_run:
        cmd.append("--dry-run")
    try:  # the phase stops starting work at the deadline; its last measurement gets a grace period
        proc = subprocess.run(cmd, cwd=ROOT, env=_environment(args.dry_run, autotune), capture_output=True, text=True,
                              timeout=deadline - time.time() + DEADLINE_GRACE_S)
    except subprocess.TimeoutExpired:
        return [], f"phase {phase} killed {DEADLINE_GRACE_S:.0f} s after the deadline"
    sys.stderr.write(proc.stderr[-4000:])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return [], f"phase {phase} exited with {proc.returncode}: {proc.stderr.strip()[-800:]}"
    return json.loads(lines[-1])["rows"], ""


def _build_cuda(args, deadline: float) -> dict:
    """Phase 0: build (or load the cached build of) the CUDA extension, in its own process."""
    begin = time.time()
    code = "from cocos_kernels import cuda; cuda.extension()"
    limit = max(1.0, min(args.build_timeout_s, deadline - begin))
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_environment(False, autotune=False),
                              capture_output=True, text=True, timeout=limit)
        status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
    except subprocess.TimeoutExpired:
        status, tail = f"FAILED (over {limit:.0f} s)", ""
    print(f"gpu_check: cuda build {status} ({time.time() - begin:.0f} s)", flush=True)
    return {"status": status, "seconds": time.time() - begin, "tail": tail}


def _card(dry_run: bool) -> str:
    """The card's name, asked in a child process: this one holds no CUDA context (its memory would
    count against the phases' measurements)."""
    if dry_run:
        return "cpu-dry-run"
    proc = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name())"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"gpu_check: no CUDA device: {proc.stderr.strip()[-300:]}")
    return proc.stdout.strip()


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def _accuracy_table(rows: list, columns: tuple[tuple[str, str], ...]) -> list[str]:
    """Markdown rows of fused-vs-materialised errors; columns: (error name, header)."""
    header = " | ".join(f"{h} fused | {h} mat." for _, h in columns)
    lines = [f"| backend | mode | grid | {header} | status |", "|" + "---|" * (4 + 2 * len(columns))]
    for r in rows:
        e = r.get("errors", {})
        cells = []
        for name, _ in columns:
            pair = e.get(name, {})
            cells += [_fmt(pair.get("fused"), ".2e"), _fmt(pair.get("materialised"), ".2e")]
        patch = f", {r['patch_size']}x{r['patch_size']} patches" if r.get("patch_size", 1) > 1 else ""
        lines.append(f"| {r['backend']} | {r['mode']} | {r['side']}^2{patch} | " + " | ".join(cells) + f" | {r['status']} |")
    return lines


def _contextual_markdown(rows: list) -> list[str]:
    accuracy = [r for r in rows if r.get("part") == "accuracy"]
    timing = [r for r in rows if r.get("part") == "timing"]
    lines = ["", "## contextual_loss", "", "Accuracy against float64 (bandwidth 0.1, C=64 (dry run: 8), batch 2; same bound as above):",
             ""] + _accuracy_table(accuracy, (("loss", "loss"), ("grad x", "dx"), ("grad y", "dy")))
    lines += ["", "Forward+backward, float32, batch 1, VGG-19 layers unpooled (time: median of do_bench, or one "
              "call when it takes over a second; peak beyond the inputs; TFLOP/s counts 4*N^2*C):", "",
              "| image | layer | C | grid | impl | time (ms) | peak (MiB) | TFLOP/s | vs reference | status |",
              "|" + "---|" * 10]
    ref = {(r["image"], r["layer"]): r for r in timing if r["impl"] == "reference" and r.get("status") == "ok"}
    for r in timing:
        base = ref.get((r["image"], r["layer"]))
        ratio = f"{base['time_ms'] / r['time_ms']:.2f}x" if base and r.get("time_ms") else ""
        peak = _fmt(r["peak_bytes"] / 2**20, ".0f") if "peak_bytes" in r else ""
        lines.append(f"| {r['image']} | {r['layer']} | {r['channels']} | {r['side']}^2 | {r['impl']} | "
                     f"{_fmt(r.get('time_ms'), '.1f')} | {peak} | {_fmt(r.get('tflops'), '.1f')} | {ratio} | "
                     f"{r.get('status', '')} |")
    return lines


def _train_step_markdown(rows: list) -> list[str]:
    from benchmarks.bench_train_step import table

    if not rows:
        return []
    return ["", "## Training step (benchmarks/bench_train_step.py: ADE20K recipe, batch 1, steady state, "
            f"{rows[0].get('memory_cap_gb') or TRAIN_STEP_CAP_GB:g} GiB cap)", "",
            *table(rows)]


def markdown(meta: dict, tests: dict, accuracy: list, timing: list, targets: list, contextual: list = (),
             train_step: list = ()) -> str:
    lines = [f"# correspondence_warp GPU check: {meta['card']}", "",
             f"{meta['date']} · torch {meta['torch']} · triton {meta['triton']} · "
             f"bf16 matmul {_fmt(meta['bf16_matmul_tflops'], '.0f')} TFLOP/s · {meta['wall_s']:.0f} s", ""]
    if meta.get("phases_done", "all phases") != "all phases":
        lines += [f"**Partial report**, written after the {meta['phases_done']} phase (the run may still be going, "
                  "or was stopped).", ""]
    if meta.get("not_run"):
        lines += [f"Not run (past the --deadline-s): {', '.join(meta['not_run'])}.", ""]
    lines += [f"## CUDA build\n\n**{meta.get('cuda_build', {}).get('status', 'not run')}** "
              f"({_fmt(meta.get('cuda_build', {}).get('seconds'), '.0f')} s)", "",
              f"## Tests\n\n`{tests['command']}`: **{tests['status']}**", ""]
    if tests.get("tail"):
        lines += ["```", tests["tail"], "```", ""]
    lines += ["## Accuracy against float64 (temperature 0.01, C=%s, Cv=48, batch 1)" % meta["channels"], "",
              "Max |error| / max(1, max |float64|); each fused backend vs the materialised PyTorch path at the "
              "same precision. Bound: fused <= 2x (3x for gradients) materialised + 1e-5.", ""]
    lines += _accuracy_table(accuracy, (("out", "out"), ("grad query", "dq"), ("grad key", "dk"), ("grad value", "dv")))
    lines += ["", "## Timing (C=%s, batch %s)" % (meta["channels"], meta["batch"]), "",
              "Median of triton.testing.do_bench; peak = max_memory_allocated beyond the inputs; TFLOP/s counts "
              "2*Nq*Nk*(C+Cv) per forward, 3.5x that per forward+backward; SDPA runs as in benchmarks/ (the "
              "PyTorch prologue included; -pad-8 / -pad-C: the value zero-padded to suit the kernel); "
              "error: max |out - float32 reference| / max(1, max |ref|).", "",
              "| dtype | Cv | grid | mode | impl | time (ms) | peak (MiB) | TFLOP/s | vs reference | error vs fp32 | status |",
              "|" + "---|" * 11]
    ref = {(r["dtype"], r["value_channels"], r["side"], r["mode"]): r for r in timing
           if r["impl"] == "reference" and r.get("status") == "ok"}
    for r in sorted(timing, key=lambda r: (r["dtype"], r["value_channels"], r["side"], r["mode"])):
        base = ref.get((r["dtype"], r["value_channels"], r["side"], r["mode"]))
        ratio = f"{base['time_ms'] / r['time_ms']:.2f}x" if base and r.get("time_ms") else ""
        peak = _fmt(r["peak_bytes"] / 2**20, ".0f") if "peak_bytes" in r else ""
        lines.append(f"| {r['dtype']} | {r['value_channels']} | {r['side']}^2 | {r['mode']} | {r['impl']} | "
                     f"{_fmt(r.get('time_ms'), '.3f')} | {peak} | {_fmt(r.get('tflops'), '.1f')} | {ratio} | "
                     f"{_fmt(r.get('error_vs_float32'), '.1e')} | {r.get('status', '')} |")
    lines += _contextual_markdown(list(contextual))
    lines += _train_step_markdown(list(train_step))
    lines += ["", "## Targets", ""] + [f"- {t}" for t in targets] + [""]
    return "\n".join(lines)


def _targets(timing: list, bf16_rate: float | None) -> list[str]:
    def row(impl, dtype, side, mode="forward+backward", cv=3):
        for r in timing:
            if (r["impl"], r["dtype"], r["side"], r["mode"], r["value_channels"]) == (impl, dtype, side, mode, cv):
                return r
        return None

    out = []
    ref, tri = row("reference", "float32", 128), row("triton", "float32", 128)
    if ref and tri and ref.get("status") == "ok" and tri.get("status") == "ok":
        mem = tri["peak_bytes"] / max(ref["peak_bytes"], 1)
        speed = ref["time_ms"] / tri["time_ms"]
        out.append(f"128^2 float32 fwd+bwd: triton peak memory {mem:.3f}x the reference's (target <= 0.05): "
                   f"{'met' if mem <= 0.05 else 'NOT met'}")
        out.append(f"128^2 float32 fwd+bwd: triton {speed:.2f}x faster than the reference (target >= 2): "
                   f"{'met' if speed >= 2 else 'NOT met'}")
    ref256 = [r for r in timing if r["impl"] == "reference" and r["side"] == 256]
    if ref256:
        out.append("256^2 reference: " + ", ".join(sorted({r.get("status", "") for r in ref256})))
    bf = row("triton", "bfloat16", 256, mode="forward")
    if bf and bf.get("status") == "ok" and bf16_rate:
        share = bf["tflops"] / bf16_rate
        out.append(f"256^2 bfloat16 forward: {bf['tflops']:.0f} TFLOP/s = {share:.0%} of the card's bf16 matmul "
                   f"rate (target >= 40%): {'met' if share >= 0.4 else 'NOT met'}")
    return out or ["(not measured)"]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for name, defaults in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, defaults[args.dry_run])
    if args.phase:  # inside a phase process: print the rows as one JSON line
        rows = {"accuracy": accuracy_phase, "timing": timing_phase, "contextual": contextual_phase,
                "train_step": train_step_phase}[args.phase](args)
        print(json.dumps({"rows": rows}))
        return 0

    started = args.started = time.time()  # the phases get it: one deadline for all
    deadline = _deadline(args)
    card = _card(args.dry_run)
    stem = "gpu_check_" + re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
    failures, not_run = [], []  # not_run: phases past the deadline
    results = {"tests": {"command": f"pytest {' '.join(args.test_paths)} --device cuda -q", "status": "skipped"},
               "accuracy": [], "timing": [], "contextual_loss": [], "train_step": []}

    def report(done: str, bf16_rate=None) -> list[str]:
        """(Re)write the report with every phase so far: a run stopped later still leaves these."""
        import torch
        import triton

        meta = {"card": card, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "torch": torch.__version__, "triton": triton.__version__, "bf16_matmul_tflops": bf16_rate,
                "channels": args.channels, "batch": args.batch, "wall_s": time.time() - started,
                "failures": failures, "cuda_build": cuda_build, "phases_done": done, "not_run": not_run}
        targets = _targets(results["timing"], bf16_rate) + _train_step_targets(results["train_step"])
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, **results, "targets": targets},
                                                              indent=1))
        (args.out_dir / f"{stem}.md").write_text(markdown(
            meta, results["tests"], results["accuracy"], results["timing"], targets, results["contextual_loss"],
            results["train_step"]))
        print(f"gpu_check: {done} done ({meta['wall_s']:.0f} s); wrote {args.out_dir / stem}.md and .json",
              flush=True)
        return targets

    cuda_build = {"status": "skipped (dry run)"} if args.dry_run else _build_cuda(args, deadline)
    if cuda_build["status"] != "ok" and not args.dry_run:
        failures.append(f"cuda build: {cuda_build['status']}")
        os.environ["COCOS_KERNELS_CUDA_BUILD"] = "0"  # the phases skip "cuda" with this reason, no retries
    report("build")
    tests = results["tests"]
    if not (args.skip_tests or args.dry_run):
        limit = min(args.test_timeout_s, deadline - time.time())
        cmd = [sys.executable, "-m", "pytest", *args.test_paths, "--device", "cuda", "-q", "-p", "no:cacheprovider"]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=_environment(False, autotune=False), capture_output=True,
                                  text=True, timeout=max(limit, 1.0))
            tests.update(status="passed" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})",
                         tail="\n".join(proc.stdout.strip().splitlines()[-15:]))
        except subprocess.TimeoutExpired:
            tests.update(status=f"FAILED (over {limit:.0f} s)")
        if tests["status"] != "passed":
            failures.append("tests")
        report("tests")

    # Accuracy with one fixed config (no autotuning: it would time configs per precision for nothing).
    phases = [("accuracy", "accuracy", False, lambda r: f"accuracy {r['backend']} {r['mode']} {r['side']}^2"),
              ("timing", "timing", True, lambda r: f"timing {r['impl']} {r['dtype']} {r['side']}^2 {r['mode']}"),
              ("contextual", "contextual_loss", True,
               lambda r: f"contextual_loss {r['part']} {r.get('backend', r.get('impl'))} {r['side']}^2"),
              ("train_step", "train_step", False, lambda r: f"train step {r['impl']} {r['side']} px")]
    for phase, key, autotune, label in phases:
        if phase == "train_step" and args.train_step_budget_s <= 0:
            continue
        if time.time() >= deadline:
            not_run.append(phase)
            continue
        rows, problem = _run_phase(args, phase, autotune=autotune)
        results[key] = rows
        failures += [problem] if problem else []
        failures += [f"{label(r)}: {r['status']}" for r in rows
                     if r.get("status", "").startswith("FAILED") or r.get("status") == "error"]
        report(phase)

    targets = report("all phases", bf16_rate=matmul_rate(args))
    for t in targets:
        print("  target:", t)
    if failures:
        print("gpu_check: FAILED\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("gpu_check: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
