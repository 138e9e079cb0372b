"""Kernel efficiency without a GPU: every Triton kernel config compiled ahead of time for NVIDIA
targets (sm_90 = H100/H200, sm_80 = A100) and the CUDA kernels compiled with nvcc, each with its
resources, its SASS instruction mix and a static roofline estimate of the headline configs.

    python -m benchmarks.kernel_report                     # writes benchmarks/results/kernels-sm_90.md, -sm_80.md (+ .json)
    python -m benchmarks.kernel_report --archs 90 --no-cuda

Compilation: `cocos_kernels.triton.aot.run_matrix` (`triton.compile` for a GPUTarget in child
processes, no GPU needed; that module's docstring says how), for the configs the launchers would
use on a GPU. Matrices: "default" (the compile test's fast subset), "headline" (what the GPU
check's headline timing rows autotune over: benchmarks/gpu_check.py), "full" (every flag
combination: the slow test).

Per compiled kernel: registers, spill stores/loads and stack frame (ptxas; cuobjdump
--dump-resource-usage), shared memory and whether it fits the card's per-block opt-in limit,
blocks per SM (registers, shared memory, threads), the SASS instruction mix (cuobjdump -sass:
HGMMA = wgmma, HMMA = mma.sync, LDSM, LDGSTS = cp.async, UTMALDG = TMA, LDG/STG, LDL/STL = local
memory, MUFU, FFMA; static counts), and the compile time.

The roofline estimate of a headline config (benchmarks/gpu_check.py's triton rows) per kernel and
config: max(tile-product FLOPs as issued (D and Cv padded to the tiles) / the rate of the SASS's
matrix path, exponentials / the MUFU rate, the other side's rows and columns read once per program
/ L2 bandwidth, the inputs and outputs once / HBM bandwidth), divided by the last wave's fill; the
best config of each kernel that fits (least spilling first), summed over the kernels of the mode, against
the useful FLOPs (benchmarks.bench_correspondence_warp.flops) as a share of the card's bf16 peak.
Rates (datasheet; the GPU check measures the real ones): sm_90 an H200 (989 / 494 / 67 TFLOP/s bf16
/ tf32 / fp32 FMA, 132 SMs x 16 MUFU ops per clock at 1.98 GHz, 4.8 TB/s HBM); sm_80 an A100 (312 /
156 / 19.5, 108 x 16 at 1.41 GHz, 2.0 TB/s). Assumed, not datasheet: L2 serves the re-reads at
10 TB/s (sm_90) / 5 TB/s (sm_80), and an HMMA-only kernel runs at half the tensor rate on sm_90
(mma.sync does not reach wgmma's rate on Hopper). A config that spills is estimated as if it did
not, and marked.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.report import table, write
from cocos_kernels.triton.aot import SELECT, SHARED_LIMIT, analyse_cubin, blocks_per_sm, case_of, run_matrix, tools

REPO = Path(__file__).resolve().parents[1]
RATES = {  # the roofline's card per target (module docstring)
    90: dict(card="H200", bf16=989e12, tf32=494e12, fp32=67e12, sms=132, mufu=132 * 16 * 1.98e9, hbm=4.8e12,
             l2=10e12),
    80: dict(card="A100", bf16=312e12, tf32=156e12, fp32=19.5e12, sms=108, mufu=108 * 16 * 1.41e9, hbm=2.0e12,
             l2=5e12),
}


# ----------------------------------------------------------------------------- the roofline estimate


def _label_blocks(label: str) -> dict:
    return {k: int(v) for k, v in re.findall(r"\b([MND])(\d+)", label)}


def _matrix_rate(arch: int, dtype: str, precision: str | None, sass: dict) -> tuple[float, str]:
    """(FLOP/s of the tile products, path) from the SASS's matrix instructions."""
    r = RATES[arch]
    if sass.get("wgmma"):
        path, factor = "wgmma", 1.0
    elif sass.get("mma"):
        path, factor = "mma.sync", 0.5 if arch == 90 else 1.0
    else:
        return r["fp32"], "FFMA"
    if dtype == "float32":
        tf32 = r["tf32"] * factor
        return (tf32 / 3 if precision == "tf32x3" else tf32), path
    return r["bf16"] * factor, path


