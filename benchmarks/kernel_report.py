"""Kernel efficiency without a GPU: every Triton kernel config compiled ahead of time for NVIDIA
targets (sm_90 = H100/H200, sm_80 = A100) and the CUDA kernels compiled with nvcc, each with its
resources, its SASS instruction mix, and a static roofline estimate of the headline configs for the
Triton and the CUDA kernels, set against the targets, and of the GPU check's contextual_loss configs
for the CUDA kernels.

    python -m benchmarks.kernel_report                     # writes benchmarks/results/kernels-sm_90.md, -sm_80.md (+ .json)
    python -m benchmarks.kernel_report --archs 90 --no-cuda
    python -m benchmarks.kernel_report --from-results benchmarks/results/kernels-sm_90.json   # estimates only

Compilation: `cocos_kernels.triton.aot.run_matrix` (`triton.compile` for a GPUTarget in child
processes, no GPU needed; that module's docstring says how), for the configs the launchers would
use on a GPU. Matrices: "default" (the compile test's fast subset), "headline" (what the GPU
check's headline timing rows autotune over: benchmarks/gpu_check.py), "full" (every flag
combination: the slow test). `--from-results` compiles nothing: it makes the estimates and the
reports again from the compiled rows of saved reports.

Per compiled kernel: registers, spill stores/loads and stack frame (ptxas; cuobjdump
--dump-resource-usage), shared memory and whether it fits the card's per-block opt-in limit,
blocks per SM (registers, shared memory, threads), the SASS instruction mix (cuobjdump -sass:
HGMMA = wgmma, HMMA = mma.sync, LDSM, LDGSTS = cp.async, UTMALDG = TMA, LDG/STG, LDL/STL = local
memory, MUFU, FFMA; static counts), and the compile time.

The roofline estimate of a kernel launch on a headline config (benchmarks/gpu_check.py's rows):
max(tile-product FLOPs as issued (padded to the tiles) / the rate of the SASS's matrix path,
exponentials / the MUFU rate, L2 bytes / L2 bandwidth, HBM bytes / HBM bandwidth), divided by the
last wave's fill. The bytes (`Traffic`, by `triton_traffic` and the CUDA kernels' `_mma_work`,
`_streamed_work`, `_fma_work`, `_contextual_work`): HBM carries each input and each output once;
the L2 the operand tiles every program loads per block (the other side's rows, its own rows again
per block where D is chunked or streamed), which the programs resident together read from the L2
after the first; the float32 accumulators of the chunked backward (the streamed CUDA backward's
gradient planes), read and written once per (streamed block, D chunk; the planes per group of
streamed blocks), go to the L2 while the resident programs' accumulators fit in it, else to HBM.
Triton: per kernel the config that fits and spills least (spills of up to SMALL_SPILL bytes a thread
count as none), then the fastest by this estimate. CUDA: the launches the launchers make for the
item, their kernels, grids, tiles and dynamic shared memory, as csrc/cuda/testing/launch_probe.cu
records them from the launchers' own dispatch (`launch_plans`: built with nvcc and run here; saved
in the JSON for `--from-results`), with blocks per SM from ptxas's registers and that shared memory.
Shares: the useful FLOPs (benchmarks.bench_correspondence_warp.flops) per second of the summed
kernels, against the card's bf16 peak (contextual_loss: the FP32 FMA peak). The reference
(`reference_seconds`): its n x n matrices through HBM op by op.

Rates (`CARDS`: dense datasheet numbers, the GPU check measures the real ones): sm_90 an H200,
sm_80 an A100. Assumed, not datasheet: the L2 bandwidth (10 TB/s sm_90, 5 TB/s sm_80), and an
mma.sync (HMMA-only) kernel runs at half the tensor rate on sm_90 (mma.sync does not reach
wgmma's rate on Hopper). A config that spills is estimated as if it did not, and marked. Not
modelled: shared-memory bandwidth and latency (the CUDA shared-memory kernels are bound by them
rather than by these roofs), the forward's key split.
"""
from __future__ import annotations

import argparse
import atexit
import functools
import json
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
from typing import NamedTuple

from benchmarks.report import table, write
from cocos_kernels.triton.aot import SHARED_LIMIT, SELECT, analyse_cubin, blocks_per_sm, case_of, run_matrix, tools

REPO = Path(__file__).resolve().parents[1]
# The static yardstick: dense datasheet peaks (NVIDIA H100 / H200 / A100 SXM datasheets; MUFU: 16 ops per
# SM per clock at the boost clock, CUDA C++ Programming Guide's arithmetic throughput table) and
# the L2's size (same datasheets). Assumed, not datasheet: l2 = the bandwidth at which L2 serves re-reads.
CARDS = {
    "H100 SXM": dict(bf16=989e12, tf32=494e12, fp32=67e12, sms=132, clock=1.98e9, hbm=3.35e12, l2=10e12, l2_bytes=50e6),
    "H200 SXM": dict(bf16=989e12, tf32=494e12, fp32=67e12, sms=132, clock=1.98e9, hbm=4.8e12, l2=10e12, l2_bytes=50e6),
    "A100 SXM": dict(bf16=312e12, tf32=156e12, fp32=19.5e12, sms=108, clock=1.41e9, hbm=2.0e12, l2=5e12, l2_bytes=40e6),
}
CARD = {90: "H200 SXM", 80: "A100 SXM"}  # the card each target's estimate is made for
RATES = {arch: dict(CARDS[card], card=card, mufu=CARDS[card]["sms"] * 16 * CARDS[card]["clock"])
         for arch, card in CARD.items()}


# ----------------------------------------------------------------------------- the roofline model


class Traffic(NamedTuple):
    """Bytes one kernel launch moves. hbm: each input once and each output once (compulsory); l2: the
    operand tiles its programs load block by block (re-reads of rows other programs stream at the same
    time: L2 hits); rmw: float32 accumulators read and written again per (block, D chunk) pass, by the
    program owning them; acc: one program's accumulator bytes (the L2 keeps the resident programs' ones,
    or the rmw goes to HBM)."""
    hbm: float
    l2: float
    rmw: float = 0.0
    acc: float = 0.0


