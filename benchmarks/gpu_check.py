"""GPU check of the fused GPU backends (triton, cuda): the headline numbers first, then correctness.

    PYTHONUNBUFFERED=1 python benchmarks/gpu_check.py --out-dir "$OUT"   # on the GPU machine: ~9 min
    python benchmarks/gpu_check.py --dry-run --out-dir /tmp/gpu-check    # the same plan on the CPU, ~1 min

The plan, in this order; every measured row is written to --out-dir (gpu_check_<card>.md and
.json, rewritten after every row) as soon as it exists, so a run cut short still leaves what it did:

  at once, in the background: the CUDA extension build (JIT, cached for the later phases) and
           --warmers processes that compile every Triton kernel config the headline timing rows
           autotune over (their launches compile and launch nothing), on the machine's other cores;
  env:     card, versions, and the measured bfloat16 / tf32 / float32 matmul peaks (8192^3,
           triton.testing.do_bench): the yardsticks of the targets;
  timing:  the headline rows, triton first: bfloat16 forward and forward+backward at
           --headline-side^2 (256^2), C=256, Cv=3 and 48, batch 4; 3x3 windows (CoCosNet's
           match_kernel) at --window-sides (64^2, 128^2: the feature grids of 256/512 px images), and
           at the first with Cv=151 (ADE20K's labels, CoCosNet's warp mask);
           float32 at tf32x3 and ieee at --float32-side^2 (128^2); then the same rows on the cuda
           backend (once its build is done; the peers first while it is not), and the peers:
           the materialised reference, SDPA cuDNN, flash with the value padded to C, memory-efficient
           with the value padded to 8 (benchmarks/bench_correspondence_warp.py's wrappers, the PyTorch
           prologue included). Median time, peak memory beyond the inputs, TFLOP/s, error against the
           float32 reference; a row over --item-limit-s is killed and recorded as such;
  tests:   a targeted correctness subset on the GPU (GPU_TESTS filtered by GPU_TEST_FILTER: every op,
           dtype and option family once, the fused backends only), `pytest --device cuda` with
           pytest-xdist and pytest-timeout where installed (else --test-workers pytest processes,
           each a shard of the collected tests), junit in --out-dir/gpu_check_junit.xml;
  contextual: contextual_loss against float64, then timed at CoCosNet's VGG-19 layers of 256-1024 px
           images (the reference and each fused backend, forward+backward, float32, batch 1);
  train_step: one CoCosNet training step (benchmarks/bench_train_step.py, ADE20K recipe, batch 1) at
           512 and 1024 px, materialised vs triton with and without --activation_checkpointing;
  accuracy: forward and gradients of each fused backend (--accuracy-backends) against float64 on the
           same rounded inputs at 16^2..128^2 grids, patch sizes 1 and 3, every precision (float32
           ieee / tf32x3 / tf32, float16, bfloat16); a mode passes when its error is at most 2x the
           materialised PyTorch path's at the same precision plus a per-dtype floor
           (cocos_kernels.testing, the tests' rule);
  timing_more: the remaining timing sweep (--sides x Cv x --dtypes, every implementation).

Each phase runs in child processes that stream their rows; nothing starts after --deadline-s (540 s,
under the device tool's 600 s per command) and a phase still running then is stopped. The report's
targets: triton bfloat16 forward >= 50% of the measured bf16 matmul peak at 256^2, C=256, Cv=3;
forward+backward >= 35%; 3x3 windows >= 30%; float32 tf32x3 >= 3x the reference's speed at 128^2.
Exits non-zero if the cuda build or a test fails, an accuracy bound is broken or a timed fused output
is wrong (non-finite, or off the float32 reference).

--dry-run runs the same plan at tiny shapes on the CPU (fused backends: the Triton interpreter and the
cpu kernels; where the installed Triton's interpreter cannot run, its rows say why), collects the
test subset without running it, and writes the same files. --phases runs some phases only (env
always); with --dry-run it is also the CPU accuracy table of every backend, e.g.

    python benchmarks/gpu_check.py --dry-run --phases accuracy --accuracy-backends reference cpu triton \
        --accuracy-sides 24 --accuracy-patches 1 --channels 256 --accuracy-value-channels 3 --out-dir /tmp/accuracy

--plan prints the items each phase would run and runs nothing; --from-results writes the report of a
saved gpu_check_<card>.json again (after a change to the report, without the GPU).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(ROOT))
TEMPERATURE = 0.01
MODES = ("forward", "forward+backward")
ACCURACY_MODES = {  # name: (dtype, precision= of the triton backend, torch float32 matmul precision)
    "float32-ieee": ("float32", "ieee", "highest"),
    "float32-tf32x3": ("float32", "tf32x3", "high"),
    "float32-tf32": ("float32", "tf32", "medium"),
    "float16": ("float16", None, "highest"),
    "bfloat16": ("bfloat16", None, "highest"),
}
# torch's float32 matmul precision for a timing row's precision: the triton backend follows it
# (precision=None), and the materialised peers run their float32 products at the same level.
MATMUL_PRECISION = {None: "highest", "ieee": "highest", "tf32x3": "high", "tf32": "medium"}
# The triton backend's timed output against the float32 reference, relative to its largest magnitude.
TIMING_RTOL = {"float32": 1e-3, "float16": 3e-2, "bfloat16": 1e-1}
# The fused GPU backends of correspondence_warp under test: checked, timed, and failing the run when wrong.
FUSED_GPU = ("triton", "cuda")
# The headline rows' peers (benchmarks/bench_correspondence_warp.py's implementations).
PEERS = ("reference", "sdpa-cudnn", "sdpa-flash-pad-C", "sdpa-efficient-pad-8")
# CoCosNet's ADE20K warp mask: the exemplar's one-hot labels warped at the smallest window grid (a
# headline row of its own: the value tiles past 64 channels take other kernels than Cv = 3).
ADE20K_LABELS = 151
# The tests phase: these files, filtered by -k GPU_TEST_FILTER (pytest's keyword matching on the test
# ids): the fused backends only (the reference and cpu rows test nothing GPU-specific), the
# parametrised sweeps at one or two shapes and temperatures instead of all of them.
GPU_TESTS = ("tests/test_correspondence_warp_triton.py", "tests/test_correspondence_warp.py", "tests/test_windows.py",
             "tests/test_key_mask.py", "tests/test_cycle_warp.py", "tests/test_contextual_loss.py",
             "tests/test_correspondence_topk.py", "tests/test_warp_image.py", "tests/test_check_finite.py",
             "tests/test_properties.py")
# The Cv 151 shape runs only in the tests that sweep the CUDA backend's tensor-core kernel classes.
GPU_TEST_FILTER = " and ".join([*(f"not {s}" for s in (
    "[reference-", "[cpu-", "B1-C1-", "B1-C3-", "B1-C17-Cv1-", "B2-C1-7x5", "B3-C3-5x7", "B1-C64-1x3",
    "-h0.05]", "-h0.5]", "-h1]", "-1e-20-", "-1e20-", "test_nonfinite_inputs_propagate", "test_constant_feature_maps",
    "test_non_finite_input_raises[")), "(not B3-C64 or test_half_precision or test_float32_on_tensor_cores)"])
SHARD_VARIABLE = "GPU_CHECK_SHARD"  # "i/n": the pytest plugin below keeps every n-th collected test from i
PHASES = ("timing", "tests", "contextual", "train_step", "accuracy", "timing_more")  # after env, in this order

DEFAULTS = {  # option: (GPU run, dry run)
    "deadline_s": (540.0, 85.0),
    "headline_side": (256, 8),
    "window_sides": ([64, 128], [4]),
    "float32_side": (128, 6),
    "sides": ([64, 128, 256], [4]),
    "accuracy_sides": ([16, 32, 64, 128], [4]),
    "channels": (256, 8),
    "value_channels": ([3, 48], [3]),
    "batch": (4, 1),
    "contextual_images": ([256, 512, 1024], [16]),
    "warmers": (min(8, max(1, (os.cpu_count() or 2) // 2)), 1),
    "test_workers": (min(16, os.cpu_count() or 1), 1),
}
# Phase train_step, most important first ("fused": triton on the GPU, cpu in the dry run).
TRAIN_STEP_CONFIGS = {  # (side, impl, activation checkpointing)
    "gpu": ((512, "reference", False), (512, "fused", True), (1024, "fused", True), (512, "fused", False),
            (1024, "fused", False)),
    "dry": ((64, "fused", True),),
}
TRAIN_STEP_CAP_GB = 80.0
# Seconds one item of a phase may take (a timing row: --item-limit-s); a process's start comes on top.
ITEM_LIMIT_S = {"env": 120.0, "accuracy": 120.0, "contextual": 90.0, "train_step": 300.0}
STARTUP_S = 60.0
DEADLINE_GRACE_S = 15.0  # past --deadline-s: a running item may finish, then its process is stopped
# contextual_loss: VGG-19 layer -> (channels, image side / feature side), as CoCosNet uses them.
CONTEXTUAL_LAYERS = {"relu2_2": (128, 2), "relu3_2": (256, 4), "relu4_2": (512, 8), "relu5_2": (512, 16)}
CONTEXTUAL_BANDWIDTH = 0.1
CONTEXTUAL_DRY_CHANNELS = 16  # the dry run divides the layers' channels by this


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="the same plan at tiny shapes on the CPU: checks the plan, the measuring and the report, "
                        "not the GPU")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results",
                   help="where the report, the junit file and the log go (default: %(default)s)")
    p.add_argument("--deadline-s", type=float, help="start nothing after this many seconds (540; dry run: 85)")
    p.add_argument("--item-limit-s", type=float, default=60.0,
                   help="a timing row taking longer (compiling included) is stopped and recorded (default: %(default)s)")
    p.add_argument("--build-timeout-s", type=float, default=300.0, help="limit of the CUDA build (default: %(default)s)")
    p.add_argument("--test-timeout-s", type=float, default=150.0, help="limit of the tests phase (default: %(default)s)")
    p.add_argument("--test-workers", type=int, help="parallel pytest workers (min(16, cores); dry run: 1)")
    p.add_argument("--warmers", type=int, help="processes compiling the headline Triton kernels (cores / 2, <= 8)")
    p.add_argument("--skip-tests", action="store_true", help="skip the tests phase")
    p.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES),
                   help="run only these phases, in the plan's order (env always runs; default: all)")
    p.add_argument("--plan", action="store_true",
                   help="run nothing: print each phase's items (one JSON line each) with these options")
    p.add_argument("--from-results", type=Path, metavar="JSON",
                   help="run nothing: write the report of this saved gpu_check_<card>.json again into --out-dir")
    # Defaults: (GPU run, --dry-run); see DEFAULTS.
    p.add_argument("--headline-side", type=int, help="headline grid side (256; dry run: 8)")
    p.add_argument("--window-sides", type=int, nargs="+", help="3x3-window grid sides (64 128; dry run: 4)")
    p.add_argument("--float32-side", type=int, help="float32 headline grid side (128; dry run: 6)")
    p.add_argument("--sides", type=int, nargs="+", help="grid sides of the timing_more sweep (64 128 256; dry run: 4)")
    p.add_argument("--channels", type=int, help="feature channels C (256; dry run: 8)")
    p.add_argument("--value-channels", type=int, nargs="+", help="value channels Cv (3 48; dry run: 3)")
    p.add_argument("--batch", type=int, help="timing batch size (4; dry run: 1)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "float16", "bfloat16"],
                   help="dtypes of the timing_more sweep (default: %(default)s)")
    p.add_argument("--accuracy-sides", type=int, nargs="+", help="accuracy grid sides (16 32 64 128; dry run: 4)")
    p.add_argument("--accuracy-patches", type=int, nargs="+", default=[1, 3],
                   help="accuracy patch sizes (3: the window kernels; default: %(default)s)")
    p.add_argument("--accuracy-backends", nargs="+", default=list(FUSED_GPU),
                   help="backends the accuracy phase judges (default: %(default)s; e.g. cpu reference in a dry run)")
    p.add_argument("--accuracy-value-channels", type=int, default=48,
                   help="value channels Cv of the accuracy phase (default: %(default)s)")
    p.add_argument("--contextual-images", type=int, nargs="+",
                   help="contextual_loss image sides in px (256 512 1024; dry run: 16)")
    p.add_argument("--contextual-budget-s", type=float, default=45.0,
                   help="start no contextual_loss timing after this many seconds of its phase (default: %(default)s)")
    p.add_argument("--train-step-budget-s", type=float, default=120.0,
                   help="start no training-step config after this many seconds of its phase (0: skip the phase)")
    # Internal: a phase's child process (--phase, --first, --last, --shard) and the run's start time.
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--last", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    p.add_argument("--started", type=float, default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    for name, defaults in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, defaults[args.dry_run])
    if args.started is None:
        args.started = time.time()
    args.deadline = args.started + args.deadline_s
    return args


def _environment(dry_run: bool, autotune: bool = True, cuda_build: bool = True) -> dict:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1" if dry_run else "0"
    env["COCOS_KERNELS_TRITON_AUTOTUNE"] = "1" if autotune else "0"
    if not cuda_build:  # the build failed once: the backend refuses with that reason, no retries
        env["COCOS_KERNELS_JIT_CUDA"] = "0"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


# ----------------------------------------------------------------------------- the plan

def timing_items(args, more: bool = False) -> list[dict]:
    """The timing rows in the order they run: the headline configs for triton, then cuda, then the
    peers; with `more`, the rest of the sweep (--sides x Cv x --dtypes) for every implementation."""
    from benchmarks.bench_correspondence_warp import SDPA_IMPLS

    def config(dtype, side, cv, patch=1, precision=None):
        return dict(dtype=dtype, precision=precision, side=side, value_channels=cv, patch_size=patch,
                    batch=args.batch, channels=args.channels)

    cv = args.value_channels[0]
    headline = [config("bfloat16", args.headline_side, c) for c in args.value_channels]
    headline += [config("bfloat16", side, cv, patch=3) for side in args.window_sides]
    headline += [config("bfloat16", args.window_sides[0], ADE20K_LABELS, patch=3)]
    headline += [config("float32", args.float32_side, cv, precision=p) for p in ("tf32x3", "ieee")]
    if not more:
        configs, impls = headline, (*FUSED_GPU, *PEERS)
    else:
        sweep = [config(d, side, c, precision="ieee" if d == "float32" else None)
                 for d, c, side in itertools.product(args.dtypes, args.value_channels, args.sides)]
        configs, impls = [c for c in sweep if c not in headline], ("reference", *FUSED_GPU, *SDPA_IMPLS)
    return [dict(c, impl=impl, mode=mode) for impl in impls for c in configs for mode in MODES]


def accuracy_items(args) -> list[dict]:
    return [dict(side=side, patch_size=patch) for side, patch in itertools.product(args.accuracy_sides,
                                                                                   args.accuracy_patches)]


def contextual_items(args) -> list[dict]:
    """Accuracy per grid side, then timing rows, cheapest first, the reference and each fused backend."""
    items = [dict(part="accuracy", side=side) for side in args.accuracy_sides[:2]]
    configs = []
    for image, (layer, (channels, div)) in itertools.product(args.contextual_images, CONTEXTUAL_LAYERS.items()):
        channels //= CONTEXTUAL_DRY_CHANNELS if args.dry_run else 1
        side = image // div
        if side >= 1:
            configs.append((side ** 4 * channels, image, layer, channels, side))
    fused = ("cpu",) if args.dry_run else FUSED_GPU
    for _, image, layer, channels, side in sorted(configs):
        items += [dict(part="timing", impl=impl, image=image, layer=layer, channels=channels, side=side,
                       dtype="float32", batch=1, mode="forward+backward") for impl in ("reference", *fused)]
    return items


def train_step_items(args) -> list[dict]:
    if args.train_step_budget_s <= 0:
        return []
    fused = "cpu" if args.dry_run else "triton"
    return [dict(side=side, impl=impl.replace("fused", fused), activation_checkpointing=ckpt)
            for side, impl, ckpt in TRAIN_STEP_CONFIGS["dry" if args.dry_run else "gpu"]]


PLANS = {"env": lambda args: [dict(part="env")], "timing": timing_items, "accuracy": accuracy_items,
         "contextual": contextual_items, "train_step": train_step_items,
         "timing_more": lambda args: timing_items(args, more=True)}


# ----------------------------------------------------------------------------- phase processes

class _State:
    """What a phase process keeps between its items (torch, the device, caches)."""

    def __init__(self, args):
        import torch

        import cocos_kernels as ck

        self.torch, self.ck, self.args = torch, ck, args
        self.device = torch.device("cpu" if args.dry_run else "cuda")
        if not args.dry_run and not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device (use --dry-run for the CPU rehearsal)")
        self.started = time.time()
        self.truths: dict = {}
        self.rates: dict = {}  # contextual_loss: impl -> FLOP/s measured so far
        self._triton_refusal: list = []

    def refusal(self, backend: str, dtype, op: str = "correspondence_warp") -> str | None:
        """Why `backend` cannot run `op` on this device and dtype (None: it can)."""
        try:
            self.ck.select(backend, self.device, dtype, op=op)
        except ValueError as e:
            return str(e)
        if backend == "triton" and self.args.dry_run:
            return self.triton_interpreter_refusal()
        return None

    def triton_interpreter_refusal(self) -> str | None:
        """Whether this Triton's interpreter runs our kernels at all (one tiny call; some triton and
        numpy combinations fail on every launch): the dry run's triton rows say so instead of failing."""
        if not self._triton_refusal:
            torch = self.torch
            try:
                x = torch.randn(1, 4, 2, 2)
                self.ck.correspondence_warp(x, x, x, backend="triton")
                self._triton_refusal.append(None)
            except Exception as e:  # noqa: BLE001 -- the reason is the row's status
                import numpy
                import triton

                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                self._triton_refusal.append(f"the Triton interpreter fails here (triton {triton.__version__}, "
                                            f"numpy {numpy.__version__}): {type(e).__name__}: {first}")
        return self._triton_refusal[0]

    def bench(self, fn, grads) -> list[float]:
        """[median, p20, p80] milliseconds of fn() (benchmarks.timing.time_call: do_bench for 40 ms on the
        GPU; in the dry run one call, after the caller's warm-up); grads' .grad are reset between calls."""
        from benchmarks.timing import time_call

        t = time_call(fn, self.device.type, 0.0 if self.args.dry_run else 0.04, grads=grads)
        return [t[k] * 1e3 for k in ("median_s", "p20_s", "p80_s")]

    def release(self):
        gc.collect()
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()