def kernel_estimate(arch: int, row: dict, item: dict) -> dict:
    """Seconds of one compiled config of a kernel on the headline item (batch B, side^2 positions)."""
    r = RATES[arch]
    blocks = _label_blocks(row["config"])
    B, n, C, patch = item["batch"], item["side"] ** 2, item["channels"], item["patch_size"]
    D, cv_tile = C * patch * patch, max(16, 1 << (item["value_channels"] - 1).bit_length())
    pairs = B * n * n
    products = {"_forward_kernel": D + cv_tile, "_backward_dq_kernel": 2 * D + cv_tile,
                "_backward_dkdv_kernel": 2 * D + 2 * cv_tile}[row["kernel"]]
    flops = 2.0 * pairs * products
    rate, path = _matrix_rate(arch, item["dtype"], item["precision"], row.get("sass", {}))
    elt = 2 if item["dtype"] != "float32" else 4
    own = blocks["M"] if row["kernel"] != "_backward_dkdv_kernel" else blocks["N"]
    programs = B * math.ceil(n / own)
    # the other side's rows and value / grad_out columns once per program (window taps: cache hits)
    reread = programs * n * (C + item["value_channels"]) * elt
    unique = B * n * (3 * C + 2 * item["value_channels"]) * elt
    times = {"matrix": flops / rate, "exp": pairs / r["mufu"], "l2": reread / r["l2"], "hbm": unique / r["hbm"]}
    per_sm = max(1, row.get("blocks_per_sm") or 0)
    waves = math.ceil(programs / (r["sms"] * per_sm))
    fill = programs / (waves * r["sms"] * per_sm)
    return {"seconds": max(times.values()) / fill, "bound": max(times, key=times.get), "path": path,
            "fill": fill, **{f"{k}_s": v for k, v in times.items()}}


def roofline(arch: int, rows: list[dict], items: list[dict]) -> list[dict]:
    """Per headline item: the best fitting, spill-free (else best fitting) config of each kernel and the estimate."""
    from benchmarks.bench_correspondence_warp import flops

    kernels = {"forward": ("_forward_kernel",),
               "forward+backward": ("_forward_kernel", "_backward_dq_kernel", "_backward_dkdv_kernel")}
    out = []
    for item in items:
        entry, total = dict(item), 0.0
        for kernel in kernels[item["mode"]]:
            candidates = [r for r in rows if r.get("ok") and r["arch"] == arch and r["module"] == "correspondence_warp"
                          and r["kernel"] == kernel and r["dtype"] == item["dtype"] and r["patch"] == item["patch_size"]
                          and r["CV"] == item["value_channels"] and r.get("precision") == (
                              item["precision"] if item["dtype"] == "float32" else None)
                          and r.get("out", "x") in ("x", "fp32" if item["dtype"] == "float32" else "bf16")
                          and r["fits"] and r.get("blocks_per_sm")]
            if not candidates:
                entry[kernel] = None
                total = math.inf
                continue
            best = min(candidates, key=lambda r: (r.get("stack", 0), kernel_estimate(arch, r, item)["seconds"]))
            entry[kernel] = {"config": best["config"], "stack": best.get("stack", 0), **kernel_estimate(arch, best, item)}
            total += entry[kernel]["seconds"]
        useful = flops(item)
        entry.update(seconds=total, useful_flops=useful,
                     share_of_bf16_peak=useful / total / RATES[arch]["bf16"] if total and total < math.inf else 0.0)
        out.append(entry)
    return out


# ----------------------------------------------------------------------------- CUDA kernels