def roofline_time(arch: int, flops: float, rate: float, exps: float, traffic: Traffic, programs: int,
                  per_sm: int) -> dict:
    """Seconds of one launch: max(flops / matrix rate, exps / MUFU rate, L2 bytes / L2 bandwidth,
    HBM bytes / HBM bandwidth), divided by the last wave's fill."""
    r = RATES[arch]
    resident = min(programs, r["sms"] * per_sm)
    rmw_level = "hbm" if resident * traffic.acc > r["l2_bytes"] else "l2"
    hbm = traffic.hbm + (traffic.rmw if rmw_level == "hbm" else 0.0)
    l2 = traffic.l2 + (traffic.rmw if rmw_level == "l2" else 0.0)
    times = {"matrix": flops / rate, "exp": exps / r["mufu"], "l2": l2 / r["l2"], "hbm": hbm / r["hbm"]}
    waves = math.ceil(programs / (r["sms"] * per_sm))
    fill = programs / (waves * r["sms"] * per_sm)
    return {"seconds": max(times.values()) / fill, "bound": max(times, key=times.get), "fill": fill,
            "hbm_bytes": hbm, "l2_bytes": l2, "rmw_bytes": traffic.rmw, "rmw_level": rmw_level if traffic.rmw else None,
            **{f"{k}_s": v for k, v in times.items()}}


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


def _shape(item: dict) -> tuple:
    """(B, n, C, taps, Cv, input bytes per element) of a headline item; D = taps * C."""
    return (item["batch"], item["side"] ** 2, item["channels"], item["patch_size"] ** 2, item["value_channels"],
            4 if item["dtype"] == "float32" else 2)


def _io_bytes(item: dict, role: str) -> float:
    """Compulsory bytes of a launch: each input once (Q and K rows, value-like columns, lse and delta) and
    each output once (out and lse; dQ; dK and dV, or one of them: "dk", "dv")."""
    B, n, C, taps, Cv, e = _shape(item)
    if role == "forward":
        return B * (2 * n * C * e + n * Cv * e + n * Cv * (4 if item["dtype"] == "float32" else e) + 4 * n)
    grads = {"dq": n * taps * C, "dk": n * taps * C, "dkdv": n * (taps * C + Cv), "dv": n * Cv}[role] * 4
    return B * (2 * n * C * e + 2 * n * Cv * e + 8 * n + grads)


def triton_traffic(kernel: str, label: str, item: dict) -> Traffic:
    """What one launch of a Triton kernel config (its label: "M.. N.. D.. [one_chunk]") moves for a
    headline item, following cocos_kernels/triton/correspondence_warp.py: the forward and dQ programs own
    BLOCK_M query rows and stream the key blocks, dK/dV programs own BLOCK_N keys and stream the query
    blocks. A program loads the other side's feature rows and value-like columns once; its own feature
    rows once with ONE_CHUNK, else again per streamed block (D in chunks); the chunked dQ (dK) also reloads
    K (Q) to accumulate into its float32 rows in global memory, read and written per streamed block
    (the first block only writes). Windows: D = taps * C (each tap's rows loaded per block)."""
    B, n, C, taps, Cv, e = _shape(item)
    D = taps * C
    blocks = _label_blocks(label)
    one_chunk = "one_chunk" in label
    own, other = (blocks["N"], blocks["M"]) if kernel == "_backward_dkdv_kernel" else (blocks["M"], blocks["N"])
    programs, streamed = math.ceil(n / own), math.ceil(n / other)
    if kernel == "_forward_kernel":
        tiles = programs * n * (D + Cv) * e + (1 if one_chunk else streamed) * n * D * e
        return Traffic(_io_bytes(item, "forward"), B * tiles)
    # dQ: its programs read K and V per program, dOut / lse / delta per own row; dK/dV: Q and dOut / lse /
    # delta per program, V per own row.
    dq = kernel == "_backward_dq_kernel"
    tiles = programs * (n * (D + Cv) * e + (0 if dq else 8 * n)) + n * Cv * e + (8 * n if dq else 0)
    if one_chunk:
        tiles += n * D * e
        rmw = 0.0
    else:
        tiles += streamed * n * D * e + programs * n * D * e
        rmw = 2.0 * (streamed - 1) * n * D * 4
    return Traffic(_io_bytes(item, "dq" if dq else "dkdv"), B * tiles, B * rmw, 0.0 if one_chunk else own * D * 4)


def triton_estimate(arch: int, row: dict, item: dict) -> dict:
    """The estimate of one compiled config of a Triton kernel on a headline item: tile products as issued
    (D padded to whole BLOCK_D chunks per tap, Cv to BLOCK_CV), one exponential per (query, key) pair."""
    B, n, C, taps, Cv, _ = _shape(item)
    blocks = _label_blocks(row["config"])
    d_tile, cv_tile = taps * math.ceil(C / blocks["D"]) * blocks["D"], max(16, 1 << (Cv - 1).bit_length())
    products = {"_forward_kernel": d_tile + cv_tile, "_backward_dq_kernel": 2 * d_tile + cv_tile,
                "_backward_dkdv_kernel": 2 * d_tile + 2 * cv_tile}[row["kernel"]]
    rate, path = _matrix_rate(arch, item["dtype"], item["precision"], row.get("sass", {}))
    own = blocks["N"] if row["kernel"] == "_backward_dkdv_kernel" else blocks["M"]
    estimate = roofline_time(arch, 2.0 * B * n * n * products, rate, B * n * n,
                             triton_traffic(row["kernel"], row["config"], item), B * math.ceil(n / own),
                             max(1, row.get("blocks_per_sm") or 0))
    return {"path": path, **estimate}


def reference_seconds(arch: int, item: dict) -> float:
    """The materialised reference (cocos_kernels/reference.py: scores matmul, / temperature, softmax,
    @ value; autograd's backward: grad of P and of the value, softmax backward, / temperature backward, the
    two feature gradients), each op max(FLOPs / matmul rate, bytes / HBM) (its n x n matrices do not fit
    the L2), summed. Its matmuls run at the GPU check's float32 matmul precision for the item."""
    from benchmarks.gpu_check import MATMUL_PRECISION

    r = RATES[arch]
    B, n, C, taps, Cv, e = _shape(item)
    D = taps * C
    rate = r["bf16"] if item["dtype"] != "float32" else r[
        {"highest": "fp32", "high": "tf32", "medium": "bf16"}[MATMUL_PRECISION[item["precision"]]]]
    m = n * n * e  # one n x n matrix
    ops = [(2 * n * n * D, m + 2 * n * D * e), (0, 2 * m), (0, 2 * m), (2 * n * n * Cv, m)]
    if item["mode"] == "forward+backward":
        ops += [(2 * n * n * Cv, m), (2 * n * n * Cv, m), (0, 3 * m), (0, 2 * m), (2 * n * n * D, m),
                (2 * n * n * D, m)]
    return B * sum(max(f / rate, b / r["hbm"]) for f, b in ops)