def _message(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _rel_err(actual, expected) -> float:
    from cocos_kernels.testing import relative_error

    return relative_error(actual, expected)


def env_rows(args, item, s: _State) -> list[dict]:
    """Card, versions and the measured matmul peaks (TFLOP/s) of bfloat16, tf32 and float32 products."""
    import numpy
    import triton

    torch = s.torch
    row = {"card": "cpu-dry-run" if args.dry_run else torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "numpy": numpy.__version__, "python": sys.version.split()[0],
           "cuda": torch.version.cuda}
    if not args.dry_run:
        props = torch.cuda.get_device_properties(0)
        row.update(sms=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1))
    n = 256 if args.dry_run else 8192
    for name, dtype, precision in (("bf16", torch.bfloat16, "highest"), ("tf32", torch.float32, "high"),
                                   ("fp32", torch.float32, "highest")):
        torch.set_float32_matmul_precision(precision)
        a, b = (torch.randn(n, n, device=s.device).to(dtype) for _ in range(2))
        ms = s.bench(lambda a=a, b=b: a @ b, [])[0]
        row[f"{name}_matmul_tflops"] = 2 * n ** 3 / (ms * 1e-3) / 1e12
        del a, b
    torch.set_float32_matmul_precision("highest")
    s.release()
    return [row]