def cuda_rows(archs: list[int], jobs: int) -> tuple[list[dict], str | None]:
    """Each CUDA kernel (csrc/cuda/*.cu, one cubin per file and target, nvcc's flags as the JIT build's)."""
    try:
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

        from cocos_kernels import build
    except Exception as e:  # noqa: BLE001
        return [], f"no CUDA extension tooling: {e!r}"
    home = build.cuda_home()
    if home is None:
        return [], "no nvcc (no CUDA toolkit found)"
    nvcc = Path(home) / "bin" / "nvcc"
    cuobjdump = shutil.which("cuobjdump", path=str(Path(home) / "bin")) or tools()[0].get("cuobjdump")
    src = build.source_dir("cuda")
    if src is None:
        return [], "no CUDA sources found"
    gencode = {90: "arch=compute_90a,code=sm_90a", 80: "arch=compute_80,code=sm_80"}
    jobs_list = [(src / f, arch) for f in build.CUDA_SOURCES if f.endswith(".cu") for arch in archs]

    def compile_file(job):
        f, arch = job
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "k.cubin"
            t0 = time.perf_counter()
            proc = subprocess.run([str(nvcc), *COMMON_NVCC_FLAGS, *build.NVCC_FLAGS, "-gencode", gencode[arch], "-cubin",
                                   str(f), "-o", str(cubin)], capture_output=True, text=True, cwd=src)
            seconds = round(time.perf_counter() - t0, 1)
            if proc.returncode != 0:
                return [dict(module="cuda", file=f.name, arch=arch, ok=False, error=proc.stderr[-2000:],
                             seconds=seconds)]
            found = analyse_cubin(cubin.read_bytes(), cuobjdump)
        return [dict(module="cuda", file=f.name, arch=arch, kernel=_demangle(name), ok=True, seconds=seconds,
                     reg=u.get("reg"), stack=u.get("stack", 0), shared=u.get("shared", 0), sass=u.get("sass", {}))
                for name, u in found.items()]

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        rows = [r for part in pool.map(compile_file, jobs_list) for r in part]
    return rows, None