# Bytes of spills a thread that the choice of config ignores: a few words, which stay in the L1, cost less
# than the accumulator traffic a spill-free chunked config moves instead.
SMALL_SPILL = 32
MODE_KERNELS = {"forward": ("_forward_kernel",),
                "forward+backward": ("_forward_kernel", "_backward_dq_kernel", "_backward_dkdv_kernel")}


def _summary(arch: int, item: dict, parts: list[dict | None]) -> dict:
    """Total seconds, share of the bf16 peak (useful FLOPs) and speed-up over the reference of an item's kernels."""
    from benchmarks.bench_correspondence_warp import flops

    total = sum(p["seconds"] for p in parts) if all(parts) else math.inf
    useful, reference = flops(item), reference_seconds(arch, item)
    return dict(seconds=total, useful_flops=useful, hbm_bytes=sum(p["hbm_bytes"] for p in parts if p),
                l2_bytes=sum(p["l2_bytes"] for p in parts if p),
                share_of_bf16_peak=useful / total / RATES[arch]["bf16"] if total < math.inf else 0.0,
                reference_s=reference, speedup=reference / total if total < math.inf else 0.0)


def roofline(arch: int, rows: list[dict], items: list[dict]) -> list[dict]:
    """Per headline item: the best fitting config of each Triton kernel (least spilling beyond SMALL_SPILL,
    then the least estimated time) and the estimate."""
    out = []
    for item in items:
        entry, parts = dict(item), []
        for kernel in MODE_KERNELS[item["mode"]]:
            candidates = [r for r in rows if r.get("ok") and r["arch"] == arch and r["module"] == "correspondence_warp"
                          and r["kernel"] == kernel and r["dtype"] == item["dtype"] and r["patch"] == item["patch_size"]
                          and r["CV"] == item["value_channels"] and r.get("precision") == (
                              item["precision"] if item["dtype"] == "float32" else None)
                          and r.get("out", "x") in ("x", "fp32" if item["dtype"] == "float32" else "bf16")
                          and r["fits"] and r.get("blocks_per_sm")]
            best = min(candidates, key=lambda r: (max(0, r.get("stack", 0) - SMALL_SPILL),
                                                   triton_estimate(arch, r, item)["seconds"]),
                       default=None)
            entry[kernel] = best and {"config": best["config"], "stack": best.get("stack", 0),
                                      **triton_estimate(arch, best, item)}
            parts.append(entry[kernel])
        out.append(entry | _summary(arch, item, parts))
    return out


# ----------------------------------------------------------------------------- CUDA kernels
# Which kernels the launchers take, and their grids, tiles and shared memory: LAUNCH_PROBE runs the
# launchers' own dispatch (with_forward_kernel, backward_kernels in csrc/cuda/correspondence_warp.cuh)
# with a launch functor that records each launch. The traffic model's tiles are the mma header's constants.
MMA_HEADER = REPO / "csrc" / "cuda" / "correspondence_warp_mma.cuh"
MMA_TILES = ("kMmaRows", "kMmaBN")
FMA_TILE = 64  # BM = BN = BCV of correspondence_warp.cuh's shared-memory kernels
LAUNCH_PROBE = REPO / "csrc" / "cuda" / "testing" / "launch_probe.cu"
STREAMED_HEADER = REPO / "csrc" / "cuda" / "correspondence_warp_streamed_mma.cuh"
# The probe's nvcc flags beside the build's: kernel stubs of external linkage and default visibility,
# exported to the dynamic symbol table, where dladdr finds the name of the kernel launched.
PROBE_FLAGS = ("-static-global-template-stub=false", "-device-entity-has-hidden-visibility=false",
               "-Xcompiler", "-rdynamic", "-ldl")


def header_constants(text: str) -> dict[str, int]:
    """Every `constexpr int NAME = VALUE;` of a header's text."""
    return {name: int(value) for name, value in re.findall(r"constexpr\s+int\s+(\w+)\s*=\s*(\d+)\s*;", text)}


def mma_tiles(text: str | None = None) -> dict[str, int]:
    """MMA_TILES from MMA_HEADER (or `text`); KeyError names a missing one."""
    found = header_constants(MMA_HEADER.read_text() if text is None else text)
    missing = [k for k in MMA_TILES if k not in found]
    if missing:
        raise KeyError(f"{MMA_HEADER.name} defines no {', '.join(missing)}: update MMA_TILES")
    return {k: found[k] for k in MMA_TILES}


@functools.cache
def _streamed_constant(name: str) -> int:
    """`constexpr int name` of STREAMED_HEADER (its value classes); KeyError names a missing one."""
    found = header_constants(STREAMED_HEADER.read_text())
    if name not in found:
        raise KeyError(f"{STREAMED_HEADER.name} defines no {name}")
    return found[name]