def _timing_inputs(torch, item, device):
    g = torch.Generator().manual_seed(0)
    B, C, cv, side = item["batch"], item["channels"], item["value_channels"], item["side"]
    dtype = getattr(torch, item["dtype"])
    q, k = (torch.randn(B, C, side, side, generator=g).to(device, dtype) for _ in range(2))
    v = torch.rand(B, cv, side, side, generator=g).to(device, dtype)
    grad = torch.randn(B, cv, side, side, generator=g).to(device, dtype)
    return q, k, v, grad


def _truth(torch, ck, q, k, v, patch_size):
    """The float32 reference ("highest" precision) of these inputs, one batch element at a time and,
    without patches, in blocks of query rows (exact for channel centring, which is per position), so
    that it fits where the whole materialised call does not."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    rows = q.shape[2] if patch_size > 1 else max(1, (1 << 28) // (k.shape[2] * k.shape[3] * q.shape[3] * 4))
    try:
        with torch.no_grad():
            return torch.cat([
                torch.cat([ck.reference.correspondence_warp(q[b:b + 1, :, r:r + rows].float(), k[b:b + 1].float(),
                                                            v[b:b + 1].float(), TEMPERATURE, patch_size=patch_size)
                           for r in range(0, q.shape[2], rows)], dim=2)
                for b in range(q.shape[0])])
    finally:
        torch.set_float32_matmul_precision(previous)


def timing_rows(args, item, s: _State) -> list[dict]:
    from benchmarks.bench_correspondence_warp import flops, implementation
    from benchmarks.harness import Refused

    torch, ck, device = s.torch, s.ck, s.device
    row = dict(item)
    name, dtype = item["impl"], getattr(torch, item["dtype"])
    torch.set_float32_matmul_precision(MATMUL_PRECISION[item["precision"]])
    reason = s.refusal(name, dtype) if name in FUSED_GPU else None
    if reason is not None:
        return [row | {"status": f"skipped: {reason}"}]
    try:
        impl = implementation(name, device, dtype)
    except Refused as e:
        return [row | {"status": f"skipped: {e}"}]
    q, k, v, grad = _timing_inputs(torch, item, device)
    key = tuple(item[f] for f in ("dtype", "value_channels", "side", "patch_size"))
    if key not in s.truths:
        s.truths = {key: _truth(torch, ck, q, k, v, item["patch_size"])}  # one at a time: they are large
    backward = item["mode"] == "forward+backward"
    inputs = [t.detach().requires_grad_(backward) for t in (q, k, v)]

    def step():
        if backward:
            impl(*inputs, patch_size=item["patch_size"]).backward(grad)
        else:
            with torch.no_grad():
                return impl(*inputs, patch_size=item["patch_size"])
    out = None
    try:
        with torch.no_grad():
            out = impl(*inputs, patch_size=item["patch_size"])  # compiles/autotunes outside the measurements
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            row["peak_bytes"] = torch.cuda.max_memory_allocated() - base
        median, low, high = s.bench(step, [t for t in inputs if t.requires_grad])
    except Exception as e:  # noqa: BLE001 -- recorded in the row; the run goes on
        if isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)):
            row["status"] = "OOM"
        elif isinstance(e, Refused):  # an SDPA kernel declining these inputs, with torch's reasons
            row["status"] = "unsupported"
        else:
            row["status"] = f"FAILED: {type(e).__name__}: {_message(e)}"
        row["error"] = _message(e)
    else:
        row.update(status="ok", time_ms=median, time_ms_p20=low, time_ms_p80=high,
                   tflops=flops(item) / (median * 1e-3) / 1e12, error_vs_float32=_rel_err(out, s.truths[key]))
        # Only the backends under test fail the check; the others' errors are information.
        if name in FUSED_GPU and not torch.isfinite(out).all():
            row["status"] = "FAILED: non-finite output"
        elif name in FUSED_GPU and row["error_vs_float32"] > TIMING_RTOL[item["dtype"]]:
            row["status"] = f"FAILED: output off the float32 reference by {row['error_vs_float32']:.3g}"
    finally:
        inputs = out = None
        torch.set_float32_matmul_precision("highest")
        s.release()
    return [row]


def _warp_and_grads(ck, q, k, v, grad, **kwargs):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = ck.correspondence_warp(q, k, v, TEMPERATURE, **kwargs)
    out.backward(grad.to(out.dtype))
    return {"out": out, "grad query": q.grad, "grad key": k.grad, "grad value": v.grad}


def _judged(exact: dict, mine: dict, theirs: dict) -> dict:
    """status and errors of a fused result `mine` against float64 `exact`, next to the materialised `theirs`."""
    from cocos_kernels.testing import bound

    errors = {name: (_rel_err(mine[name], exact[name]), _rel_err(theirs[name], exact[name])) for name in exact}
    broken = [name for name, (e_mine, e_ref) in errors.items() if not e_mine <= bound(e_ref, theirs[name].dtype)]
    return {"status": "ok" if not broken else "FAILED: " + ", ".join(broken),
            "errors": {name: {"fused": a, "materialised": b} for name, (a, b) in errors.items()}}


def accuracy_rows(args, item, s: _State) -> list[dict]:
    """Each --accuracy-backends backend in each precision mode against float64 on the same rounded inputs
    (so the errors are what the arithmetic adds, not the inputs' rounding), next to the materialised
    PyTorch path at the same precision."""
    torch, ck, device = s.torch, s.ck, s.device
    side, patch_size, cv = item["side"], item["patch_size"], args.accuracy_value_channels
    g = torch.Generator().manual_seed(side)
    q, k = (torch.randn(1, args.channels, side, side, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, cv, side, side, generator=g, dtype=torch.float64)
    grad = torch.randn(1, cv, side, side, generator=g, dtype=torch.float64)
    q, k, v, grad = (t.to(device) for t in (q, k, v, grad))
    exact: dict = {}  # input dtype -> float64 results on the inputs rounded to it
    rows = []
    for (mode, (dtype_name, precision, matmul_precision)), backend in itertools.product(ACCURACY_MODES.items(),
                                                                                         args.accuracy_backends):
        dtype = getattr(torch, dtype_name)
        row = {"backend": backend, "mode": mode, "side": side, "patch_size": patch_size, "channels": args.channels,
               "value_channels": cv}
        reason = s.refusal(backend, dtype)
        if reason is None and precision not in (None, "ieee") and "precision" not in ck.BACKENDS[backend].features:
            reason = "no precision= (its float32 products are full float32)"
        if reason is not None:
            rows.append(row | {"status": f"skipped: {reason}"})
            continue
        inputs = [t.to(dtype) for t in (q, k, v, grad)]
        if dtype_name not in exact:
            exact[dtype_name] = _warp_and_grads(ck, *(t.double() for t in inputs), backend="reference",
                                                patch_size=patch_size)
        kwargs = {"precision": precision} if "precision" in ck.BACKENDS[backend].features else {}
        torch.set_float32_matmul_precision(matmul_precision)
        try:
            mine = _warp_and_grads(ck, *inputs, backend=backend, patch_size=patch_size, **kwargs)
            theirs = _warp_and_grads(ck, *inputs, backend="reference", patch_size=patch_size)
        finally:
            torch.set_float32_matmul_precision("highest")
        rows.append(row | _judged(exact[dtype_name], mine, theirs))
        del mine, theirs, inputs
    s.release()
    return rows


def _contextual_and_grads(ck, x, y, grad, backend):
    x, y = (t.detach().requires_grad_() for t in (x, y))
    loss = ck.contextual_loss(x, y, CONTEXTUAL_BANDWIDTH, backend=backend)
    loss.backward(grad.to(loss.dtype))
    return {"loss": loss, "grad x": x.grad, "grad y": y.grad}


def _fused_for(ck, device) -> list[str]:
    """The fused backends registered for this device type (each says itself whether it implements the op)."""
    return [name for name, b in ck.BACKENDS.items() if b.fused and device.type in b.devices]


def contextual_rows(args, item, s: _State) -> list[dict]:
    """An accuracy item: every fused backend against float64 (loss, grad x, grad y; the accuracy phase's
    bound). A timing item: forward+backward, time and peak memory; a row whose predicted time (from
    the impl's rate on the smaller rows) exceeds what is left of --contextual-budget-s is skipped."""
    torch, ck, device = s.torch, s.ck, s.device
    if item["part"] == "accuracy":
        channels, side, rows = (8 if args.dry_run else 64), item["side"], []
        g = torch.Generator().manual_seed(side)
        x, y = (torch.randn(2, channels, side, side, generator=g, dtype=torch.float64).relu_().to(device)
                for _ in range(2))
        grad = torch.rand(2, generator=g, dtype=torch.float64).to(device)
        exact = _contextual_and_grads(ck, x, y, grad, "reference")
        for backend, dtype_name in itertools.product(_fused_for(ck, device), ("float32", "bfloat16")):
            dtype = getattr(torch, dtype_name)
            row = {"part": "accuracy", "backend": backend, "mode": dtype_name, "side": side, "channels": channels}
            if (reason := s.refusal(backend, dtype, op="contextual_loss")) is not None:
                rows.append(row | {"status": f"skipped: {reason}"})
                continue
            inputs = [t.to(dtype) for t in (x, y, grad)]
            rows.append(row | _judged(exact, _contextual_and_grads(ck, *inputs, backend),
                                      _contextual_and_grads(ck, *inputs, "reference")))
        return rows

    row, impl, side, channels = dict(item), item["impl"], item["side"], item["channels"]
    # forward 2 N^2 C; the backward recomputes the similarities and takes one more product
    flop = 4.0 * side ** 4 * channels
    if impl != "reference" and (reason := s.refusal(impl, torch.float32, op="contextual_loss")) is not None:
        return [row | {"status": f"skipped: {reason}"}]
    left = min(args.contextual_budget_s - (time.time() - s.started), args.deadline - time.time())
    predicted = flop / s.rates[impl] if impl in s.rates else 0.0
    if left <= 0 or predicted > left:
        return [row | {"status": f"skipped: time budget (predicted {predicted:.1f} s, {max(left, 0):.0f} s left)"}]
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
        median = once * 1e3 if once > 1.0 else s.bench(step, [x])[0]
    except Exception as e:  # noqa: BLE001 -- recorded in the row; the run goes on
        oom = isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError))
        row["status"] = "OOM" if oom else f"FAILED: {type(e).__name__}: {_message(e)}"
    else:
        row.update(status="ok", time_ms=median, tflops=flop / (median * 1e-3) / 1e12)
        s.rates[impl] = max(s.rates.get(impl, 0.0), flop / (median * 1e-3))
    finally:
        x = y = grad = None
        s.release()
    return [row]


