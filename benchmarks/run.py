"""The benchmark suite: time and peak memory of every implementation, scaling curves, plots.

    python -m benchmarks.run --device cpu --suite quick     # ~10 min on 2 cores
    python -m benchmarks.run --device cpu --suite full      # a few hours on 2 cores (see README)
    python -m benchmarks.run --device cuda --suite full

For each op (correspondence_warp, contextual_loss; `--ops` picks) the suite sweeps grid side,
C, Cv, batch, dtype and mode over every implementation (`benchmarks/bench_<op>.py` lists them:
the materialised reference, PyTorch baselines, SDPA backends, pykeops, our fused backends).
Each config runs in a fresh worker process under a memory cap (`benchmarks/harness.py`: how
time and memory are measured, what OOM, refused and error mean).

Time cap: before a config runs, its time per call is estimated from the largest config of the
same op, impl, mode and dtype measured so far, scaled by FLOPs. Above --time-cap-s the config
runs only its memory call, stopped after --time-cap-s: it is then recorded with its peak memory
and no time, as OOM if it ran out of memory, or as "skipped" if that one call did not finish.
Configs run in increasing FLOPs, so every estimate rests on a measured smaller one. A config of
an impl that was refused, or ran out of memory, at a smaller size of the same curve is recorded
the same way without running.

Yardstick: the machine's matmul rate (a square matmul per dtype, measured by the same worker),
so each row shows its achieved TFLOP/s as a share of what this device reaches on a plain matmul.
Scaling: for each curve (everything fixed but the size) a least-squares line (numpy.polyfit) of
log peak memory against log N over its three largest measured points gives the exponent (1:
linear in N, 2: quadratic), reported under the tables.

Writes <op>-<device tag>-<suite>.json, .md and .png under --out-dir (device tag:
"cpu-<model>-<threads>t" or "cuda-<card>"; options overriding the suite keep its name, and the
command in the report says what ran). --from-results writes them again from saved .json files;
--check checks the implementations against the reference instead of measuring them.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import itertools
import json
import os
import platform
import re
import shlex
import sys
from pathlib import Path

import numpy

from benchmarks.harness import MODES, measure, cpu_model, mem_total_gib
from benchmarks.report import table, write
from cocos_kernels.extras import require

OPS = ("correspondence_warp", "contextual_loss")
DTYPES = ("float32", "bfloat16", "float16")
# Keys that identify a config's row (the rest of a config says how it was run).
ROW_KEYS = {
    "correspondence_warp": ("side", "n", "channels", "patch_size", "value_channels", "batch", "dtype", "mode"),
    "contextual_loss": ("image_size", "layer", "side", "n", "channels", "batch", "dtype", "mode"),
}
# Keys fixed along one scaling curve (its points differ in grid size only).
CURVE_KEYS = {
    "correspondence_warp": ("impl", "mode", "dtype", "channels", "patch_size", "value_channels", "batch"),
    "contextual_loss": ("impl", "mode", "dtype", "layer", "batch"),
}
HEADERS = {"n": "N", "channels": "C", "patch_size": "k", "value_channels": "Cv", "image_size": "image"}
PEAK_FLOOR_BYTES = {"cpu": 4 * 2**20, "cuda": 1}  # peaks below this are RSS noise, not fitted

_WARP_MAIN = {"channels": [256], "value_channels": [3], "batch": [1]}
_FWD_BWD = ["forward+backward"]
# The contenders of the quick suites' C, Cv and batch variants (every impl runs the main curve).
_CPU_CONTENDERS = ["reference", "key_chunked", "sdpa-flash-pad-C", "cpu"]
_CUDA_CONTENDERS = ["reference", "key_chunked", "sdpa-flash-pad-C", "sdpa-efficient-pad-8", "triton", "cuda"]
_PATCH_CONTENDERS = ["reference", "key_chunked", "cpu", "triton", "cuda"]
# suite -> device -> op -> sweeps; each sweep is the cartesian product of its lists.
# correspondence_warp: sides, channels, value_channels, batch, dtypes, modes (default both),
# patch_sizes (default 1);
# contextual_loss: image_sizes, layers, batch, dtypes, modes; both: impls (default every one).
# "run": the timer's budget per config (benchmarks/timing.py), the time cap.
SUITES = {
    "quick": {
        "cpu": {
            "correspondence_warp": [
                {"sides": [32, 64, 96], **_WARP_MAIN, "dtypes": ["float32"]},
                {"sides": [32], "channels": [64, 2304], "value_channels": [3], "batch": [1], "dtypes": ["float32"],
                 "modes": _FWD_BWD, "impls": _CPU_CONTENDERS},
                {"sides": [32], "channels": [256], "value_channels": [48, 151], "batch": [1], "dtypes": ["float32"],
                 "modes": _FWD_BWD, "impls": _CPU_CONTENDERS},
                {"sides": [32], "channels": [256], "value_channels": [3], "batch": [2], "dtypes": ["float32"],
                 "modes": _FWD_BWD, "impls": _CPU_CONTENDERS},
                # CoCosNet's 3x3 patch matching (D = 9C = 2304): the reference's unfolded features
                # and matrix against the window kernels.
                {"sides": [32, 64], **_WARP_MAIN, "patch_sizes": [3], "dtypes": ["float32"], "impls": _PATCH_CONTENDERS},
                {"sides": [96, 128], **_WARP_MAIN, "patch_sizes": [3], "dtypes": ["float32"], "modes": ["forward"],
                 "impls": _PATCH_CONTENDERS},
            ],
            "contextual_loss": [{"image_sizes": [256], "layers": ["relu2_2", "relu3_2", "relu4_2", "relu5_2"],
                                 "batch": [1], "dtypes": ["float32"]}],
            "run": {"min_run_time_s": 0.5, "time_cap_s": 20.0},
        },
        "cuda": {
            "correspondence_warp": [
                {"sides": [32, 64, 128, 256], **_WARP_MAIN, "dtypes": ["float32", "bfloat16"]},
                {"sides": [128], "channels": [2304], "value_channels": [3], "batch": [1], "dtypes": ["bfloat16"],
                 "modes": _FWD_BWD, "impls": _CUDA_CONTENDERS},
                {"sides": [128], "channels": [256], "value_channels": [48, 151], "batch": [1], "dtypes": ["bfloat16"],
                 "modes": _FWD_BWD, "impls": _CUDA_CONTENDERS},
                {"sides": [64, 128], **_WARP_MAIN, "patch_sizes": [3], "dtypes": ["float32", "bfloat16"],
                 "impls": _PATCH_CONTENDERS},
            ],
            "contextual_loss": [{"image_sizes": [256, 512], "layers": ["relu2_2", "relu3_2", "relu4_2", "relu5_2"],
                                 "batch": [1], "dtypes": ["float32"]}],
            "run": {"min_run_time_s": 0.1, "time_cap_s": 10.0},
        },
    },
    "full": {
        "cpu": {
            "correspondence_warp": [
                {"sides": [16, 32, 64, 96, 128], "channels": [64, 256, 2304], "value_channels": [3], "batch": [1],
                 "dtypes": ["float32"]},
                {"sides": [16, 32, 64, 96, 128], "channels": [256], "value_channels": [48, 151], "batch": [1],
                 "dtypes": ["float32"]},
                {"sides": [32, 64], "channels": [256], "value_channels": [3], "batch": [4], "dtypes": ["float32"]},
                {"sides": [32, 64], **_WARP_MAIN, "dtypes": ["bfloat16"]},
            ],
            "contextual_loss": [{"image_sizes": [256, 512, 1024],
                                 "layers": ["relu2_2", "relu3_2", "relu4_2", "relu5_2"],
                                 "batch": [1], "dtypes": ["float32"]}],
            "run": {"min_run_time_s": 1.0, "time_cap_s": 60.0},
        },
        "cuda": {
            "correspondence_warp": [
                {"sides": [16, 32, 64, 128, 256], "channels": [64, 256, 2304], "value_channels": [3, 48, 151],
                 "batch": [1], "dtypes": ["float32", "bfloat16"]},
                {"sides": [64, 128], "channels": [256], "value_channels": [3], "batch": [4],
                 "dtypes": ["float32", "bfloat16"]},
            ],
            "contextual_loss": [{"image_sizes": [256, 512, 1024],
                                 "layers": ["relu2_2", "relu3_2", "relu4_2", "relu5_2"],
                                 "batch": [1], "dtypes": ["float32", "bfloat16"]}],
            "run": {"min_run_time_s": 0.3, "time_cap_s": 30.0},
        },
    },
}
MATMUL_SIDE = {"cpu": 2048, "cuda": 8192}


def op_module(op: str):
    return importlib.import_module(f"benchmarks.bench_{op}")


def configs_of(op: str, sweeps: list[dict], device: str, impls: list[str] | None) -> list[dict]:
    """Every config of these sweeps, each impl of the op on `device` (or `impls`)."""
    available = op_module(op).impls(device)
    configs = []
    for sweep in sweeps:
        names = [i for i in (impls or sweep.get("impls", available)) if i in available]
        modes = sweep.get("modes", list(MODES))
        if op == "correspondence_warp":
            for side, c, p, cv, b, dtype, mode in itertools.product(
                    sweep["sides"], sweep["channels"], sweep.get("patch_sizes", [1]), sweep["value_channels"],
                    sweep["batch"], sweep["dtypes"], modes):
                configs += [{"op": op, "impl": i, "side": side, "channels": c, "patch_size": p, "value_channels": cv,
                             "batch": b, "dtype": dtype, "mode": mode, "device": device} for i in names]
        else:
            layers = op_module(op).LAYERS
            for size, layer, b, dtype, mode in itertools.product(
                    sweep["image_sizes"], sweep["layers"], sweep["batch"], sweep["dtypes"], modes):
                channels, down = layers[layer]
                configs += [{"op": op, "impl": i, "image_size": size, "layer": layer, "side": size // down,
                             "channels": channels, "value_channels": 0, "batch": b, "dtype": dtype, "mode": mode,
                             "device": device} for i in names]
    unique = {json.dumps(c, sort_keys=True): c for c in configs}  # sweeps may overlap
    return list(unique.values())


def curve_key(r: dict) -> tuple:
    return tuple(r[k] for k in CURVE_KEYS[r["op"]])


def _estimate(config: dict, done: list[dict]) -> tuple[float, dict] | None:
    """Seconds per call of `config` scaled by FLOPs from the largest measured config of the same
    op, impl, mode and dtype, and that config; None if there is none."""
    same = [r for r in done if r["status"] == "ok" and r["time_median_s"]
            and all(r[k] == config[k] for k in ("op", "impl", "mode", "dtype"))]
    if not same:
        return None
    basis = max(same, key=lambda r: r["flops"])
    return basis["time_median_s"] * config["flops"] / basis["flops"], basis


def _label(r: dict) -> str:
    keys = [k for k in ROW_KEYS[r["op"]] if k not in ("n", "mode")]
    return " ".join(f"{k}={r[k]}" for k in keys) + f" {r['mode']}"


def run_config(config: dict, done: list[dict], time_cap_s: float) -> dict:
    """Measure one config (or record it without running where a smaller point of its curve was
    refused or out of memory, or mark its timing skipped where it is estimated over the cap)."""
    for r in done:
        if curve_key(r) == curve_key(config) and r["side"] <= config["side"] and r["status"] in ("refused", "OOM"):
            row = {**config, "n": config["side"] ** 2, **{k: None for k in ("time_median_s", "peak_bytes")}}
            if r["status"] == "refused":
                return {**row, "status": "refused", "error": r["error"]}
            return {**row, "status": "OOM", "error": f"not run: out of memory already at side {r['side']}"}
    estimate = _estimate(config, done)
    if estimate is None or estimate[0] <= time_cap_s:
        # the warm-up and memory calls, then at most ~8 calls of the timer (benchmarks/timing.py)
        return {**config, **measure({**config, "timeout_s": 600.0 + 10 * time_cap_s + 2 * config["min_run_time_s"]})}
    seconds, basis = estimate
    why = f"> {time_cap_s:g} s per call estimated ({seconds:.0f} s, scaled by FLOPs from {_label(basis)})"
    # Only the memory call, stopped at the cap; 60 s more for start-up and the warm-up call.
    row = {**config, **measure({**config, "min_run_time_s": 0, "timeout_s": time_cap_s + 60.0})}
    if row["status"] == "ok":
        return {**row, "time_median_s": None, "error": f"timing skipped: {why}"}
    if row["status"] == "error" and row["error"].startswith("timed out"):
        return {**row, "status": "skipped", "error": f"{why}; its memory call did not finish in {time_cap_s:g} s either"}
    return row


def matmul_tflops(device: str, dtype: str, threads: int | None, min_run_time_s: float) -> float | None:
    side = MATMUL_SIDE[device]
    r = measure({"op": "matmul", "side": side, "dtype": dtype, "device": device, "mode": "forward",
                 "min_run_time_s": max(min_run_time_s, 0.5), "threads": threads, "memory_cap_gb": 64.0})
    return 2.0 * side**3 / r["time_median_s"] / 1e12 if r["status"] == "ok" else None


def memory_fits(results: list[dict], device: str) -> list[dict]:
    """Per curve: the exponent of peak memory in N (least squares of log peak against log N over
    its three largest measured points above the noise floor)."""
    curves: dict[tuple, list[dict]] = {}
    for r in results:
        if r["status"] == "ok" and r["peak_bytes"] is not None and r["peak_bytes"] >= PEAK_FLOOR_BYTES[device]:
            curves.setdefault(curve_key(r), []).append(r)
    fits = []
    for key, points in curves.items():
        points = sorted(points, key=lambda r: r["n"])[-3:]
        if len({r["n"] for r in points}) < 2:
            continue
        slope = float(numpy.polyfit(numpy.log([r["n"] for r in points]), numpy.log([r["peak_bytes"] for r in points]),
                                    1)[0])
        kind = "linear" if slope < 1.25 else "quadratic" if slope > 1.75 else "between"
        fits.append({"op": points[0]["op"], **dict(zip(CURVE_KEYS[points[0]["op"]], key)),
                     "n_points": [r["n"] for r in points], "exponent": slope, "kind": kind})
    return fits


# ----------------------------------------------------------------------------- report

def _fmt_time(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.2f} s"


def _cells(r: dict, ref: dict | None, peak_tflops: float | None) -> list[str]:
    ok = r["status"] == "ok"
    peak = f"{r['peak_bytes'] / 2**20:.1f}" if ok and r["peak_bytes"] is not None else "-"
    timed = ok and r["time_median_s"]
    tflops = r["flops"] / r["time_median_s"] / 1e12 if timed else None
    share = f"{tflops / peak_tflops:.1%}" if tflops and peak_tflops else "-"

    def ratio(key):
        if not (ok and ref and ref["status"] == "ok" and ref[key] and r[key] and r[key] > 0):
            return "-"
        return f"{ref[key] / r[key]:.2f}x"
    return [r["impl"], r["status"], _fmt_time(r["time_median_s"]) if timed else "-", peak,
            f"{tflops:.3g}" if tflops else "-", share, ratio("time_median_s"), ratio("peak_bytes")]


def _time_method(meta: dict) -> str:
    if "min_run_time_s" not in meta:  # results that record repeats and warm-up calls instead (benchmarks/results)
        return (f"median of {meta['repeats']} calls after {meta['warmup']} warm-up calls "
                f"({'CUDA events' if meta['device'] == 'cuda' else 'time.perf_counter'}; all samples in the JSON)")
    timer = ("triton.testing.do_bench" if meta["device"] == "cuda"
             else "torch.utils.benchmark.Timer.blocked_autorange")
    return (f"median per call of {timer} over {meta['min_run_time_s']:g} s after its own warm-up "
            "(benchmarks/timing.py; all samples in the JSON)")


def markdown(meta: dict, op: str, results: list[dict], fits: list[dict]) -> str:
    keys = ROW_KEYS[op]
    header = [*(HEADERS.get(k, k) for k in keys), "impl", "status", "time", "peak MiB", "TFLOP/s", "of matmul peak",
              "speed-up vs reference", "memory ratio vs reference"]
    by_row: dict[tuple, list[dict]] = {}
    for r in results:
        by_row.setdefault(tuple(r[k] for k in keys), []).append(r)
    order = {name: i for i, name in enumerate(meta["impls"][op])}
    rows = []
    for key in sorted(by_row, key=lambda k: [str(x).zfill(8) if isinstance(x, int) else str(x) for x in k]):
        group = sorted(by_row[key], key=lambda r: order.get(r["impl"], len(order)))
        ref = next((r for r in group if r["impl"] == "reference"), None)
        rows += [[*map(str, key), *_cells(r, ref, meta["matmul_tflops"].get(r["dtype"]))] for r in group]
    peaks = ", ".join(f"{d} {t:.3g}" for d, t in meta["matmul_tflops"].items() if t) or "not measured"
    lines = [
        f"# {op}: {meta['suite']} suite on {meta['device_name']}",
        "",
        f"- Date: {meta['date']}",
        f"- Machine: {meta['device_name']}; host {meta['cpu_model']}, {meta['logical_cpus']} logical CPUs, "
        f"{meta['mem_total_gib']:.1f} GiB RAM, {meta['platform']}",
        f"- torch {meta['torch_version']}, {meta['threads']} CPU threads",
        f"- Command: `{meta['command']}`",
        *([f"- Note: {meta['note']}"] if meta["note"] else []),
        f"- Time: {_time_method(meta)}",
        "- Peak MiB: " + ("CUDA allocator peak over the allocation before the call" if meta["device"] == "cuda"
                          else "resident memory (VmHWM) one call adds over its baseline (inputs created, "
                               "extension loaded)") + "; see benchmarks/harness.py",
        f"- Memory cap per config: {meta['memory_cap_gb']:g} GiB; time cap: {meta['time_cap_s']:g} s per call "
        "(estimated from a smaller config; see benchmarks/run.py)",
        f"- Matmul peak (TFLOP/s, a {MATMUL_SIDE[meta['device']]}^2 matmul): {peaks}; TFLOP/s counts useful "
        f"FLOPs (`flops` in benchmarks/bench_{op}.py)",
        "- Ratios: reference time / impl time (above 1: faster) and reference peak / impl peak (above 1: "
        "less memory)",
        "",
        *table(header, rows, align="l" * (len(keys) + 2) + "r" * (len(header) - len(keys) - 2)),
    ]
    if fits:
        lines += ["", "## Memory scaling", "",
                  "Exponent of peak memory in N (least squares of log peak vs log N over the curve's three "
                  "largest measured points; 1: linear, 2: quadratic).", "",
                  *table([*(HEADERS.get(k, k) for k in CURVE_KEYS[op]), "N", "exponent", ""],
                         [[*(f[k] for k in CURVE_KEYS[op]), ", ".join(map(str, f["n_points"])), f"{f['exponent']:.2f}",
                           f["kind"]] for f in fits], align="l" * (len(CURVE_KEYS[op]) + 1) + "rl")]
    notes = {}
    for r in results:
        if r["status"] != "ok" or r["error"]:
            notes.setdefault((r["impl"], r["status"], r["error"]), []).append(_label(r))
    if notes:
        lines += ["", "## Not measured, refused or failed", ""]
        lines += [f"- {impl} ({status}, {len(where)} config{'s' * (len(where) > 1)}, first {where[0]}): {error}"
                  for (impl, status, error), where in notes.items()]
    return "\n".join(lines) + "\n"


def _main_curve(results: list[dict]) -> dict:
    """The curve settings (but impl and mode) with the most sizes: the one plotted."""
    counts: dict[tuple, set] = {}
    for r in results:
        key = tuple(r[k] for k in CURVE_KEYS[r["op"]] if k not in ("impl", "mode", "layer"))
        counts.setdefault(key, set()).add(r["n"])
    best = max(counts, key=lambda k: len(counts[k]))
    return dict(zip([k for k in CURVE_KEYS[results[0]["op"]] if k not in ("impl", "mode", "layer")], best))


def plot(meta: dict, op: str, results: list[dict], path: Path) -> None:
    """Log-log time and peak memory against N of the main curve, one line per impl and mode;
    configs that did not run to the end are marked x at the top, their status in the legend."""
    require("benchmark plots", "matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    curve = _main_curve(results)
    results = [r for r in results if all(r[k] == v for k, v in curve.items())]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(14, 6))
    tab20 = plt.get_cmap("tab20")

    def color(i):  # tab20's ten dark hues first, then their light twins
        return tab20((2 * i) % 20 + (i // 10) % 2)
    styles = {"forward": "-", "forward+backward": "--"}
    plotted = {ax_t: False, ax_m: False}  # a log axis with no positive point makes matplotlib raise
    for i, impl in enumerate(meta["impls"][op]):
        for mode in MODES:
            line = sorted((r for r in results if r["impl"] == impl and r["mode"] == mode), key=lambda r: r["n"])
            if not line or all(r["status"] == "refused" for r in line):
                continue
            failed = [r for r in line if r["status"] not in ("ok",)]
            label = ", ".join([f"{impl} {mode}"] + [f"{r['status']} at N={r['n']}" for r in failed])
            for ax, key, scale in ((ax_t, "time_median_s", 1.0), (ax_m, "peak_bytes", 2**-20)):
                pts = [r for r in line if r["status"] == "ok" and r[key] and r[key] > 0]
                plotted[ax] |= bool(pts)
                ax.plot([r["n"] for r in pts], [r[key] * scale for r in pts], styles[mode], color=color(i),
                        marker="o", markersize=3, label=label)
                top = blended_transform_factory(ax.transData, ax.transAxes)
                ax.plot([r["n"] for r in failed], [0.98] * len(failed), "x", color=color(i), transform=top)
    for ax, ylabel in ((ax_t, "median time per call (s)"), (ax_m, "peak memory over baseline (MiB)")):
        ax.set_xscale("log")
        if plotted[ax]:
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no configuration finished", transform=ax.transAxes, ha="center", va="center")
        ax.set_xlabel("N = positions of query and key (grid side^2)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    if ax_m.get_legend_handles_labels()[0]:
        ax_m.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"{op} ({', '.join(f'{k}={v}' for k, v in curve.items())}), x: did not finish (legend): "
                 f"{meta['device_name']}, torch {meta['torch_version']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- driver

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device of the inputs (default: cpu)")
    p.add_argument("--suite", choices=list(SUITES), default="quick", help="which sweep (default: quick)")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="ops to run (default: both)")
    p.add_argument("--impls", nargs="+", default=None,
                   help="implementations to run (default: every one of the op for the device)")
    g = p.add_argument_group("overriding the suite's sweep (each replaces the suite's sweeps of the op by one)")
    g.add_argument("--sides", type=int, nargs="+", help="correspondence_warp grid sides")
    g.add_argument("--channels", type=int, nargs="+", help="correspondence_warp feature channels C")
    g.add_argument("--value-channels", type=int, nargs="+", help="correspondence_warp value channels Cv")
    g.add_argument("--image-sizes", type=int, nargs="+", help="contextual_loss image sides")
    g.add_argument("--layers", nargs="+", help="contextual_loss VGG-19 layers (relu2_2 relu3_2 relu4_2 relu5_2)")
    g.add_argument("--batch", type=int, nargs="+", help="batch sizes")
    g.add_argument("--dtypes", nargs="+", choices=DTYPES, help="dtypes")
    g.add_argument("--modes", nargs="+", choices=MODES, help="forward and/or forward+backward")
    g.add_argument("--min-run-time-s", type=float,
                   help="seconds the timer spends on a config, after its own warm-up (benchmarks/timing.py)")
    g.add_argument("--time-cap-s", type=float, help="estimated seconds per call above which a config is not timed")
    p.add_argument("--memory-cap-gb", type=float, default=None,
                   help="memory cap of each worker in GiB (default: half the RAM on cpu, 90%% of the card on cuda)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    p.add_argument("--note", default="", help="a line for the report's header (e.g. that the machine was shared)")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="where the .json, .md and .png files go (default: benchmarks/results)")
    p.add_argument("--check", action="store_true",
                   help="measure nothing: check each correspondence_warp implementation (--impls, default every one "
                        "of --device) against the reference in float64, output and gradients, at a 65x65 grid "
                        "(past the block edges of the chunked baselines); exit 1 if one differs")
    p.add_argument("--from-results", type=Path, nargs="+", metavar="JSON",
                   help="measure nothing: write the reports (.md, .png, the memory fits) of these saved .json "
                        "results again, under their names in --out-dir")
    return p


def _sweeps(args, op: str, suite: dict) -> list[dict]:
    sweeps = suite[op]
    if op == "correspondence_warp":
        overrides = {"sides": args.sides, "channels": args.channels, "value_channels": args.value_channels}
    else:
        overrides = {"image_sizes": args.image_sizes, "layers": args.layers}
    overrides.update(batch=args.batch, dtypes=args.dtypes, modes=args.modes)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if not overrides:
        return sweeps
    return [{**sweeps[0], **overrides}]


def check_implementations(device: str, impls: list[str] | None) -> list[dict]:
    """bench_correspondence_warp.check of each implementation; one line each; SystemExit(1) if one differs."""
    from benchmarks.harness import Refused

    module = op_module("correspondence_warp")
    rows = []
    for impl in impls or module.impls(device):
        try:
            module.check(impl, device)
        except Refused as e:
            rows.append({"impl": impl, "status": "refused", "error": str(e)})
        except AssertionError as e:
            rows.append({"impl": impl, "status": "differs", "error": str(e)})
        else:
            rows.append({"impl": impl, "status": "ok", "error": None})
        what = {"ok": "agrees with the reference", "refused": "refused", "differs": "DIFFERS from the reference"}
        print(f"{impl}: {what[rows[-1]['status']]}" + (f": {rows[-1]['error']}" if rows[-1]["error"] else ""),
              flush=True)
    if any(r["status"] == "differs" for r in rows):
        raise SystemExit(1)
    return rows


def write_reports(meta: dict, op: str, results: list[dict], stem: Path) -> None:
    """stem.json (meta, results, memory fits), stem.md and stem.png of one op's results."""
    fits = memory_fits(results, meta["device"])
    text = markdown(meta, op, results, fits)
    write(stem, {"meta": meta, "results": results, "memory_fits": fits}, text)
    plot(meta, op, results, stem.with_name(stem.name + ".png"))
    print(text)
    print(f"wrote {stem}.json, .md, .png")


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.from_results:
        by_op = {}
        for path in args.from_results:
            saved = json.loads(path.read_text())
            op = saved["results"][0]["op"]
            by_op[op] = saved["results"]
            write_reports(saved["meta"], op, saved["results"], args.out_dir / path.stem)
        return by_op
    if args.layers:
        unknown = sorted(set(args.layers) - set(op_module("contextual_loss").LAYERS))
        if unknown:
            parser.error(f"--layers: unknown {unknown}; choose from {list(op_module('contextual_loss').LAYERS)}")
    if args.impls:
        known = {i for op in args.ops for i in op_module(op).impls(args.device)}
        if unknown := sorted(set(args.impls) - known):
            parser.error(f"--impls: {unknown} is not an implementation of {args.ops} on {args.device}; "
                         f"choose from {' '.join(sorted(known))}")
    import torch
    from tqdm import tqdm

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks.run: --device cuda but torch sees no CUDA device")
    if args.check:
        return {"correspondence_warp": check_implementations(args.device, args.impls)}
    suite = SUITES[args.suite][args.device]
    settings = {**suite["run"], **{k: getattr(args, k) for k in ("min_run_time_s", "time_cap_s")
                                   if getattr(args, k) is not None}}
    if args.memory_cap_gb is not None:
        cap = args.memory_cap_gb
    elif args.device == "cuda":
        cap = 0.9 * torch.cuda.get_device_properties(0).total_memory / 2**30
    else:
        cap = round(mem_total_gib() / 2, 1)
    threads = args.threads or torch.get_num_threads()
    model = cpu_model()
    if args.device == "cuda":
        device_name = torch.cuda.get_device_name()
        tag = "cuda-" + re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    else:
        device_name = f"{model} ({threads} threads)"
        tag = f"cpu-{re.sub(r'[^a-z0-9]+', '-', model.lower()).strip('-')}-{threads}t"

    configs = []
    for op in args.ops:
        module = op_module(op)
        for c in configs_of(op, _sweeps(args, op, suite), args.device, args.impls):
            configs.append({**c, "flops": module.flops(c), "min_run_time_s": settings["min_run_time_s"],
                            "threads": threads, "memory_cap_gb": cap})
    configs.sort(key=lambda c: c["flops"])  # estimates of the big ones rest on the small ones
    dtypes = sorted({c["dtype"] for c in configs})
    print(f"benchmarks.run: {len(configs)} configs, measuring the matmul peak first", flush=True)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "suite": args.suite, "device": args.device, "device_name": device_name, "cpu_model": model,
        "logical_cpus": os.cpu_count(), "mem_total_gib": mem_total_gib(), "platform": platform.platform(),
        "torch_version": torch.__version__, "python_version": platform.python_version(), "threads": threads,
        "command": shlex.join(["python", "-m", "benchmarks.run", *(sys.argv[1:] if argv is None else argv)]),
        "note": args.note, "memory_cap_gb": cap, **settings,
        "matmul_tflops": {d: matmul_tflops(args.device, d, threads, settings["min_run_time_s"]) for d in dtypes},
        "impls": {op: [i for i in op_module(op).impls(args.device) if not args.impls or i in args.impls]
                  for op in args.ops},
    }
    done: list[dict] = []
    with tqdm(configs, desc="configs", unit="config") as bar:
        for config in bar:
            bar.set_postfix_str(f"{config['op']} {config['impl']} {_label(config)}")
            done.append(run_config(config, done, settings["time_cap_s"]))

    by_op = {op: [r for r in done if r["op"] == op] for op in args.ops}
    for op, results in by_op.items():
        if results:
            write_reports(meta, op, results, args.out_dir / f"{op}-{tag}-{args.suite}")
    return by_op


if __name__ == "__main__":
    main()
