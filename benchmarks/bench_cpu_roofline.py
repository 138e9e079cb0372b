"""The CPU backend against the machine's sgemm peak and SDPA's CPU flash kernel, interleaved.

    python -m benchmarks.bench_cpu_roofline --sides 96 128 --repeats 5

On a shared or busy machine separate timings drift apart; here every round times the three
calls back to back in one process (a 2048^2 sgemm, the `cpu` backend, `sdpa-flash-pad-C`, the
implementations of benchmarks/bench_correspondence_warp.py on the same inputs), so their ratios
see the same load. Each call is timed (benchmarks.timing.time_call: torch.utils.benchmark.Timer,
--min-run-time-s per clock) on two clocks: wall time, and the process's CPU time (all its
threads), which other processes' load does not inflate (`--clock` picks the table's;
the JSON has both). CPU time counts OpenMP threads spinning at a barrier while a sibling was
descheduled, so under load it favours none of the three. Reported per (side, mode): medians over the rounds, each implementation's
share of the sgemm peak on its own FLOPs (ours 2 N^2 (D + Cv), SDPA's with the value padded to
D: 2 N^2 2D, times 3.5 with the backward) and the median of the per-round speed ratios.
Writes a JSON with every sample and a Markdown table (--out, without suffix).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import timeit
from pathlib import Path

from tqdm import tqdm

from benchmarks import bench_correspondence_warp as warp
from benchmarks.harness import cpu_model, make_step
from benchmarks.report import table as markdown_table
from benchmarks.report import write
from benchmarks.timing import time_call

MATMUL_SIDE = 2048
OURS, SDPA = "cpu", "sdpa-flash-pad-C"


def measure(side: int, mode: str, args) -> dict:
    """One (side, mode): `args.repeats` rounds of sgemm, ours and (unless --no-sdpa) SDPA flash."""
    config = {"device": "cpu", "dtype": "float32", "batch": 1, "channels": args.channels,
              "value_channels": args.value_channels, "patch_size": args.patch_size, "side": side, "mode": mode}
    impls = [OURS] if args.no_sdpa else [OURS, SDPA]
    steps = {"sgemm": make_step({"op": "matmul", "device": "cpu", "dtype": "float32"}, MATMUL_SIDE),
             **{impl: warp.make_step({**config, "impl": impl}, side) for impl in impls}}
    clocks = {"wall": timeit.default_timer, "cpu": time.process_time}
    samples = {clock: {name: [] for name in steps} for clock in clocks}
    load = os.getloadavg()[0]
    for _ in tqdm(range(args.repeats), desc=f"side {side} {mode}", unit="round", leave=False):
        for name, step in steps.items():
            for clock, timer in clocks.items():
                samples[clock][name].append(time_call(step, "cpu", args.min_run_time_s, timer=timer)["median_s"])
    times = samples[args.clock]
    width = args.channels * args.patch_size**2
    flops = {OURS: warp.flops(config), SDPA: warp.flops({**config, "value_channels": max(width, args.value_channels)}),
             "sgemm": 2.0 * MATMUL_SIDE**3}
    median = {name: statistics.median(t) for name, t in times.items()}
    peak = flops["sgemm"] / median["sgemm"]
    row = {**config, "threads": args.threads, "clock": args.clock, "load_average": load, "times_s": samples,
           "median_s": median, "peak_gflops": peak / 1e9,
           "share_of_peak": {name: flops[name] / median[name] / peak for name in impls}}
    if not args.no_sdpa:
        row["speedup_vs_sdpa"] = statistics.median(s / o for s, o in zip(times[SDPA], times[OURS]))
    return row


def table(rows: list[dict]) -> str:
    header = ["side", "N", "D", "Cv", "mode", "sgemm peak GFLOP/s", "ours", "of peak", "SDPA flash (pad C)", "of peak",
              "ours vs SDPA", "load avg"]
    cells = []
    for r in rows:
        sdpa = r["median_s"].get(SDPA)
        cells.append([r["side"], r["side"] ** 2, r["channels"] * r["patch_size"] ** 2, r["value_channels"], r["mode"],
                      f"{r['peak_gflops']:.1f}", f"{r['median_s'][OURS] * 1e3:.0f} ms", f"{r['share_of_peak'][OURS]:.0%}",
                      *([f"{sdpa * 1e3:.0f} ms", f"{r['share_of_peak'][SDPA]:.0%}", f"{r['speedup_vs_sdpa']:.2f}x"]
                        if sdpa else ["-", "-", "-"]), f"{r['load_average']:.1f}"])
    return "\n".join(markdown_table(header, cells, align="l" * 5 + "r" * 7))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[96, 128])
    parser.add_argument("--modes", nargs="+", default=["forward", "forward+backward"],
                        choices=["forward", "forward+backward"])
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--value-channels", type=int, default=3)
    parser.add_argument("--patch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="rounds (default: %(default)s)")
    parser.add_argument("--min-run-time-s", type=float, default=0.1,
                        help="the timer's budget per call and clock in a round (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-sdpa", action="store_true", help="time ours and the sgemm only")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="the table's clock: process CPU time (robust to other load) or wall time")
    parser.add_argument("--out", type=Path, default=None,
                        help="write OUT.json and OUT.md (default: print the table only)")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    rows = []
    for side in args.sides:
        for mode in args.modes:
            rows.append(measure(side, mode, args))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    header = (f"# CPU backend vs sgemm peak and SDPA flash, interleaved\n\n"
              f"- Machine: {cpu_model()}, {args.threads} threads; torch {torch.__version__}; "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
              f"- Command: `python -m benchmarks.bench_cpu_roofline {' '.join(argv or __import__('sys').argv[1:])}`\n"
              f"- Medians of {args.repeats} rounds, each timing a {MATMUL_SIDE}^2 sgemm, ours and SDPA back to back "
              f"(torch.utils.benchmark.Timer, {args.min_run_time_s:g} s each), "
              f"on the {'process CPU time' if args.clock == 'cpu' else 'wall'} clock; "
              f"'of peak': own FLOPs per second over the sgemm's; 'ours vs SDPA': median of the rounds' "
              f"SDPA time / our time; load avg: the 1-minute load average before the rounds\n\n")
    print(table(rows))
    if args.out:
        write(args.out, rows, header + table(rows) + "\n")


if __name__ == "__main__":
    main()