def train_step_rows(args, item, s: _State) -> list[dict]:
    from benchmarks.harness import measure

    cap = TRAIN_STEP_CAP_GB
    if not args.dry_run:
        cap = min(cap, s.torch.cuda.get_device_properties(0).total_memory / 2**30)
    config = {"op": "train_step", "impl": item["impl"], "side": item["side"], "mode": "forward+backward", "batch": 1,
              "device": s.device.type, "activation_checkpointing": item["activation_checkpointing"]}
    if time.time() - s.started > args.train_step_budget_s:
        return [{**config, "status": "skipped: time budget", "peak_bytes": None}]
    if args.dry_run:  # the step on value-less tensors: its memory in seconds, no arithmetic
        from benchmarks.bench_train_step import trace

        return [{**config, "status": "ok", "time_median_s": None, "memory_cap_gb": cap,
                 **trace(config, item["side"])}]
    timeout = max(10.0, min(ITEM_LIMIT_S["train_step"], args.deadline - time.time()))
    # do_bench's least: eight steps (its estimate, warm-up and one timed call) after the memory step
    result = measure({**config, "min_run_time_s": 0.001, "memory_cap_gb": cap,
                      "timeout_s": timeout})
    return [{**result, "activation_checkpointing": item["activation_checkpointing"], "memory_cap_gb": cap}]