def _demangle(name: str) -> str:
    try:
        out = subprocess.run(["c++filt", name], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return name
    return re.sub(r"\s+", " ", out or name)[:160]


# ----------------------------------------------------------------------------- the report


def _mix(sass: dict | None) -> str:
    if not sass:
        return ""
    keys = ("wgmma", "mma", "ldsm", "cp.async", "tma", "ldg", "stg", "ldl", "stl", "mufu", "ffma")
    return " ".join(f"{k} {sass[k]}" for k in keys if sass.get(k)) + f" / {sass.get('total', 0)}"


def markdown(arch: int, report: dict) -> str:
    r = RATES[arch]
    roofline_rows = []
    for e in report["roofline"]:
        parts = []
        for k in ("_forward_kernel", "_backward_dq_kernel", "_backward_dkdv_kernel"):
            if k in e:
                v = e[k]
                spills = f", SPILLS {v['stack']} B" if v and v["stack"] else ""
                parts.append(f"{k.strip('_').replace('_kernel', '')}: " + (
                    "no fitting config" if v is None else f"{v['config']}, {v['path']}, {v['bound']}{spills}"))
        dtype = e["dtype"] + (f" ({e['precision']})" if e.get("precision") else "")
        ms = f"{e['seconds'] * 1e3:.2f}" if e["seconds"] < math.inf else "-"
        roofline_rows.append([dtype, f"{e['side']}^2", e["value_channels"], f"{e['patch_size']}x{e['patch_size']}",
                              e["mode"], "; ".join(parts), ms, f"{e['share_of_bf16_peak']:.0%}"])
    triton_rows = []
    for row in report["triton"]:
        case = " ".join(f"{k}={v}" for k, v in case_of(row) if k not in ("module", "kernel", "arch"))
        status = "ok" if row["ok"] and row["fits"] else "DOES NOT FIT" if row["ok"] else "FAILED"
        status += ", SPILLS" if row.get("stack") else ""
        triton_rows.append([row["module"], row["kernel"], case, row["config"], row.get("reg", ""), row.get("stack", ""),
                            row.get("shared", ""), row.get("blocks_per_sm", ""), _mix(row.get("sass")), row["seconds"],
                            status])
    lines = [f"# Kernel report, sm_{arch} (static: compiled, not run)", "",
             f"`python -m benchmarks.kernel_report` · triton {report['env'].get('triton')} · "
             f"{len(report['triton'])} Triton compiles in {report['wall_s']} s on {report['jobs']} processes. "
             "How each number is made: the module docstring of benchmarks/kernel_report.py.", "",
             f"## Headline configs: roofline estimate on an {r['card']}", "",
             "Per mode, the best config of each kernel that fits (least spilling first); time = max(matrix, exp, "
             "l2, hbm) / last-wave fill per kernel, summed; share = useful FLOPs / time / bf16 peak "
             f"({r['bf16'] / 1e12:.0f} TFLOP/s).", "",
             *table(["dtype", "grid", "Cv", "patch", "mode", "kernel: config, path, bound", "est. ms",
                     "share of bf16 peak"], roofline_rows),
             "", "## Triton kernels", "",
             f"Shared-memory limit per block {SHARED_LIMIT[arch]} B; stack = bytes of local memory per thread "
             "(ptxas spills); SASS mix: static instruction counts / total.", "",
             *table(["module", "kernel", "case", "config", "reg", "stack", "shared (B)", "blocks/SM", "SASS mix",
                     "compile s", "status"], triton_rows),
             "", "## CUDA kernels", ""]
    if report.get("cuda_skip"):
        lines.append(f"Not compiled: {report['cuda_skip']}")
    else:
        cuda_rows_md = [[row["file"], "FAILED", "", "", "", row["error"][:200], row["seconds"]] if not row["ok"] else
                        [row["file"], f"`{row['kernel']}`", row["reg"], row["stack"], row["shared"], _mix(row["sass"]),
                         row["seconds"]] for row in report["cuda"]]
        lines += ["Static shared memory only (the kernels take their tiles as dynamic shared memory).", "",
                  *table(["file", "kernel", "reg", "stack", "static shared (B)", "SASS mix", "compile s (file)"],
                         cuda_rows_md)]
    return "\n".join(lines) + "\n"


def headline_items() -> list[dict]:
    """The GPU check's headline triton rows (one source of truth for what is headline)."""
    from benchmarks import gpu_check

    return [it for it in gpu_check.timing_items(gpu_check.parse_args([])) if it["impl"] == "triton"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="90,80", help="compute capabilities (default: %(default)s)")
    p.add_argument("--matrix", choices=tuple(SELECT), default="headline", help="which configs (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: %(default)s)")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA kernels")
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)

    archs = [int(a) for a in args.archs.split(",")]
    report = run_matrix(args.matrix, args.jobs, archs=args.archs, sass=True)
    if report.get("skip"):
        print(f"kernel_report: no Triton compilation for NVIDIA targets: {report['skip']}", file=sys.stderr)
        return 1
    for row in report["results"]:
        if row.get("ok"):
            row["blocks_per_sm"] = blocks_per_sm(row["arch"], row.get("reg"), row["shared"], row["num_warps"])
    cuda, cuda_skip = ([], "--no-cuda") if args.no_cuda else cuda_rows(archs, args.jobs)
    items = headline_items()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    # The tools as this environment's, not this machine's paths: the files are committed.
    env = {k: v.replace(sys.prefix, "<python env>") if isinstance(v, str) else v for k, v in report["env"].items()}
    for arch in archs:
        part = {"env": env, "wall_s": report["wall_s"], "jobs": args.jobs, "matrix": args.matrix,
                "triton": [r for r in report["results"] if r["arch"] == arch],
                "cuda": [r for r in cuda if r["arch"] == arch], "cuda_skip": cuda_skip,
                "roofline": roofline(arch, report["results"], items)}
        stem = args.out_dir / f"kernels-sm_{arch}"
        write(stem, part, markdown(arch, part))
        print(f"kernel_report: wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
