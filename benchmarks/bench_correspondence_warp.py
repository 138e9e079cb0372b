"""Time and peak memory of correspondence_warp: materialised reference vs the fused CPU backend.

Sweeps square grids (query and key both side x side, N = side^2 positions each) over
implementations (the `backend=` argument) and modes ("forward" under torch.no_grad,
"forward+backward" with query, key and value requiring grad and out.backward() of a fixed
random gradient). Writes a JSON file, a markdown table and a PNG plot under --out-dir, named
by device, CPU model and thread count.

Every (impl, side, mode) config runs in a fresh worker process (`--worker '<json>'`, which
prints one JSON line), so that one config's allocator state cannot affect another's numbers
and an out-of-memory or a crash is recorded instead of ending the sweep. The worker caps its
memory with RLIMIT_DATA (not RLIMIT_AS: torch, its libraries and the thread stacks reserve
gigabytes of address space they never touch, so an address-space cap fails far below its
nominal size). An allocation past the cap raises, and the config is recorded as "OOM".

Peak memory is the extra resident memory (RSS) one call needs:
  1. make one small call (side 16, or half the side if that is smaller) of the same impl and
     mode, so that the extension is built/loaded, the thread pools have started and lazy
     library set-up is done, then create the inputs (fixed seed);
  2. reset the kernel's peak-RSS counter (write "5" to /proc/self/clear_refs) and read the
     current RSS as the baseline: torch's import footprint and the inputs are in it;
  3. run ONE call at full size; peak_bytes = VmHWM (peak RSS) after it - the baseline.
It counts everything the call allocates and touches: intermediates, the output and, in
forward+backward, the gradients. The memory call comes before the warm-up and timed calls
because the C allocator may keep memory freed by those calls and hand it back later without
the RSS growing. Where clear_refs cannot be written, VmHWM is the process's lifetime peak and
peak_bytes an upper bound (peak_exact is false in the result). RSS moves by a few MiB for
reasons unrelated to the op (library code paged in), so small peaks are only that accurate.

Time: after the memory call, --warmup untimed calls, then --repeats calls each timed with
time.perf_counter; the median, min and max are reported.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import json
import os
import platform
import re
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("forward", "forward+backward")
TEMPERATURE = 0.01
SEED = 0
WARM_SIDE = 16  # grid side of the call that warms a worker up before its memory is measured
ROOT = Path(__file__).resolve().parent.parent  # the directory holding the benchmarks package

# What `measure` fills in for keys its config leaves out.
DEFAULT_CONFIG = {
    "op": "correspondence_warp",  # the op whose benchmark module's `_make_step` the worker runs
    "impl": "cpu",
    "side": 64,
    "mode": "forward",
    "channels": 256,
    "value_channels": 3,
    "batch": 1,
    "repeats": 5,
    "warmup": 2,
    "threads": None,  # None: torch's default
    "memory_cap_gb": 20.0,
    "timeout_s": 3600.0,
}
_CONFIG_KEYS = ("op", "impl", "side", "mode", "channels", "value_channels", "batch")
_RESULT_KEYS = ("status", "error", "time_median_s", "time_min_s", "time_max_s", "times_s",
                "peak_bytes", "peak_exact", "baseline_rss_bytes", "threads", "torch_version")


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


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    text = str(e)
    return any(s in text for s in _OOM_MESSAGES)


def _make_step(config: dict, side: int):
    """Inputs of this config at `side`, and a function running one call of its impl and mode."""
    import torch

    import cocos_kernels as ck

    gen = torch.Generator().manual_seed(SEED)
    B, C, Cv = config["batch"], config["channels"], config["value_channels"]
    query = torch.randn(B, C, side, side, generator=gen)
    key = torch.randn(B, C, side, side, generator=gen)
    value = torch.rand(B, Cv, side, side, generator=gen)
    impl = config["impl"]

    if config["mode"] == "forward":
        def step():
            with torch.no_grad():
                ck.correspondence_warp(query, key, value, TEMPERATURE, backend=impl)
        return step

    grad_out = torch.randn(B, Cv, side, side, generator=gen)
    inputs = (query, key, value)
    for t in inputs:
        t.requires_grad_(True)

    def step():
        for t in inputs:
            t.grad = None  # drop the previous call's gradients rather than accumulating into them
        ck.correspondence_warp(query, key, value, TEMPERATURE, backend=impl).backward(grad_out)
    return step


def _run_worker(config: dict) -> dict:
    import torch

    if config["mode"] not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {config['mode']!r}")
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    result = {"threads": torch.get_num_threads(), "torch_version": torch.__version__}

    # Step 1 above: builds/loads the extension, starts the thread pools. At side 16 (256
    # positions) the fused kernels already split their work across threads. It stays smaller
    # than the measured call, so that what the allocator keeps from it is negligible and cannot
    # stand in for the measured call's own allocations.
    make_step = _make_step
    if config["op"] != "correspondence_warp":  # another op's benchmark reusing this plumbing
        make_step = importlib.import_module(f"benchmarks.bench_{config['op']}")._make_step
    make_step(config, min(WARM_SIDE, max(1, config["side"] // 2)))()
    step = make_step(config, config["side"])
    gc.collect()
    result["peak_exact"] = _reset_peak_rss()
    baseline = _proc_status_bytes("VmRSS")
    step()
    result["peak_bytes"] = _proc_status_bytes("VmHWM") - baseline
    result["baseline_rss_bytes"] = baseline

    for _ in range(config["warmup"]):
        step()
    times = []
    for _ in range(config["repeats"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    result["times_s"] = times
    if times:
        result.update(time_median_s=statistics.median(times), time_min_s=min(times), time_max_s=max(times))
    return result


def worker_main(config_json: str) -> None:
    """Run one config in this process and print its result as one JSON line on stdout."""
    config = json.loads(config_json)
    cap = int(config["memory_cap_gb"] * 2**30)
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    try:
        result = {"status": "ok", **_run_worker(config)}
    except Exception as e:  # noqa: BLE001 -- any failure is this config's result, not the sweep's
        result = {"status": "OOM" if _is_oom(e) else "error", "error": f"{type(e).__name__}: {e}"[:2000]}
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- parent side

def measure(config: dict) -> dict:
    """Run one config (keys of DEFAULT_CONFIG; missing ones take its values) in a fresh process.

    Returns a dict with the config's op, impl, side, n, mode, channels, value_channels, batch and
    status ("ok", "OOM" or "error"), error (message or None), time_median_s, time_min_s,
    time_max_s, times_s, peak_bytes, peak_exact, baseline_rss_bytes, threads, torch_version
    (None where the run did not get that far).
    """
    config = {**DEFAULT_CONFIG, **config}
    result = {k: config[k] for k in _CONFIG_KEYS}
    result["n"] = config["side"] ** 2
    result.update(dict.fromkeys(_RESULT_KEYS))
    # The worker imports this module by name, so the directory above the package must be importable.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "benchmarks.bench_correspondence_warp", "--worker", json.dumps(config)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=config["timeout_s"])
    except subprocess.TimeoutExpired:
        result.update(status="error", error=f"timed out after {config['timeout_s']} s")
        return result
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        result.update(json.loads(lines[-1]))
        return result
    rc = proc.returncode
    how = f"signal {-rc} ({signal.strsignal(-rc)})" if rc < 0 else f"exit code {rc}"
    result.update(status="error", error=f"worker died with {how}; stderr tail: {proc.stderr[-1500:]}")
    return result


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _fmt_time(r: dict) -> str:
    if r["status"] != "ok":
        return r["status"]
    t = r["time_median_s"]
    if t is None:
        return "-"
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def _fmt_mib(r: dict) -> str:
    return f"{r['peak_bytes'] / 2**20:.1f}" if r["status"] == "ok" else r["status"]


def _ratio(num: dict, den: dict, key: str) -> str:
    if num["status"] != "ok" or den["status"] != "ok" or not num[key] or not den[key] or den[key] <= 0:
        return "-"
    return f"{num[key] / den[key]:.2f}x"


def comparison_markdown(meta: dict, title: str, setup: list[str], key_columns: list[str],
                        groups: list[tuple[list[str], dict]], label) -> str:
    """The results page: a header (machine, `setup` lines, method) and one table row per group.

    groups: (the row's key cells, {impl: result}); label(result) names a failed config's group.
    """
    impls, base = meta["impls"], meta["impls"][0]
    others = impls[1:]
    header = (key_columns + [f"{i} time" for i in impls]
              + [f"speed-up ({base}/{i})" for i in others]
              + [f"{i} peak MiB" for i in impls]
              + [f"memory ratio ({base}/{i})" for i in others])
    rows = [keys + [_fmt_time(rs[i]) for i in impls]
            + [_ratio(rs[base], rs[i], "time_median_s") for i in others]
            + [_fmt_mib(rs[i]) for i in impls]
            + [_ratio(rs[base], rs[i], "peak_bytes") for i in others]
            for keys, rs in groups]
    failures = [r for _, rs in groups for r in rs.values() if r["status"] != "ok"]
    lines = [
        f"# {title}: {', '.join(impls)} on {meta['cpu_model']}",
        "",
        f"- Date: {meta['date']}",
        f"- Machine: {meta['cpu_model']}, {meta['logical_cpus']} logical CPUs, "
        f"{meta['mem_total_gib']:.1f} GiB RAM, {meta['platform']}",
        *setup,
        f"- Time: median of {meta['repeats']} calls after {meta['warmup']} warm-up calls "
        "(min and max are in the JSON)",
        "- Peak MiB: resident memory one call adds over its baseline (inputs created, extension "
        "loaded); see benchmarks/README.md",
        f"- Each config in a fresh process capped at {meta['memory_cap_gb']:g} GiB (RLIMIT_DATA); "
        "OOM: it needed more, error: it failed otherwise",
        f"- Command: `{meta['command']}`",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i < len(key_columns) else "---:" for i in range(len(header))) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    if failures:
        lines += ["", "Failures:", ""]
        lines += [f"- {r['impl']} {label(r)}: {r['status']}: {r['error']}" for r in failures]
    return "\n".join(lines) + "\n"


def markdown(meta: dict, results: list[dict]) -> str:
    by_key = {(r["impl"], r["side"], r["mode"]): r for r in results}
    groups = [([str(side), str(side * side), mode], {i: by_key[(i, side, mode)] for i in meta["impls"]})
              for side in meta["sides"] for mode in meta["modes"]]
    setup = [
        f"- torch {meta['torch_version']}, {meta['threads']} threads, float32",
        f"- Shapes: batch {meta['batch']}, C={meta['channels']}, Cv={meta['value_channels']}, "
        f"query and key grids side x side (N = side^2 positions each), temperature {TEMPERATURE}",
    ]
    return comparison_markdown(meta, "correspondence_warp", setup, ["side", "N", "mode"], groups,
                               lambda r: f"side {r['side']} {r['mode']}")


def plot(meta: dict, results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = {impl: f"C{i}" for i, impl in enumerate(meta["impls"])}
    styles = {"forward": "-", "forward+backward": "--"}
    for impl in meta["impls"]:
        for mode in meta["modes"]:
            line = [r for r in results if r["impl"] == impl and r["mode"] == mode]
            ok = [r for r in line if r["status"] == "ok"]
            # Failed sides have no point; the legend names them so that a line's end is not misread.
            label = ", ".join([f"{impl}, {mode}"] + [f"{r['status']} at {r['side']}" for r in line if r not in ok])
            timed = [r for r in ok if r["time_median_s"] is not None]
            ax_t.plot([r["side"] for r in timed], [r["time_median_s"] for r in timed],
                      styles[mode], color=colors[impl], marker="o", label=label)
            # A log axis cannot show a zero peak (an op smaller than the RSS noise): such points are left out.
            sized = [r for r in ok if r["peak_bytes"] > 0]
            ax_m.plot([r["side"] for r in sized], [r["peak_bytes"] / 2**20 for r in sized],
                      styles[mode], color=colors[impl], marker="o", label=label)
    for ax, ylabel in ((ax_t, "median time per call (s)"), (ax_m, "peak memory over baseline (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(meta["sides"], [str(s) for s in meta["sides"]])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("grid side (query and key side x side)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"correspondence_warp, C={meta['channels']}, Cv={meta['value_channels']}, batch {meta['batch']}: "
                 f"{meta['cpu_model']}, {meta['threads']} threads, torch {meta['torch_version']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_correspondence_warp",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Quick check: python -m benchmarks.bench_correspondence_warp --sides 16 32 --repeats 2",
    )
    p.add_argument("--sides", type=int, nargs="+", default=[32, 64, 96, 128],
                   help="grid sides to sweep; query and key are both side x side (default: %(default)s)")
    p.add_argument("--channels", type=int, default=256,
                   help="feature channels C of query and key (default: %(default)s)")
    p.add_argument("--value-channels", type=int, default=3,
                   help="channels Cv of the warped value (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default: %(default)s)")
    p.add_argument("--impls", nargs="+", default=["reference", "cpu"],
                   help="backends to compare (names accepted by backend=); the first is the baseline "
                        "of the ratios (default: %(default)s)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="what one timed call runs (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed calls per config; 0: measure memory only (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed calls before the timed ones (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's default)")
    p.add_argument("--memory-cap-gb", type=float, default=20.0,
                   help="RLIMIT_DATA of each worker process in GiB; a config needing more is recorded "
                        "as OOM (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="seconds one config may run before it is killed and recorded as an error "
                        "(default: %(default)s)")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="where the .json, .md and .png files go (default: %(default)s)")
    p.add_argument("--worker", metavar="JSON",
                   help="internal: run the one config given as JSON in this process and print its "
                        "result as one JSON line")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.worker is not None:
        worker_main(args.worker)
        return

    import torch
    from tqdm import tqdm

    threads = args.threads or torch.get_num_threads()
    cpu_model = _cpu_model()
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_model": cpu_model,
        "logical_cpus": os.cpu_count(),
        "mem_total_gib": _mem_total_gib(),
        "platform": platform.platform(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "threads": threads,
        "command": shlex.join(["python", "-m", "benchmarks.bench_correspondence_warp",
                               *(sys.argv[1:] if argv is None else argv)]),
        "sides": args.sides, "impls": args.impls, "modes": args.modes,
        "channels": args.channels, "value_channels": args.value_channels, "batch": args.batch,
        "repeats": args.repeats, "warmup": args.warmup, "memory_cap_gb": args.memory_cap_gb,
        "temperature": TEMPERATURE, "dtype": "float32",
    }
    configs = [
        {"impl": impl, "side": side, "mode": mode, "channels": args.channels,
         "value_channels": args.value_channels, "batch": args.batch, "repeats": args.repeats,
         "warmup": args.warmup, "threads": threads, "memory_cap_gb": args.memory_cap_gb,
         "timeout_s": args.timeout}
        for side in args.sides for mode in args.modes for impl in args.impls
    ]
    results = []
    with tqdm(configs, desc="configs", unit="config") as bar:
        for config in bar:
            bar.set_postfix_str(f"{config['impl']} side {config['side']} {config['mode']}")
            results.append(measure(config))

    stem = f"correspondence_warp-cpu-{re.sub(r'[^a-z0-9]+', '-', cpu_model.lower()).strip('-')}-{threads}t"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown(meta, results)
    paths = [args.out_dir / f"{stem}.{ext}" for ext in ("json", "md", "png")]
    paths[0].write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    paths[1].write_text(table)
    plot(meta, results, paths[2])
    print(table)
    print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