RUNNERS = {"env": env_rows, "timing": timing_rows, "timing_more": timing_rows, "accuracy": accuracy_rows,
           "contextual": contextual_rows, "train_step": train_step_rows}


def phase_main(args) -> int:
    """A phase's child process: runs items [--first, --last) of the phase's plan, printing
    {"start": i} before and {"index": i, "rows": [...]} after each (one JSON line each)."""
    items = PLANS[args.phase](args)
    state = _State(args)
    for index in range(args.first, len(items) if args.last is None else min(args.last, len(items))):
        if time.time() >= args.deadline:
            break
        print(json.dumps({"start": index}), flush=True)
        rows = RUNNERS[args.phase](args, items[index], state)
        print(json.dumps({"index": index, "rows": rows}), flush=True)
    return 0


def compile_only() -> None:
    """Make Triton kernel launches compile (into the on-disk cache) and launch nothing: a plain kernel
    compiles its one specialisation, an autotuned one every config its pruning keeps (the autotuner's
    own `warmup`), exactly as a real launch with these arguments would look them up."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    run = JITFunction.run

    def compile_run(self, *args, grid, warmup, **kwargs):
        return run(self, *args, grid=grid, warmup=True, **kwargs)

    def compile_configs(self, *args, **kwargs):
        kwargs.pop("warmup", None)
        return self.warmup(*args, **kwargs)

    JITFunction.run = compile_run
    Autotuner.run = compile_configs


def warm_main(args) -> int:
    """A warmer: calls the triton rows of the headline timing plan (shard i of n) once, compiling only.
    In the dry run (the interpreter compiles nothing) the calls run, which rehearses the same code."""
    import torch

    import cocos_kernels as ck

    if not args.dry_run:
        compile_only()
    device = torch.device("cpu" if args.dry_run else "cuda")
    shard, shards = map(int, args.shard.split("/"))
    items = [it for it in timing_items(args) if it["impl"] == "triton"][shard::shards]
    for item in items:
        if time.time() >= args.deadline:
            break
        torch.set_float32_matmul_precision(MATMUL_PRECISION[item["precision"]])
        q, k, v, grad = _timing_inputs(torch, item, device)
        backward = item["mode"] == "forward+backward"
        q, k, v = (t.requires_grad_(backward) for t in (q, k, v))
        try:
            out = ck.correspondence_warp(q, k, v, TEMPERATURE, patch_size=item["patch_size"], backend="triton")
            if backward:
                out.backward(grad)
        except Exception as e:  # noqa: BLE001 -- the timing row will meet (and record) the same error
            print(f"gpu_check warmer: {item}: {type(e).__name__}: {_message(e)}", file=sys.stderr, flush=True)
    return 0


# ----------------------------------------------------------------------------- the tests phase

def pytest_collection_modifyitems(config, items):
    """pytest plugin (-p benchmarks.gpu_check): with GPU_CHECK_SHARD=i/n, keep every n-th test from i."""
    if SHARD_VARIABLE in os.environ:
        shard, shards = map(int, os.environ[SHARD_VARIABLE].split("/"))
        items[:] = items[shard::shards]


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def subset_commands(args, junit_dir: Path) -> list[tuple[list[str], dict]]:
    """(command, extra environment) of each pytest process of the tests phase."""
    base = [sys.executable, "-m", "pytest", *GPU_TESTS, "-k", GPU_TEST_FILTER, "-q", "-rfE", "-p", "no:cacheprovider",
            "--device", "cpu" if args.dry_run else "cuda"]
    if args.dry_run:
        return [([*base, "--collect-only"], {})]
    if _importable("pytest_timeout"):
        base += ["--timeout", "120"]
    if _importable("xdist"):
        return [([*base, "-n", str(args.test_workers), "--junitxml", str(junit_dir / "junit-0.xml")], {})]
    return [([*base, "-p", "benchmarks.gpu_check", "--junitxml", str(junit_dir / f"junit-{i}.xml")],
             {SHARD_VARIABLE: f"{i}/{args.test_workers}"}) for i in range(args.test_workers)]


def _merge_junit(files: list[Path], target: Path) -> dict:
    """One junit file of the shards' test suites, and the counts over all of them."""
    root = ET.Element("testsuites")
    counts = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    for f in files:
        try:
            tree = ET.parse(f).getroot()
        except (OSError, ET.ParseError):
            continue
        for suite in ([tree] if tree.tag == "testsuite" else list(tree)):
            root.append(suite)
            for k in counts:
                counts[k] += int(suite.get(k, 0))
    ET.ElementTree(root).write(target, encoding="utf-8", xml_declaration=True)
    return counts


