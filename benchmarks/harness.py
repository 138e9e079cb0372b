"""Measuring one benchmark config in a fresh process: time, peak memory, OOM, refusals.

`measure(config)` runs one config (keys of DEFAULT_CONFIG) in a fresh worker process
(`python -m benchmarks.harness '<json>'`, which prints one JSON line), so that one config's
allocator state cannot affect another's numbers and an out-of-memory or a crash is recorded
instead of ending the sweep. The worker builds the call with `make_step(config, side)` of the
op's module (`benchmarks/bench_<op>.py`, or `_matmul_step` below for op "matmul").

Memory cap. On the CPU the worker caps its memory with RLIMIT_DATA (not RLIMIT_AS: torch, its
libraries and the thread stacks reserve gigabytes of address space they never touch, so an
address-space cap fails far below its nominal size); an allocation past the cap raises and the
config is recorded as "OOM". On CUDA it caps the caching allocator with
`torch.cuda.set_per_process_memory_fraction` and records torch.cuda.OutOfMemoryError as "OOM".

Peak memory is the extra memory one call needs:
  1. make one call of the same impl and mode, so that extensions are built/loaded, kernels
     compiled and autotuned, thread pools started and lazy library set-up done (CPU: a small
     one, side 16 or half the side if that is smaller; CUDA: full size), then create the inputs
     (fixed seed);
  2. CPU: reset the kernel's peak-RSS counter (write "5" to /proc/self/clear_refs) and read the
     current RSS as the baseline (torch's import footprint and the inputs are in it);
     CUDA: reset the allocator's peak statistics and read the allocated bytes;
  3. run ONE call at full size; peak_bytes = VmHWM (peak RSS) - baseline on the CPU,
     torch.cuda.max_memory_allocated() - baseline on CUDA.
It counts everything the call allocates: intermediates, the output and, in forward+backward,
the gradients. On the CPU the memory call comes before the timed calls because the C allocator
may keep memory freed by those calls and hand it back later without the RSS growing. Where
clear_refs cannot be written, VmHWM is the process's lifetime peak and peak_bytes an upper bound
(peak_exact is false). RSS moves by a few MiB for reasons unrelated to the op (library code
paged in), so small CPU peaks are only that accurate.

Time: after the memory call, `benchmarks.timing.time_call` (torch.utils.benchmark.Timer's
blocked_autorange on the CPU, triton.testing.do_bench on CUDA: each warms up itself) for
`min_run_time_s` seconds (0: no timing, the memory call only); the median per call, the min, the
max and every sample are reported.

Status: "ok"; "OOM" (needed more than the cap); "refused" (the implementation declines these
inputs, e.g. an SDPA backend or a backend unavailable here: the reason is in `error`);
"error" (anything else, message in `error`); run.py adds "skipped" (over its time cap).
"""
from __future__ import annotations

import gc
import importlib
import json
import os
import platform
import resource
import signal
import subprocess
import sys
from pathlib import Path

from benchmarks.timing import time_call

MODES = ("forward", "forward+backward")
SEED = 0
WARM_SIDE = 16  # grid side of the call that warms a worker up before its memory is measured
ROOT = Path(__file__).resolve().parent.parent  # the directory holding the benchmarks package

# What `measure` fills in for keys its config leaves out.
DEFAULT_CONFIG = {
    "op": "correspondence_warp",  # benchmarks/bench_<op>.py builds the call ("matmul": the yardstick)
    "impl": "cpu",
    "side": 64,  # query and key grids are side x side
    "mode": "forward",
    "channels": 256,
    "value_channels": 3,
    "batch": 1,
    "dtype": "float32",
    "device": "cpu",
    "min_run_time_s": 0.2,  # the timer's budget (0: peak memory only)
    "threads": None,  # None: torch's default
    "memory_cap_gb": 20.0,
    "timeout_s": 3600.0,
}
_CONFIG_KEYS = ("op", "impl", "side", "mode", "channels", "value_channels", "batch", "dtype", "device")
_RESULT_KEYS = ("status", "error", "time_median_s", "time_min_s", "time_max_s", "times_s",
                "peak_bytes", "peak_exact", "baseline_bytes", "threads", "torch_version")


class Refused(Exception):
    """An implementation declining these inputs (recorded as status "refused", not an error)."""


# ----------------------------------------------------------------------------- worker side