@functools.cache
def _launch_probe() -> Path:
    """LAUNCH_PROBE built with nvcc, once per process (in a temporary directory removed at exit)."""
    from cocos_kernels import build

    home = build.cuda_home()
    if home is None:
        raise RuntimeError("no nvcc (no CUDA toolkit found)")
    tmp = tempfile.mkdtemp(prefix="launch_probe-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    exe = Path(tmp) / "launch_probe"
    proc = subprocess.run([str(Path(home) / "bin" / "nvcc"), *build.NVCC_FLAGS, *PROBE_FLAGS,
                           f"-I{LAUNCH_PROBE.parents[1]}", str(LAUNCH_PROBE), "-o", str(exe)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{LAUNCH_PROBE} does not build:\n{proc.stderr[-4000:]}")
    return exe


def probe_request(dtype: str, precision: str | None, batch: int, n: int, d: int, cv: int, patch: int,
                  gradients: str) -> str:
    """LAUNCH_PROBE's request for these inputs (n queries and keys; d: C for windows) and gradients ("qkv",
    "-": the forward alone)."""
    return f"{dtype} {precision or 'ieee'} {batch} {n} {n} {d} {cv} {patch} {gradients}"


def item_request(item: dict) -> str:
    """The request of a headline item: its forward, and with mode forward+backward every gradient."""
    B, n, C, _, Cv, _ = _shape(item)
    return probe_request(item["dtype"], item["precision"], B, n, C, Cv, item["patch_size"],
                         "qkv" if item["mode"] == "forward+backward" else "-")


def launch_plans(requests: list[str]) -> tuple[dict[tuple[str, str], int], dict[str, list[dict]]]:
    """LAUNCH_PROBE's answer to `requests`: the contextual_loss kernels' {(layout, "float32"): bytes} of dynamic
    shared memory, and {request: its launches (probe_launch)}. RuntimeError where the probe does not build or run."""
    proc = subprocess.run([str(_launch_probe())], input="\n".join(requests), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{LAUNCH_PROBE.name}: {proc.stderr[-4000:]}")
    shared, plans, patch = {}, {}, 1
    for line in filter(None, proc.stdout.split("\n")):
        word, rest = line.split(" ", 1)
        if word == "plan":
            plans[rest] = launches = []
            patch = int(rest.split()[7])
        elif word == "launch":
            launches.append(probe_launch(rest, patch))
        else:
            dtype, size = rest.split()
            shared[word, dtype] = int(size)
    return shared, plans


def _streamed_forward_channels(cvt: int, chunks: int, Cv: int) -> int:
    """The value channels O += P V takes over the streamed forward's chunks (StreamedForwardChunk): cvt each,
    or for the wide class Cv split evenly over the chunks, padded to 16, each chunk up to Cv padded to 16."""
    if cvt != _streamed_constant("kStreamedWideForwardCv"):
        return chunks * cvt
    width = math.ceil(math.ceil(Cv / chunks) / 16) * 16
    return sum(min(width, math.ceil((Cv - i * width) / 16) * 16) for i in range(chunks))


def probe_launch(line: str, patch: int) -> dict:
    """A launch as LAUNCH_PROBE prints it ("blocks=.. smem=.. [grid] [tiles] kernel=<demangled>"), at `patch`:
    name (the kernel without namespace and arguments), blocks, shared (bytes), row_blocks and cv_chunks (its MmaGrid),
    channels, out_d, dv_chunk and dv_split (the mma backward's MmaBackwardTiles); kind ("mma": the kernels
    of correspondence_warp_mma.cuh, "streamed": of correspondence_warp_streamed_mma.cuh, "fma": the
    shared-memory kernels), dt, cvt, the streamed forward's key block bn and the streamed backward's group
    (streamed blocks per plane pass) (its template arguments), role ("forward", "dq", "dkdv"; the split mma
    backward "dk" and "dv", as the streamed backward's wide class: dK blocks (cvt above kStreamedHeldCv) and
    dV-only blocks (group 0)) and layout (the kernel and its tiles, the report's label)."""
    plan, kernel = line.split(" kernel=", 1)
    values = {k: int(v) for k, v in (field.split("=") for field in plan.split())}
    launch = dict(name=re.search(r"cocos_kernels::cuda::(\w+(?:<[^>]*>)?)\(", kernel)[1], blocks=values.pop("blocks"),
                  shared=values.pop("smem"), **values)
    base, _, arguments = launch["name"].partition("<")
    flags = arguments.rstrip(">").split(", ")[2:]  # after T and the precision: the tiles, the launch's flag
    kind = "streamed" if "_streamed_mma_" in base else "mma" if "_mma_" in base else "fma"
    last = flags[-1:] == ["true"]  # DV_ONLY (mma), DK (streamed)
    if base.startswith("forward"):
        role = "forward"
    elif base.startswith("backward_dq") or (kind == "streamed" and not last):
        role = "dq"
    elif kind == "mma":
        role = "dv" if last else "dk" if launch["dv_split"] else "dkdv"
    elif kind == "streamed":
        # The wide value tiles (wider than kStreamedHeldCv): dK blocks, and dV-only blocks (group 0).
        role = "dv" if int(flags[1]) == 0 else "dk" if int(flags[0]) > _streamed_constant("kStreamedHeldCv") else "dkdv"
    else:
        role = "dkdv"
    stem = base.removesuffix("_kernel")
    if kind == "fma":
        layout = stem + ("_windows" if role == "dkdv" and patch > 1 else "")
    elif kind == "streamed":
        launch["cvt"] = int(flags[0])
        layout = f"{stem}_Cv{launch['cvt']}"
        if role == "forward":  # its key block
            launch["bn"] = int(flags[1])
            layout += f"_N{launch['bn']}"
        else:
            launch["group"] = int(flags[1])
            layout += f"_G{launch['group']}"
    else:
        launch["dt"], launch["cvt"] = int(flags[0]), int(flags[1])
        layout = (f"forward_mma_D{launch['dt']}_Cv{launch['cvt']}" if role == "forward" else
                  f"backward_{role}_mma_D{launch['dt']}_Cv{launch['cvt']}_c{launch['channels']}")
    return dict(launch, kind=kind, role=role, layout=layout)


def _mma_work(launch: dict, item: dict, tiles: dict) -> tuple[int, float, float, Traffic]:
    """(programs, FLOPs as issued, exponentials, traffic) of an mma kernel launch (probe_launch: its
    grid's blocks of rows and chunks, its tiles): 128 resident rows per block, the other side streamed in
    64-row blocks (both padded); the score products take D in whole k steps (the zero tail of DT is
    skipped), the dQ / dK products the block's columns in 16-column steps, the value-like products the
    forward's CVT channels a chunk, the backward's tile channels. The grid's chunks each compute S again
    over all of D: the forward's per CVT value channels, the backward's dQ and dK blocks per chunk of
    out_d columns (with dP over all of Cv), its dV-only blocks per dv_chunk channels (S and P, no dP; dOut
    of their channels). Every accumulator stays in registers."""
    B, n, C, _, Cv, e = _shape(item)
    rows, bn, role = tiles["kMmaRows"], tiles["kMmaBN"], launch["role"]
    k = 8 if e == 4 else 16
    d_k, d_16 = math.ceil(C / k) * k, math.ceil(C / 16) * 16
    blocks, chunks = launch["row_blocks"], launch["cv_chunks"]
    pairs = blocks * rows * math.ceil(n / bn) * bn
    if role == "forward":
        products = chunks * (d_k + launch["cvt"])
        # Per block, the key rows and a value chunk's columns, and its resident rows once.
        l2 = chunks * blocks * n * C * e + blocks * n * Cv * e + chunks * n * C * e
    elif role == "dv":
        products = chunks * d_k + launch["channels"]
        # Per block, the query rows, lse and delta, its chunk's dOut columns; its resident rows once (no V).
        l2 = chunks * (blocks * (n * C * e + 8 * n) + n * C * e) + blocks * n * Cv * e
    else:
        products = chunks * (d_k + launch["channels"]) + d_16 + (launch["channels"] if role == "dkdv" else 0)
        # Per block, the other side's rows and value-like columns (dK/dV: lse and delta too), and its
        # resident rows and columns once (dQ: lse and delta).
        lse_delta = 8 * n * (1 if role == "dq" else blocks)
        l2 = chunks * ((blocks + 1) * n * (C + Cv) * e + lse_delta)
    return launch["blocks"], 2.0 * B * pairs * products, B * chunks * n * n, Traffic(_io_bytes(item, role), B * l2)


def _streamed_work(launch: dict, item: dict, tiles: dict) -> tuple[int, float, float, Traffic]:
    """The same for the kernels of correspondence_warp_streamed_mma.cuh: blocks of 128 resident centres
    walk the other side's blocks of bn centres (the forward: its kernel's BN, the backward: kMmaBN); per
    streamed block the score steps (tap, D chunk of 64 columns, float32 32) copy the tap-shifted chunk of
    the 128 resident rows and of the bn streamed rows to shared memory, 128 + bn rows x taps x C in all,
    and the block's value-like tile. Every block copies these rows, which the resident blocks read from the
    L2 after the first: L2 traffic. S takes each chunk in whole k steps (the zero tail is skipped).
    - forward (blocks of 128 queries and a value chunk, the grid's chunks): O += P V over the chunk's CVT
      channels (the wide class: Cv split evenly over the chunks, up to Cv padded to 16).
    - backward, dQ ("dq", query blocks) and dK/dV ("dkdv", key blocks; the wide value tiles: dK, "dk"):
      dP over the CVT channels (float32 and the wide tiles: Cv in 16-channel steps), dK/dV's dV += P^T dOut
      over CVT, and a second pass of the steps copies the bn streamed rows' chunks again for the plane
      pieces H X_t (each chunk in 16-column steps), one pass per group of the kernel's group streamed
      blocks. The block's float32 planes (128 rows x taps x C) are read and written in global memory per
      group after the first (accumulator traffic); its resident value-like tile is copied once; dQ reads
      its rows' lse and delta once, dK/dV every query's per streamed block.
    - dV-only blocks ("dv", key blocks and the grid's chunks of CVT channels): S and dV += P^T dOut over
      the chunk's channels (Cv padded to 16), no dP and no second pass; the grid's chunks each compute S."""
    B, n, C, taps, Cv, e = _shape(item)
    rows, cvt, role = tiles["kMmaRows"], launch["cvt"], launch["role"]
    bn = launch["bn"] if role == "forward" else tiles["kMmaBN"]
    k = 8 if e == 4 else 16
    blocks, key_blocks = launch["row_blocks"], math.ceil(n / bn)
    scores = taps * math.ceil(C / k) * k
    copies = blocks * key_blocks * (rows + bn) * taps * C * e  # the score steps' chunks
    if role == "forward":
        chunks = launch["cv_chunks"]
        l2 = chunks * copies + blocks * n * Cv * e
        products = chunks * scores + _streamed_forward_channels(cvt, chunks, Cv)
        return (launch["blocks"], 2.0 * B * blocks * rows * key_blocks * bn * products,
                B * chunks * n * n, Traffic(_io_bytes(item, "forward"), B * l2))
    cv16 = math.ceil(Cv / 16) * 16
    if role == "dv":
        chunks = launch["cv_chunks"]
        l2 = chunks * (copies + 8 * n * blocks) + blocks * n * Cv * e  # every query's lse and delta per block
        return (launch["blocks"], 2.0 * B * blocks * rows * key_blocks * bn * (chunks * scores + cv16),
                B * chunks * n * n, Traffic(_io_bytes(item, "dv"), B * l2))
    dp = cv16 if e == 4 or cvt > _streamed_constant("kStreamedHeldCv") else cvt  # mma_value_channels
    products = scores + dp + taps * math.ceil(C / 16) * 16 + (cvt if role == "dkdv" else 0)
    lse_delta = 8 * n * (1 if role == "dq" else blocks)
    l2 = copies + blocks * key_blocks * bn * taps * C * e + (blocks + 1) * n * Cv * e + lse_delta
    acc, groups = rows * taps * C * 4, math.ceil(key_blocks / launch["group"])
    return (launch["blocks"], 2.0 * B * blocks * rows * key_blocks * bn * products, B * n * n,
            Traffic(_io_bytes(item, role), B * l2, B * 2.0 * blocks * (groups - 1) * acc, acc))


def _fma_work(launch: dict, item: dict) -> tuple[int, float, float, Traffic]:
    """The same for a shared-memory kernel: 64 x 64 blocks, D in chunks of BD (64; float32 32) per tap,
    Cv in 64-channel chunks; per block pair both sides' feature chunks are loaded (Q and K; the dQ / dK
    accumulation reloads K / Q), and the float32 dQ, dK (and dV) accumulators are read and written in
    global memory per streamed block."""
    B, n, C, taps, Cv, e = _shape(item)
    t, role = FMA_TILE, launch["role"]
    bd = 32 if e == 4 else 64
    d_p, D = taps * math.ceil(C / bd) * bd, taps * C
    cv_chunks = math.ceil(Cv / t)
    blocks = math.ceil(n / t)
    pairs = (blocks * t) ** 2
    if role == "forward":
        l2 = cv_chunks * blocks * blocks * 2 * t * D * e + blocks * n * Cv * e
        return (B * cv_chunks * blocks, 2.0 * B * cv_chunks * pairs * (d_p + t), B * cv_chunks * n * n,
                Traffic(_io_bytes(item, role), B * l2))
    # per block pair: Q, K and the reloaded side's chunks, dOut and V columns (dK/dV: lse and delta too)
    l2 = blocks * blocks * (3 * t * D * e + 2 * t * Cv * e + (0 if role == "dq" else 8 * t))
    acc = t * (D if role == "dq" else D + Cv) * 4
    rmw = 2.0 * blocks * (blocks - 1) * acc
    products = 2 * d_p + (1 if role == "dq" else 2) * cv_chunks * t
    return (B * blocks, 2.0 * B * pairs * products, B * n * n,
            Traffic(_io_bytes(item, role), B * l2, B * rmw, acc))


def _cuda_row(rows: list[dict], arch: int, name: str) -> dict | None:
    return next((r for r in rows if r.get("ok") and r["arch"] == arch and f"cocos_kernels::cuda::{name}(" in r["kernel"]),
                None)


def cuda_roofline(arch: int, rows: list[dict], items: list[dict], plans: dict[str, list[dict]],
                  tiles: dict[str, int]) -> list[dict]:
    """Per headline item: the CUDA kernels the launchers take (`plans`: {item_request: launches}, launch_plans;
    an item without one gets no kernels and no estimate), each with its occupancy (blocks per SM from
    ptxas's registers and the dynamic shared memory the launch asks for) and estimate (`tiles`: mma_tiles)."""
    work = {"mma": lambda launch, item: _mma_work(launch, item, tiles),
            "streamed": lambda launch, item: _streamed_work(launch, item, tiles),
            "fma": _fma_work}
    out = []
    for item in items:
        entry, parts = dict(item, kernels=[]), []
        launches = plans.get(item_request(item))
        if launches is None:
            parts.append(None)
        for launch in launches or []:
            row = _cuda_row(rows, arch, launch["name"])
            per_sm = (row and launch["shared"] <= SHARED_LIMIT[arch]
                      and blocks_per_sm(arch, row["reg"], launch["shared"] + row["shared"], 8))
            if not per_sm:
                entry["kernels"].append(dict(launch, estimate=None, why="not compiled" if row is None else "does not fit"))
                parts.append(None)
                continue
            programs, flops, exps, traffic = work[launch["kind"]](launch, item)
            rate, path = _matrix_rate(arch, item["dtype"], item["precision"], row["sass"])
            estimate = {"path": path, **roofline_time(arch, flops, rate, exps, traffic, programs, per_sm)}
            entry["kernels"].append(dict(launch, blocks_per_sm=per_sm, reg=row["reg"], stack=row["stack"],
                                         estimate=estimate))
            parts.append(estimate)
        out.append(entry | _summary(arch, item, parts))
    return out


# Each contextual_loss kernel and its layout in LAUNCH_PROBE's output.
CONTEXTUAL_KERNELS = {"contextual_forward_kernel": "contextual_forward", "contextual_backward_dx_kernel": "contextual_backward",
                      "contextual_backward_dy_kernel": "contextual_backward"}


def _contextual_work(kernel: str, item: dict) -> tuple[int, float, float, Traffic]:
    """(programs, FLOPs as issued, exponentials, traffic) of a contextual_loss.cuh kernel: 64 x 64 tiles of
    <x_i, y_j> over C in 32-column chunks (float32 FMAs); the forward passes over the column tiles twice
    (the row minimum, then the sums), each backward kernel once, reloading the other side's chunks for its
    C-wide float32 rows, which it reads and writes in global memory per streamed block."""
    B, n, C = item["batch"], item["side"] ** 2, item["channels"]
    t, c_p = FMA_TILE, math.ceil(C / 32) * 32
    blocks = math.ceil(n / t)
    pairs = (blocks * t) ** 2
    stats = 24 * n  # per row: m, s, t, the upstream gradient (float32) and the argmin (int64)
    if kernel == "contextual_forward_kernel":
        return (B * blocks, 2.0 * B * 2 * pairs * c_p, B * n * n,
                Traffic(B * (2 * n * C * 4 + stats), B * blocks * blocks * 2 * 2 * t * C * 4))
    l2 = blocks * blocks * 3 * t * C * 4 + blocks * stats
    acc = t * C * 4
    return (B * blocks, 2.0 * B * pairs * 2 * c_p, B * n * n,
            Traffic(B * (2 * n * C * 4 + stats + n * C * 4), B * l2, B * 2.0 * blocks * (blocks - 1) * acc, acc))


def contextual_roofline(arch: int, rows: list[dict], items: list[dict], smem: dict[tuple[str, str], int]) -> list[dict]:
    """Per contextual_loss timing config of the GPU check (forward+backward, float32): the three CUDA kernels'
    estimates (shared memory: `smem`, launch_plans' sizes of their layouts) and the share of the FP32 FMA peak (useful FLOPs:
    benchmarks.bench_contextual_loss.flops)."""
    from benchmarks.bench_contextual_loss import flops

    out = []
    for item in items:
        parts = []
        for kernel, layout in CONTEXTUAL_KERNELS.items():
            row = _cuda_row(rows, arch, kernel)
            shared = smem.get((layout, "float32"))
            per_sm = row and shared is not None and blocks_per_sm(arch, row["reg"], shared + row["shared"], 8)
            if not per_sm:
                parts.append(None)
                continue
            programs, work, exps, traffic = _contextual_work(kernel, item)
            parts.append(dict(kernel=kernel, blocks_per_sm=per_sm, path="FFMA",
                              **roofline_time(arch, work, RATES[arch]["fp32"], exps, traffic, programs, per_sm)))
        seconds = sum(p["seconds"] for p in parts) if all(parts) else math.inf
        out.append(dict(item, kernels=parts, seconds=seconds,
                        share_of_fp32_peak=flops(item) / seconds / RATES[arch]["fp32"] if seconds < math.inf else 0.0))
    return out


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


# ----------------------------------------------------------------------------- targets and the report


def targets(report: dict) -> list[dict]:
    """The goals of the headline configs, estimate against target: shares of the bf16 peak, the tf32x3
    speed-up over the reference, the CUDA forward's share and its time against Triton's."""
    def find(entries, **kv):
        return next((e for e in entries if all(e[k] == v for k, v in kv.items())), None)

    head = dict(dtype="bfloat16", side=256, value_channels=3, patch_size=1)
    rows = []

    def add(what, entry, key, goal, at_least=True, percent=True):
        if entry is None:
            return
        value = entry if isinstance(entry, float) else entry[key]
        rows.append(dict(what=what, estimate=value, goal=goal, at_least=at_least, percent=percent,
                         met=value >= goal if at_least else value <= goal))

    add("Triton bf16 forward, 256^2, Cv 3: share of bf16 peak", find(report["roofline"], mode="forward", **head),
        "share_of_bf16_peak", 0.50)
    add("Triton bf16 forward+backward, 256^2, Cv 3: share", find(report["roofline"], mode="forward+backward", **head),
        "share_of_bf16_peak", 0.35)
    for e in report["roofline"]:
        if e["patch_size"] > 1 and e["value_channels"] == 3:
            add(f"Triton bf16 3x3 windows, {e['side']}^2, {e['mode']}: share", e, "share_of_bf16_peak", 0.30)
    for e in report["roofline"]:
        if e.get("precision") == "tf32x3":
            add(f"Triton float32 tf32x3, {e['side']}^2, {e['mode']}: speed-up over the reference", e, "speedup", 3.0,
                percent=False)
    cuda = find(report.get("cuda_roofline", []), mode="forward", **head)
    add("CUDA bf16 forward, 256^2, Cv 3: share", cuda, "share_of_bf16_peak", 0.35)
    triton = find(report["roofline"], mode="forward", **head)
    if cuda and triton and triton["seconds"] < math.inf:
        add("CUDA bf16 forward, 256^2, Cv 3: time / Triton's", cuda["seconds"] / triton["seconds"], None, 1.3,
            at_least=False, percent=False)
    return rows


def _mix(sass: dict | None) -> str:
    if not sass:
        return ""
    keys = ("wgmma", "mma", "ldsm", "cp.async", "tma", "ldg", "stg", "ldl", "stl", "mufu", "ffma")
    return " ".join(f"{k} {sass[k]}" for k in keys if sass.get(k)) + f" / {sass.get('total', 0)}"


def _bound(v: dict) -> str:
    """A kernel estimate's bound, and where its accumulator traffic goes."""
    rmw = f", acc. {v['rmw_bytes'] / 1e9:.3g} GB in {v['rmw_level'].upper()}" if v["rmw_level"] else ""
    return f"{v['path']}, {v['bound']}{rmw}"


def _launch_label(launch: dict) -> str:
    """A CUDA launch's layout, with its role where the layout does not name it (the streamed backward's dQ
    and dK/dV launches share one)."""
    return launch["layout"] if launch["role"] in launch["layout"] else f"{launch['layout']} ({launch['role']})"


def _item_cells(e: dict) -> list:
    dtype = e["dtype"] + (f" ({e['precision']})" if e.get("precision") else "")
    return [dtype, f"{e['side']}^2", e["value_channels"], f"{e['patch_size']}x{e['patch_size']}", e["mode"]]


def _totals(e: dict) -> list:
    done = e["seconds"] < math.inf
    return [f"{e['hbm_bytes'] / 1e9:.1f}", f"{e['l2_bytes'] / 1e9:.0f}", f"{e['seconds'] * 1e3:.2f}" if done else "-",
            f"{e['share_of_bf16_peak']:.0%}", f"{e['speedup']:.1f}x" if done else "-"]


def _fmt(value: float, percent: bool) -> str:
    return f"{value:.0%}" if percent else f"{value:.2f}x"


def markdown(arch: int, report: dict) -> str:
    r = RATES[arch]
    triton_est = []
    for e in report["roofline"]:
        parts = []
        for k in MODE_KERNELS[e["mode"]]:
            v = e[k]
            spills = f", SPILLS {v['stack']} B" if v and v["stack"] else ""
            parts.append(f"{k.strip('_').replace('_kernel', '')}: " + (
                "no fitting config" if v is None else f"{v['config']}, {_bound(v)}{spills}"))
        triton_est.append([*_item_cells(e), "; ".join(parts), *_totals(e)])
    cuda_est = []
    for e in report.get("cuda_roofline", []):
        parts = [f"{_launch_label(k)}: " + (
            f"{k['why']} ({k['shared']} B shared)" if k["estimate"] is None else
            f"{k['blocks_per_sm']}/SM, {_bound(k['estimate'])}" + (f", SPILLS {k['stack']} B" if k["stack"] else ""))
            for k in e["kernels"]]
        cuda_est.append([*_item_cells(e), "; ".join(parts) or f"no launch plan ({LAUNCH_PROBE.name})", *_totals(e)])
    contextual_est = []
    for e in report.get("contextual_roofline", []):
        done = e["seconds"] < math.inf
        parts = [f"{k['kernel'].replace('contextual_', '').replace('_kernel', '')}: {k['blocks_per_sm']}/SM, {_bound(k)}"
                 if k else "does not fit" for k in e["kernels"]]
        contextual_est.append([f"{e['image']} px", e["layer"], e["channels"], f"{e['side']}^2", "; ".join(parts),
                               f"{sum(k['hbm_bytes'] for k in e['kernels'] if k) / 1e9:.2f}",
                               f"{sum(k['l2_bytes'] for k in e['kernels'] if k) / 1e9:.1f}",
                               f"{e['seconds'] * 1e3:.3f}" if done else "-", f"{e['share_of_fp32_peak']:.0%}"])
    goals = [[t["what"], _fmt(t["estimate"], t["percent"]),
              ("≥ " if t["at_least"] else "≤ ") + _fmt(t["goal"], t["percent"]), "met" if t["met"] else "NOT MET"]
             for t in report.get("targets", [])]
    peaks = [[card, *(f"{c[k] / 1e12:.{p}f}" for k, p in (("bf16", 0), ("tf32", 0), ("fp32", 1), ("hbm", 2), ("l2", 0))),
              f"{c['l2_bytes'] / 1e6:.0f}", "this report" if card == r["card"] else ""] for card, c in CARDS.items()]
    estimate_header = ["kernel: config, path, bound", "HBM GB", "L2 GB", "est. ms", "share of bf16 peak",
                       "vs reference (est.)"]
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
             f"## Targets (estimates on an {r['card']})", "",
             *table(["goal", "estimate", "target", ""], goals),
             "", "## The yardstick", "",
             "Dense datasheet peaks (NVIDIA H100, H200 and A100 SXM datasheets; TFLOP/s, TB/s, MB); the L2 "
             "bandwidth is assumed. The GPU check measures the real matmul peaks.", "",
             *table(["card", "bf16", "tf32", "fp32 FMA", "HBM", "L2 (assumed)", "L2 size", ""], peaks),
             "", f"## Headline configs: Triton roofline estimate on an {r['card']}", "",
             f"Per mode, the best config of each kernel that fits (least spilling beyond {SMALL_SPILL} B a thread, "
             "then least time); per kernel "
             "time = max(matrix, exp, L2 bytes / L2 bandwidth, HBM bytes / HBM bandwidth) / last-wave fill, summed. "
             "HBM: each input and output once, plus the float32 accumulator read-modify-write of the chunked "
             "backward where the resident programs' accumulators exceed the L2; L2: the operand tiles each "
             "program loads per block (and that accumulator traffic where it fits). Share = useful FLOPs / time "
             f"/ bf16 peak ({r['bf16'] / 1e12:.0f} TFLOP/s); vs reference = the materialised reference's estimated "
             "time / this time.", "",
             *table(["dtype", "grid", "Cv", "patch", "mode", *estimate_header], triton_est),
             "", f"## Headline configs: CUDA roofline estimate on an {r['card']}", "",
             "The kernels the launchers take, with their grids, tiles and dynamic shared memory, as "
             "csrc/cuda/testing/launch_probe.cu records them from the launchers' own dispatch; blocks/SM from "
             "ptxas's registers and that shared memory; the mma kernels' blocks ("
             + ", ".join(f"{k} {v}" for k, v in report.get("mma_tiles", {}).items())
             + ") parsed from csrc/cuda/correspondence_warp_mma.cuh; time as above.", "",
             *table(["dtype", "grid", "Cv", "patch", "mode", *estimate_header], cuda_est),
             "", f"## contextual_loss: CUDA roofline estimate on an {r['card']}", "",
             "The GPU check's timing configs (forward+backward, float32, batch 1), the forward, dX and dY "
             "kernels summed; share = useful FLOPs / time / FP32 FMA peak "
             f"({r['fp32'] / 1e12:.1f} TFLOP/s).", "",
             *table(["image", "layer", "C", "grid", "kernel: blocks/SM, bound", "HBM GB", "L2 GB", "est. ms",
                     "share of fp32 peak"], contextual_est),
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


def contextual_items() -> list[dict]:
    """The GPU check's contextual_loss timing configs (one per image size and VGG layer)."""
    from benchmarks import gpu_check

    return [it for it in gpu_check.contextual_items(gpu_check.parse_args([]))
            if it["part"] == "timing" and it["impl"] == "cuda"]


def add_launch_plans(parts: list[dict], items: list[dict]) -> None:
    """Gives each target's part a launch plan per item (launch_plans: {item_request: launches}): its saved ones,
    the others from LAUNCH_PROBE, whose run also gives the contextual_loss kernels' sizes (dynamic_shared, as
    (layout, dtype, bytes) rows: JSON has no tuple keys). Without the probe (no nvcc) the saved ones only."""
    requests = [item_request(item) for item in items]
    if all(r in part.get("launch_plans", {}) for part in parts for r in requests):
        return
    try:
        shared, plans = launch_plans(requests)
    except RuntimeError as e:
        print(f"kernel_report: the saved CUDA launch plans only: {e}", file=sys.stderr)
        return
    for part in parts:
        part["launch_plans"] = {r: part.get("launch_plans", {}).get(r, plans[r]) for r in requests}
        part["dynamic_shared"] = [[*key, size] for key, size in sorted(shared.items())]


def estimates(arch: int, part: dict, items: list[dict]) -> dict:
    """A target's compiled rows (part: triton, cuda) and launch plans with the estimates and targets added."""
    part = dict(part, roofline=roofline(arch, part["triton"], items), mma_tiles=mma_tiles())
    smem = {(layout, dtype): size for layout, dtype, size in part.get("dynamic_shared", [])}
    part["cuda_roofline"] = cuda_roofline(arch, part["cuda"], items, part.get("launch_plans", {}), part["mma_tiles"])
    part["contextual_roofline"] = contextual_roofline(arch, part["cuda"], contextual_items(), smem)
    part["targets"] = targets(part)
    return part


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="90,80", help="compute capabilities (default: %(default)s)")
    p.add_argument("--matrix", choices=tuple(SELECT), default="headline", help="which configs (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: %(default)s)")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA kernels")
    p.add_argument("--from-results", type=Path, nargs="+", metavar="FILE.json",
                   help="compile nothing: the estimates and reports again from saved kernels-sm_XX.json files")
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)

    items = headline_items()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.from_results:
        saved = [json.loads(f.read_text()) for f in args.from_results]
        parts = {part["triton"][0]["arch"]: part for part in saved}
        add_launch_plans(list(parts.values()), items)
    else:
        archs = [int(a) for a in args.archs.split(",")]
        report = run_matrix(args.matrix, args.jobs, archs=args.archs, sass=True)
        if report.get("skip"):
            print(f"kernel_report: no Triton compilation for NVIDIA targets: {report['skip']}", file=sys.stderr)
            return 1
        for row in report["results"]:
            if row.get("ok"):
                row["blocks_per_sm"] = blocks_per_sm(row["arch"], row.get("reg"), row["shared"], row["num_warps"])
        cuda, cuda_skip = ([], "--no-cuda") if args.no_cuda else cuda_rows(archs, args.jobs)
        # The tools as this environment's, not this machine's paths: the files are committed.
        env = {k: v.replace(sys.prefix, "<python env>") if isinstance(v, str) else v for k, v in report["env"].items()}
        parts = {arch: {"env": env, "wall_s": report["wall_s"], "jobs": args.jobs, "matrix": args.matrix,
                        "triton": [r for r in report["results"] if r["arch"] == arch],
                        "cuda": [r for r in cuda if r["arch"] == arch], "cuda_skip": cuda_skip} for arch in archs}
        if not cuda_skip:
            add_launch_plans(list(parts.values()), items)
    for arch, part in parts.items():
        part = estimates(arch, part, items)
        stem = args.out_dir / f"kernels-sm_{arch}"
        write(stem, part, markdown(arch, part))
        print(f"kernel_report: wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