def _stop(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    """Signal a child started in its own session, and its children."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def tests_phase(args, log, env: dict) -> dict:
    """Run the GPU test subset; at its limit the processes get SIGINT (pytest then still writes its
    junit and summary), then SIGKILL."""
    begin = time.time()
    limit = max(1.0, min(args.test_timeout_s, args.deadline - begin))
    with tempfile.TemporaryDirectory(prefix="gpu-check-junit-") as tmp:
        commands = subset_commands(args, Path(tmp))
        outputs = [tempfile.TemporaryFile(mode="w+") for _ in commands]
        procs = [subprocess.Popen(cmd, cwd=ROOT, env=env | {"COCOS_KERNELS_TRITON_AUTOTUNE": "0"} | extra, stdout=out,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True)
                 for (cmd, extra), out in zip(commands, outputs)]
        timed_out = False
        for p in procs:
            try:
                p.wait(timeout=max(0.1, begin + limit - time.time()))
            except subprocess.TimeoutExpired:
                timed_out = True
                for q in procs:
                    _stop(q, signal.SIGINT)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    pass
        for p in procs:
            if p.poll() is None:
                _stop(p)
                p.wait()
        tails = []
        for out in outputs:
            out.seek(0)
            text = out.read()
            log.write(text)
            tails.append("\n".join(text.strip().splitlines()[-12:]))
        counts = _merge_junit(sorted(Path(tmp).glob("junit-*.xml")), args.out_dir / "gpu_check_junit.xml")
    failed = timed_out or any(p.returncode not in (0, 5) for p in procs)  # 5: nothing collected
    status = f"stopped at its {limit:.0f} s limit" if timed_out else "FAILED" if failed else "passed"
    if args.dry_run and not failed:
        status = "passed (dry run: collected only; " + (tails[0].splitlines() or ["?"])[-1] + ")"
    return {"command": " ".join(commands[0][0][2:]), "processes": len(procs), "status": status, **counts,
            "seconds": round(time.time() - begin, 1), "tail": "\n".join(tails)[-3000:]}


# ----------------------------------------------------------------------------- driver

def _child_command(args, *extra: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args.argv, "--started", str(args.started), *extra]


def _pump(stream, lines: queue.Queue) -> None:
    """Every line of `stream` into `lines`, then None."""
    for line in stream:
        lines.put(line)
    lines.put(None)


def run_items(items: list[dict], first: int, last: int, command, sink, log, env: dict, limit_s: float,
              deadline: float) -> None:
    """Run items [first, last) in child processes (command(first, last): a phase_main process),
    passing each item's rows to sink(index, rows) as they come. An item over `limit_s` (or running
    at the deadline) gets its process killed and one row saying so; the next process resumes after it."""
    index = first
    while index < last:
        if time.time() >= deadline:
            sink(index, [dict(items[index], status="not run: past the deadline")])
            index += 1
            continue
        proc = subprocess.Popen(command(index, last), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
                                start_new_session=True)
        lines: queue.Queue = queue.Queue()
        # The reader binds this process's stream and queue: a reader outliving its (killed) process
        # must not feed the next process's queue.
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        current, since, begun = index, time.time(), False
        allowed = limit_s + STARTUP_S  # the first item also waits for the process to start
        while True:
            wait = min(since + allowed, deadline + DEADLINE_GRACE_S) - time.time()
            try:
                line = lines.get(timeout=max(0.1, wait))
            except queue.Empty:
                _stop(proc)
                proc.wait()
                why = "past the deadline" if time.time() > deadline else f"over its {limit_s:g} s limit"
                sink(current, [dict(items[current], status=f"stopped: {why}")])
                index = current + 1
                break
            if line is None:  # the process ended: done, at the deadline, or crashed in item `current`
                proc.wait()
                rest = range(current, last)
                if proc.returncode == 0:
                    why = "not run: past the deadline"
                elif begun:  # it crashed in an item: the next process goes on after it
                    why, rest = f"FAILED: its process exited with {proc.returncode} (see gpu_check.log)", [current]
                else:  # it crashed before its first item: so would the next
                    why = f"not run: the phase process exited with {proc.returncode} (see gpu_check.log)"
                for i in rest:
                    sink(i, [dict(items[i], status=why)])
                index = rest[-1] + 1 if rest else last
                break
            if not line.startswith("{"):
                continue
            message = json.loads(line)
            if "start" in message:
                current, since, allowed, begun = message["start"], time.time(), limit_s, True
            else:
                sink(message["index"], message["rows"])
                current = index = message["index"] + 1
                since = time.time()


class Report:
    """The results so far, rewritten to --out-dir after every change."""

    def __init__(self, args):
        self.args = args
        self.meta = {"card": None, "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "channels": args.channels, "batch": args.batch, "dry_run": args.dry_run,
                     "accuracy_value_channels": args.accuracy_value_channels}
        self.results = {"env": [], "timing": [], "tests": {"status": "not run"}, "contextual": [], "train_step": [],
                        "accuracy": [], "timing_more": []}
        self.failures: list[str] = []

    def sink(self, phase: str):
        def add(index, rows):
            self.results[phase].extend(rows)
            self.failures.extend(f"{phase}: {_label(r)}: {r['status']}" for r in rows
                                 if str(r.get("status", "")).startswith("FAILED"))
            self.write(f"{phase} item {index}")
        return add

    def write(self, done: str) -> None:
        env = self.results["env"][0] if self.results["env"] else {}
        self.meta.update(card=env.get("card", self.meta["card"]), wall_s=time.time() - self.args.started,
                         last_done=done, failures=self.failures)
        self.save()

    def save(self) -> None:
        from benchmarks.report import write

        targets = report_targets(self.results)
        write(self.args.out_dir / self.stem(), {"meta": self.meta, **self.results, "targets": targets},
              markdown(self.meta, self.results, targets))

    def stem(self) -> str:
        return "gpu_check_" + re.sub(r"[^a-z0-9]+", "-", (self.meta["card"] or "unknown").lower()).strip("-")


def _label(r: dict) -> str:
    return " ".join(str(r[k]) for k in ("impl", "backend", "dtype", "mode", "side", "patch_size", "precision")
                    if r.get(k) is not None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.phase == "warm":
        return warm_main(args)
    if args.phase:
        return phase_main(args)

    if args.plan:
        print(json.dumps({"options": {name: getattr(args, name) for name in DEFAULTS}}))
        for phase in ("env", *args.phases):
            for item in PLANS[phase](args) if phase in PLANS else []:
                print(json.dumps({"phase": phase, **item}))
        return 0
    report = Report(args)
    if args.from_results:
        saved = json.loads(args.from_results.read_text())
        report.meta, report.failures = saved["meta"], saved["meta"].get("failures", [])
        report.results = {k: saved[k] for k in report.results}
        report.save()
        print(f"gpu_check: wrote {args.out_dir / report.stem()}.md and .json")
        return 0

    args.out_dir.mkdir(parents=True, exist_ok=True)
    log = open(args.out_dir / "gpu_check.log", "a")

    def say(text):
        print(f"gpu_check [{time.time() - args.started:4.0f} s] {text}", flush=True)

    # In the background: the CUDA build and the Triton warmers, on the cores the phases leave idle.
    build = None
    if not args.dry_run:
        build = subprocess.Popen([sys.executable, "-c", "from cocos_kernels import cuda; cuda.extension()"], cwd=ROOT,
                                 env=_environment(False), stdout=log, stderr=log, start_new_session=True)
    warmers = [subprocess.Popen(_child_command(args, "--phase", "warm", "--shard", f"{i}/{args.warmers}"), cwd=ROOT,
                                env=_environment(args.dry_run), stdout=log, stderr=log, start_new_session=True)
               for i in range(args.warmers if "timing" in args.phases else 0)]
    env = _environment(args.dry_run)

    def run(phase, first=0, last=None, environment=env):
        items = PLANS[phase](args)
        last = len(items) if last is None else last

        def command(a, b):
            return _child_command(args, "--phase", phase, "--first", str(a), "--last", str(b))
        run_items(items, first, last, command, report.sink(phase), log, environment,
                  ITEM_LIMIT_S.get(phase, args.item_limit_s), args.deadline)
        say(f"{phase} [{first}, {last}) done")

    run("env")
    if report.results["env"] and "card" in report.results["env"][0]:
        say(f"card {report.results['env'][0]['card']}; writing {args.out_dir / report.stem()}.md and .json")

    # Timing: triton, then cuda once its build is done (the peers first while it is not).
    span: dict = {}  # triton, cuda, peers: each a contiguous range of the plan
    for i, item in enumerate(timing_items(args)):
        part = item["impl"] if item["impl"] in FUSED_GPU else "peers"
        span[part] = (span.get(part, (i, i))[0], i + 1)
    timing = "timing" in args.phases
    if timing:
        run("timing", *span["triton"])
    for w in warmers:  # they compile the triton rows only
        _stop(w)
        w.wait()

    def cuda_build_status() -> dict:
        if build is None:
            return {"status": "skipped (dry run)"}
        try:
            build.wait(timeout=max(1.0, min(args.build_timeout_s - (time.time() - args.started),
                                            args.deadline - time.time())))
        except subprocess.TimeoutExpired:
            _stop(build)
            build.wait()
            return {"status": f"FAILED (over {args.build_timeout_s:.0f} s)", "seconds": time.time() - args.started}
        return {"status": "ok" if build.returncode == 0 else f"FAILED (exit {build.returncode}; see gpu_check.log)"}

    building = build is not None and build.poll() is None
    if building and timing:
        run("timing", *span["peers"])
    report.meta["cuda_build"] = cuda_build_status()
    say(f"cuda build: {report.meta['cuda_build']['status']}")
    cuda_ok = report.meta["cuda_build"]["status"].startswith(("ok", "skipped"))
    if not cuda_ok:
        report.failures.append(f"cuda build: {report.meta['cuda_build']['status']}")
    env = _environment(args.dry_run, cuda_build=cuda_ok)
    if timing:
        run("timing", span["cuda"][0], span["cuda" if building else "peers"][1], environment=env)

    if args.skip_tests or "tests" not in args.phases:
        report.results["tests"] = {"status": f"skipped ({'--skip-tests' if args.skip_tests else '--phases'})"}
    elif time.time() < args.deadline:
        report.results["tests"] = tests_phase(args, log, env)
        if not report.results["tests"]["status"].startswith("passed"):
            report.failures.append(f"tests: {report.results['tests']['status']}")
        report.write("tests")
        say(f"tests: {report.results['tests']['status']}")
    for phase in ("contextual", "train_step", "accuracy", "timing_more"):
        if phase in args.phases:
            run(phase, environment=env)

    report.write("all phases")
    for t in report_targets(report.results):
        print("  target:", t)
    log.close()
    if report.failures:
        print("gpu_check: FAILED\n  " + "\n  ".join(report.failures), file=sys.stderr)
        return 1
    print("gpu_check: all checks passed")
    return 0


# ----------------------------------------------------------------------------- targets and report

def _find(rows: list, **fields) -> dict | None:
    for r in rows:
        if r.get("status") == "ok" and all(r.get(k) == v for k, v in fields.items()):
            return r
    return None


def _reference_of(rows: list, r: dict) -> dict | None:
    return _find(rows, impl="reference", **{k: r[k] for k in ("dtype", "precision", "value_channels", "side",
                                                              "patch_size", "mode")})


def report_targets(results: dict) -> list[str]:
    """The issue's targets, judged on the headline rows; train-step targets from that phase."""
    timing = results["timing"]
    env = results["env"][0] if results["env"] else {}
    bf16 = env.get("bf16_matmul_tflops")
    out = []
    shares = {(1, "forward"): 0.50, (1, "forward+backward"): 0.35, (3, "forward"): 0.30, (3, "forward+backward"): 0.30}
    for r in timing:
        if r.get("status") != "ok" or r["impl"] != "triton" or r["dtype"] != "bfloat16" or not bf16:
            continue
        target = shares.get((r["patch_size"], r["mode"]))
        if target is None or r["value_channels"] != 3:
            continue
        share = r["tflops"] / bf16
        what = "3x3 windows" if r["patch_size"] == 3 else "bfloat16"
        out.append(f"{r['side']}^2 {what} {r['mode']}: triton {r['tflops']:.0f} TFLOP/s = {share:.0%} of the bf16 "
                   f"matmul peak (target >= {target:.0%}): {'met' if share >= target else 'NOT met'}")
    for r in timing:
        if r.get("status") != "ok" or r["impl"] != "triton" or r["dtype"] != "float32" or r["mode"] != "forward+backward":
            continue
        ref = _reference_of(timing, r)
        if ref is None:
            continue
        speed = ref["time_ms"] / r["time_ms"]
        if r["precision"] == "tf32x3":
            out.append(f"{r['side']}^2 float32 tf32x3 fwd+bwd: triton {speed:.2f}x the reference's speed "
                       f"(target >= 3): {'met' if speed >= 3 else 'NOT met'}")
        if r.get("peak_bytes") is None or not ref.get("peak_bytes"):
            continue
        mem = r["peak_bytes"] / ref["peak_bytes"]
        out.append(f"{r['side']}^2 float32 {r['precision']} fwd+bwd: triton peak memory {mem:.3f}x the reference's "
                   f"(target <= 0.05): {'met' if mem <= 0.05 else 'NOT met'}")
    return (out or ["(timing targets not measured)"]) + _train_step_targets(results["train_step"])


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


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def _accuracy_table(rows: list, columns: tuple[tuple[str, str], ...]) -> list[str]:
    """Fused-vs-materialised errors; columns: (error name, header)."""
    from benchmarks.report import table

    cells = []
    for r in rows:
        e = r.get("errors", {})
        errors = [_fmt(e.get(name, {}).get(which), ".2e") for name, _ in columns for which in ("fused", "materialised")]
        patch = f", {r['patch_size']}x{r['patch_size']} patches" if r.get("patch_size", 1) > 1 else ""
        cells.append([r.get("backend", ""), r.get("mode", ""), f"{r['side']}^2{patch}", *errors, r["status"]])
    return table(["backend", "mode", "grid", *(f"{h} {which}" for _, h in columns for which in ("fused", "mat.")),
                  "status"], cells)