def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# How torch's CPU allocator, the C library and C++ report a failed allocation.
_OOM_MESSAGES = ("can't allocate memory", "Cannot allocate memory", "out of memory", "bad_alloc")


def is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    text = str(e)
    return any(s in text for s in _OOM_MESSAGES)


def _matmul_step(config: dict, side: int):
    """Square matmul of size `side` in the config's dtype: the machine's measured peak."""
    import torch

    a, b = (torch.randn(side, side, device=config["device"]).to(getattr(torch, config["dtype"])) for _ in range(2))

    def step():
        torch.mm(a, b)
    return step


def make_step(config: dict, side: int):
    if config["op"] == "matmul":
        return _matmul_step(config, side)
    return importlib.import_module(f"benchmarks.bench_{config['op']}").make_step(config, side)


def _measure_here(config: dict) -> dict:
    import torch

    if config["mode"] not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {config['mode']!r}")
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    cuda = config["device"] == "cuda"
    result = {"threads": torch.get_num_threads(), "torch_version": torch.__version__}

    # Step 1 above. On the CPU it stays smaller than the measured call, so that what the C
    # allocator keeps from it cannot stand in for the measured call's own allocations. On CUDA
    # the allocator's peak counts every allocation, cached or not, so the warm-up is full size:
    # Triton autotuning (and its benchmarking buffers) happens there, not in the measured call.
    make_step(config, config["side"] if cuda else min(WARM_SIDE, max(1, config["side"] // 2)))()
    step = make_step(config, config["side"])
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        result.update(peak_bytes=torch.cuda.max_memory_allocated() - baseline, peak_exact=True)
    else:
        result["peak_exact"] = _reset_peak_rss()
        baseline = _proc_status_bytes("VmRSS")
        step()
        result["peak_bytes"] = _proc_status_bytes("VmHWM") - baseline
    result["baseline_bytes"] = baseline

    if config["min_run_time_s"] > 0:
        timed = time_call(step, config["device"], config["min_run_time_s"])
        times = timed["times_s"]
        result.update(times_s=times, time_median_s=timed["median_s"], time_min_s=min(times), time_max_s=max(times))
    return result


def worker_main(config_json: str) -> None:
    """Run one config in this process and print its result as one JSON line on stdout."""
    config = json.loads(config_json)
    cap = int(config["memory_cap_gb"] * 2**30)
    if config["device"] == "cuda":
        import torch

        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / torch.cuda.get_device_properties(0).total_memory))
    else:
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    try:
        result = {"status": "ok", **_measure_here(config)}
    except Refused as e:
        result = {"status": "refused", "error": str(e)[:2000]}
    except Exception as e:  # noqa: BLE001 -- any failure is this config's result, not the sweep's
        result = {"status": "OOM" if is_oom(e) else "error", "error": f"{type(e).__name__}: {e}"[:2000]}
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- parent side

def measure(config: dict) -> dict:
    """Run one config (keys of DEFAULT_CONFIG plus the op's own; missing ones take DEFAULT_CONFIG's
    values) in a fresh process.

    Returns the config's keys of _CONFIG_KEYS, n (= side^2) and status ("ok", "OOM", "refused" or
    "error"), error (message or None), time_median_s, time_min_s, time_max_s, times_s, peak_bytes,
    peak_exact, baseline_bytes, threads, torch_version (None where the run did not get that far).
    """
    config = {**DEFAULT_CONFIG, **config}
    result = {k: config[k] for k in _CONFIG_KEYS}
    result["n"] = config["side"] ** 2
    result.update(dict.fromkeys(_RESULT_KEYS))
    # The worker imports the benchmarks package by name, so the directory above it must be importable.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "benchmarks.harness", json.dumps(config)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=config["timeout_s"])
    except subprocess.TimeoutExpired:
        result.update(status="error", error=f"timed out after {config['timeout_s']:g} s")
        return result
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        result.update(json.loads(lines[-1]))
        return result
    rc = proc.returncode
    how = f"signal {-rc} ({signal.strsignal(-rc)})" if rc < 0 else f"exit code {rc}"
    result.update(status="error", error=f"worker died with {how}; stderr tail: {proc.stderr[-1500:]}")
    return result


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def mem_total_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


if __name__ == "__main__":
    # Through the package, so that the op modules' `Refused` is the class worker_main catches.
    from benchmarks.harness import worker_main as _worker_main

    _worker_main(sys.argv[1])