def _timing_table(rows: list) -> list[str]:
    from benchmarks.report import table

    cells = []
    for r in rows:
        ref = _reference_of(rows, r)
        ratio = f"{ref['time_ms'] / r['time_ms']:.2f}x" if ref and r.get("time_ms") else ""
        peak = _fmt(r["peak_bytes"] / 2**20, ".0f") if r.get("peak_bytes") is not None else ""
        dtype = r["dtype"] + (f" ({r['precision']})" if r.get("precision") else "")
        cells.append([dtype, r["value_channels"], f"{r['side']}^2", f"{r['patch_size']}x{r['patch_size']}", r["mode"],
                      r["impl"], _fmt(r.get("time_ms"), ".3f"), peak, _fmt(r.get("tflops"), ".1f"), ratio,
                      _fmt(r.get("error_vs_float32"), ".1e"), r.get("status", "")])
    return table(["dtype", "Cv", "grid", "patch", "mode", "impl", "time (ms)", "peak (MiB)", "TFLOP/s", "vs reference",
                  "error vs fp32", "status"], cells)


def _contextual_markdown(rows: list) -> list[str]:
    from benchmarks.report import table

    accuracy = [r for r in rows if r.get("part") == "accuracy"]
    timing = [r for r in rows if r.get("part") == "timing"]
    lines = ["", "## contextual_loss", "", "Accuracy against float64 (bandwidth 0.1, C=64 (dry run: 8), batch 2; same "
             "bound as the accuracy phase):", ""] + _accuracy_table(accuracy, (("loss", "loss"), ("grad x", "dx"),
                                                                              ("grad y", "dy")))
    ref = {(r["image"], r["layer"]): r for r in timing if r["impl"] == "reference" and r.get("status") == "ok"}
    cells = []
    for r in timing:
        base = ref.get((r["image"], r["layer"]))
        ratio = f"{base['time_ms'] / r['time_ms']:.2f}x" if base and r.get("time_ms") else ""
        peak = _fmt(r["peak_bytes"] / 2**20, ".0f") if r.get("peak_bytes") is not None else ""
        cells.append([r["image"], r["layer"], r["channels"], f"{r['side']}^2", r["impl"], _fmt(r.get("time_ms"), ".1f"),
                      peak, _fmt(r.get("tflops"), ".1f"), ratio, r.get("status", "")])
    lines += ["", "Forward+backward, float32, batch 1, VGG-19 layers unpooled (time: median of do_bench, or one "
              "call when it takes over a second; peak beyond the inputs; TFLOP/s counts 4*N^2*C):", "",
              *table(["image", "layer", "C", "grid", "impl", "time (ms)", "peak (MiB)", "TFLOP/s", "vs reference",
                      "status"], cells)]
    return lines


def _train_step_markdown(rows: list) -> list[str]:
    from benchmarks.bench_train_step import table as train_step_table

    if not rows:
        return []
    return ["", "## Training step (benchmarks/bench_train_step.py: ADE20K recipe, batch 1, steady state, "
            f"{rows[0].get('memory_cap_gb') or TRAIN_STEP_CAP_GB:g} GiB cap)", "", *train_step_table(rows)]


def markdown(meta: dict, results: dict, targets: list[str]) -> str:
    env = results["env"][0] if results["env"] else {}
    peaks = " · ".join(f"{name} matmul {env[f'{name}_matmul_tflops']:.4g} TFLOP/s" for name in ("bf16", "tf32", "fp32")
                       if env.get(f"{name}_matmul_tflops") is not None)
    versions = " · ".join(f"{k} {env[k]}" for k in ("torch", "triton", "numpy", "cuda") if env.get(k))
    lines = [f"# correspondence_warp GPU check: {meta['card']}", "",
             f"{meta['started']} · {versions} · {peaks} · {meta.get('wall_s', 0):.0f} s", ""]
    if meta.get("last_done") != "all phases":
        lines += [f"**Partial report**, written after {meta.get('last_done')} (the run may still be going, or was "
                  "stopped).", ""]
    lines += ["## Targets", ""] + [f"- {t}" for t in targets] + [""]
    timing_note = ("Median of triton.testing.do_bench; peak = max_memory_allocated beyond the inputs; TFLOP/s counts "
                   "2*Nq*Nk*(D+Cv) per forward (D = C*patch^2), 3.5x that per forward+backward; SDPA as in "
                   "benchmarks/ (the PyTorch prologue included; -pad-8 / -pad-C: the value zero-padded); error: "
                   "max |out - float32 reference| / max(1, max |ref|); vs reference: the materialised path's time "
                   "over this row's, at the same dtype and float32 matmul precision.")
    lines += [f"## Headline timing (C={meta['channels']}, batch {meta['batch']})", "", timing_note, "",
              *_timing_table(results["timing"]), ""]
    build = meta.get("cuda_build", {})
    lines += [f"## CUDA build\n\n**{build.get('status', 'not run')}**", ""]
    tests = results["tests"]
    counts = ", ".join(f"{tests[k]} {k}" for k in ("tests", "failures", "errors", "skipped") if k in tests)
    lines += [f"## Tests\n\n`{tests.get('command', '')}` in {tests.get('processes', 0)} process(es): "
              f"**{tests['status']}** ({counts}; gpu_check_junit.xml)", ""]
    if tests.get("tail"):
        lines += ["```", tests["tail"], "```", ""]
    lines += _contextual_markdown(results["contextual"])
    lines += _train_step_markdown(results["train_step"])
    lines += ["", f"## Accuracy against float64 (temperature 0.01, C={meta['channels']}, "
              f"Cv={meta['accuracy_value_channels']}, batch 1)", "",
              "Max |error| / max(1, max |float64|), float64 evaluated on the same rounded inputs (the errors are what "
              "the arithmetic adds); each backend ('fused') vs the materialised PyTorch path at the same precision "
              "('mat.'). Bound (cocos_kernels.testing): fused <= 2x materialised + a per-dtype floor.", ""]
    lines += _accuracy_table(results["accuracy"], (("out", "out"), ("grad query", "dq"), ("grad key", "dk"),
                                                   ("grad value", "dv")))
    if results["timing_more"]:
        lines += ["", "## More timing", "", *_timing_table(results["timing_more"])]
    if meta.get("failures"):
        lines += ["", "## Failures", "", *[f"- {f}" for f in meta["failures"]]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
