"""Ahead-of-time compilation of this package's Triton kernels for NVIDIA targets (sm_90 =
H100/H200, sm_80 = A100) on a machine without a GPU: a developer tool, used by the kernel report
(`python -m benchmarks.kernel_report`) and the compile test (tests/test_triton_compile.py).

`run_matrix(matrix, jobs)` compiles a matrix of kernel configs in `jobs` child processes
(`python -m cocos_kernels.triton.aot --matrix ... --shard i/n`, each printing one JSON line) with
TRITON_INTERPRET unset (`@triton.jit` builds interpreter objects once it is set), through
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` (TTIR -> TTGIR -> LLVM -> PTX
-> cubin with Triton's bundled ptxas), for the configs the launchers would use on a GPU: the
autotuned attention kernels of `correspondence_warp` with every config the module's own
`early_config_prune` keeps for the dtype and its heuristics (ONE_CHUNK), the prologue kernels, and
`contextual_loss`'s fixed-tile kernels. Matrices: "default" (the compile test's fast subset),
"headline" (what the GPU check's headline timing rows autotune over), "full" (every flag
combination). Each result row is the case's key (module, kernel, arch, dtype, shapes, flags), the
config label and: ok, shared (bytes), fits (within the card's per-block limit), reg, stack, local
(ptxas; cuobjdump --dump-resource-usage), the SASS mix (`sass_mix`, with sass=True) and seconds.

Triton API: written against triton 3.8 and checked with 3.6, where `ASTSource(fn, signature,
constexprs, attrs)` takes `signature` {arg name: type string, "constexpr" for constexpr
arguments}, `constexprs` {(arg index,): value} and `attrs` {(arg index,): [["tt.divisibility",
16]]}. The NVIDIA backend, its bundled ptxas and cuobjdump are located through
`triton.knobs.nvidia` (triton >= 3.4).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import itertools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

# The directory holding the cocos_kernels package: the child processes import it from there.
ROOT = Path(__file__).resolve().parents[2]
MODULES = {"correspondence_warp": "cocos_kernels.triton.correspondence_warp",
           "contextual_loss": "cocos_kernels.triton.contextual_loss"}

# Per-block shared memory a kernel may use (cudaDevAttrMaxSharedMemoryPerBlockOptin), the limit
# Triton's launcher checks (OutOfResources) before the first launch.
SHARED_LIMIT = {90: 232448, 80: 166912}  # H100/H200 (227 KiB), A100 (163 KiB)
# Per SM: registers, shared memory (1 KiB of it reserved per block), threads, blocks.
SM_LIMITS = {90: dict(regs=65536, shared=233472, threads=2048, blocks=32),
             80: dict(regs=65536, shared=167936, threads=2048, blocks=32)}

AUTOTUNED = ("_forward_kernel", "_backward_dq_kernel", "_backward_dkdv_kernel")
PROLOGUE = ("_prologue_kernel", "_prologue_backward_kernel")
CONTEXTUAL = ("_forward_kernel", "_backward_kernel")
KERNELS = {"correspondence_warp": AUTOTUNED + PROLOGUE, "contextual_loss": CONTEXTUAL}

# Types of the non-constexpr arguments, by name; "dt" is the kernels' input dtype (features,
# value, grad_out: `input_dtype(dtype)`), everything the kernels accumulate or save is float32.
POINTER_TYPES = {
    "Q": "dt", "K": "dt", "V": "dt", "DO": "dt", "Out": "out", "Lse": "fp32", "Delta": "fp32",
    "DQ": "fp32", "DK": "fp32", "DV": "fp32", "MQ": "fp32", "AQ": "fp32", "MK": "fp32", "AK": "fp32", "Sums": "fp32",
    "X": "dt", "Y": "dt", "Rows": "dt", "G": "fp32", "DX": "fp32", "KeyMask": "u8", "M": "fp32", "Arg": "i64",
    "S": "fp32", "T": "fp32",
}
SCALAR_TYPES = {"scale_log2": "fp32", "scale": "fp32", "eps": "fp32", "dwin": "fp32", "h": "fp32", "dist_eps": "fp32",
                "Nq": "i32", "Nk": "i32", "keys_per_split": "i32", "N": "i32", "Lq": "i32", "Lk": "i32",
                "lo_q": "i32", "lo_k": "i32", "width_q": "i32", "width_k": "i32", "Nx": "i32", "Ny": "i32"}
TRITON_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}

# The full matrix: everything the launchers can pass on a GPU, on sm_90 and sm_80.
FULL = dict(archs=(90, 80), dtypes=("float32", "float16", "bfloat16"), precisions=("ieee", "tf32x3", "tf32"),
            dims=(256, 2304), cvs=(3, 48, 151), out_fp32=(False, True),
            need=((True, True), (True, False), (False, True)), key_mask=(False, True), patch=(1, 3), channels=(64, 256),
            center_normalize=((True, True), (True, False), (False, True), (False, False)),
            contextual_channels=(128, 256, 512), for_y=(False, True))


def in_default(key: dict, config_index: int) -> bool:
    """The default (fast) subset of FULL for the compile test.

    float32 tile products at precision "ieee" lower to unrolled FMA loops that take ptxas 5-50 s
    per config (the tensor-core paths of half precision take ~1-3 s), so the default takes every
    config only at bfloat16 with D = 256 (both the ONE_CHUNK configs, BLOCK_D = 256, and the chunked
    ones), at the shape with the largest tiles (Cv = 151 -> BLOCK_CV = 256) and at the GPU check's
    headline Cv = 48; the
    first (smallest) config elsewhere: float32 "ieee" at D = 2304, float16 with the other flags
    (the float32 output of a key split, dK or dV alone), and sm_80 for the forward kernel;
    contextual_loss at C = 256 on sm_90.
    """
    kernel, arch, dtype = key["kernel"], key["arch"], key["dtype"]
    if key["module"] == "contextual_loss":
        return arch == 90 and key["C"] == 256
    if kernel not in PROLOGUE and key["key_mask"] != (dtype == "bfloat16"):  # the masked path at bfloat16
        return False
    if key.get("patch", 1) == 3:  # the window kernels: their first config, bfloat16, the largest tiles
        return arch == 90 and dtype == "bfloat16" and config_index == 0 and key["D"] == 256 and key["CV"] == 151
    if kernel in PROLOGUE:
        return arch == 90 and key["C"] == 256 and (key["center"] == key["normalize"]) and (
            key["center"] or dtype == "float32")
    if arch == 80:
        return (kernel == "_forward_kernel" and config_index == 0 and key["D"] == 256 and key["CV"] == 151
                and (dtype == "bfloat16" and key["out"] == "bf16" or key.get("precision") == "ieee"))
    if dtype == "bfloat16":
        return (key["D"] == 256 and key["CV"] in (48, 151) and key.get("out") != "fp32"
                and key.get("need_dk", True) and key.get("need_dv", True))
    if dtype == "float32":
        return config_index == 0 and key["precision"] == "ieee" and key["D"] == 2304 and key["CV"] == 3
    return (config_index == 0 and key["D"] == 2304 and key["CV"] == 48
            and (key.get("out") == "fp32" or not (key.get("need_dk", False) and key.get("need_dv", False))))


def in_headline(key: dict, config_index: int) -> bool:
    """What the GPU check's headline rows compile (benchmarks/gpu_check.py in a clone, C=256): bfloat16 at
    D=256, Cv=3 and 48; 3x3 windows (D=256 rows, PATCH=3) at Cv=3 and 151, the forward with either output
    (a key split writes float32); float32 tf32x3 and ieee at Cv=3; every autotune config of each;
    the prologue at C=256; contextual_loss at its VGG-19 widths."""
    if key["module"] == "contextual_loss":
        return True
    if key["kernel"] in PROLOGUE:
        return key["C"] == 256 and key["center"] and key["normalize"] and key["dtype"] in ("float32", "bfloat16")
    if key["key_mask"] or key["D"] != 256 or not key.get("need_dk", True) or not key.get("need_dv", True):
        return False
    if key["dtype"] == "bfloat16":
        if key["patch"] == 3:
            return key["CV"] in (3, 151)
        return key["CV"] in (3, 48) and key.get("out", "bf16") == "bf16"
    return key["dtype"] == "float32" and key["precision"] in ("tf32x3", "ieee") and key["CV"] == 3 and key["patch"] == 1


SELECT = {"default": in_default, "headline": in_headline, "full": lambda key, index: True}


# ----------------------------------------------------------------------------- child process


def _ast_source(ASTSource, fn, signature, constexprs, attrs):
    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:  # triton >= 3.3
        return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return ASTSource(fn=fn, signature=signature, constants=constexprs, attrs=attrs)  # triton <= 3.2


def _unwrap(obj):
    """(JITFunction, autotuner or None, [heuristic value functions]) of a module-level kernel."""
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction

    tuner, heuristics = None, []
    while not isinstance(obj, JITFunction):
        if isinstance(obj, Autotuner):
            tuner = obj
        elif isinstance(obj, Heuristics):
            heuristics.append(obj.values)
        else:
            raise TypeError(f"unexpected kernel wrapper {type(obj).__name__}")
        obj = obj.fn
    return obj, tuner, heuristics


def module_kernels(module) -> list[str]:
    """Names of the module's launchable kernels: the JIT functions (bare or wrapped) named `*_kernel`
    (a helper called from a kernel is a `@triton.jit` function too; the launchers launch `*_kernel`s only)."""
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction

    return sorted(name for name, obj in vars(module).items()
                  if isinstance(obj, (JITFunction, Autotuner, Heuristics)) and name.endswith("_kernel"))


def _autotuned_cases(module, name, arch, dtype, m):
    import types

    import torch

    jit, tuner, heuristics = _unwrap(getattr(module, name))
    dt = TRITON_DTYPE[dtype]
    precisions = m["precisions"] if dtype == "float32" else ("ieee",)
    outs = sorted({"fp32" if f else dt for f in m["out_fp32"]}) if name == "_forward_kernel" else [dt]
    needs = m["need"] if name == "_backward_dkdv_kernel" else [None]
    for precision, D, cv, out, need, has_mask, patch in itertools.product(
            precisions, m["dims"], m["cvs"], outs, needs, m["key_mask"], m["patch"]):
        key = dict(module="correspondence_warp", kernel=name, arch=arch, dtype=dtype, D=D, CV=cv, key_mask=has_mask,
                   patch=patch)
        consts = dict(D=D, CV=cv, BLOCK_CV=module._block_cv(cv), HAS_MASK=has_mask, PATCH=patch,
                      PRECISION=module._dot_precision(getattr(torch, dtype), precision))
        if dtype == "float32":
            key["precision"] = precision
        if name == "_forward_kernel":
            key["out"] = out
        if need is not None:
            key["need_dk"], key["need_dv"] = need
            consts.update(NEED_DK=need[0], NEED_DV=need[1])
        # The module's own pruning picks the configs for the dtype and kernel (by its argument names).
        nargs = {a: types.SimpleNamespace(dtype=getattr(torch, dtype)) for a in jit.arg_names}
        configs = tuner.configs
        if tuner.early_config_prune is not None:
            configs = tuner.early_config_prune(tuner.configs, nargs, **consts)
        for index, config in enumerate(configs):
            c = dict(consts, **config.kwargs)
            for values in heuristics:
                for k, f in values.items():
                    c[k] = f(c)
            options = dict(num_warps=config.num_warps, num_stages=config.num_stages,
                           num_ctas=getattr(config, "num_ctas", 1))
            if getattr(config, "maxnreg", None) is not None:
                options["maxnreg"] = config.maxnreg
            label = ("M{BLOCK_M} N{BLOCK_N} D{BLOCK_D}".format(**config.kwargs)
                     + f" w{config.num_warps} s{config.num_stages}" + (" one_chunk" if c.get("ONE_CHUNK") else ""))
            yield key, index, label, jit, _signature(jit, dt, out, c), c, options


def cases(matrix: str, archs=None):
    """Yield (case key, config label, JITFunction, signature, constexprs, options) to compile."""
    m, select = FULL, SELECT[matrix]
    for module_name, module_path in MODULES.items():
        module = importlib.import_module(module_path)
        for name in KERNELS[module_name]:
            if not hasattr(module, name):  # renamed or removed: the compile test says so
                continue
            for arch in archs or m["archs"]:
                found = []
                if module_name == "contextual_loss":  # float32 rows, fixed tiles, the launcher's defaults
                    jit = _unwrap(getattr(module, name))[0]
                    for C, for_y in itertools.product(m["contextual_channels"],
                                                      m["for_y"] if name == "_backward_kernel" else [None]):
                        key = dict(module=module_name, kernel=name, arch=arch, dtype="float32", C=C)
                        c = dict(C=C, BLOCK_D=module.BLOCK_D)
                        if for_y is None:
                            c.update(BLOCK_M=module.BLOCK, BLOCK_N=module.BLOCK)
                        else:
                            key["for_y"] = c["FOR_Y"] = for_y
                            c["BLOCK"] = module.BLOCK
                        label = f"B{module.BLOCK} D{module.BLOCK_D} w4 s3"
                        found.append((key, 0, label, jit, _signature(jit, "fp32", "fp32", c), c,
                                      dict(num_warps=4, num_stages=3)))
                else:
                    for dtype in m["dtypes"]:
                        if name in AUTOTUNED:
                            found += _autotuned_cases(module, name, arch, dtype, m)
                            continue
                        jit = _unwrap(getattr(module, name))[0]
                        dt = TRITON_DTYPE[dtype]
                        for C, (center, normalize) in itertools.product(m["channels"], m["center_normalize"]):
                            key = dict(module=module_name, kernel=name, arch=arch, dtype=dtype, C=C, center=center,
                                       normalize=normalize)
                            c = dict(C=C, CENTER=center, NORMALIZE=normalize, **module._PROLOGUE_BLOCKS)
                            label = "C{BLOCK_C} N{BLOCK_N} w4 s3".format(**module._PROLOGUE_BLOCKS)
                            found.append((key, 0, label, jit, _signature(jit, dt, dt, c), c,
                                          dict(num_warps=4, num_stages=3)))
                for key, index, label, jit, sig, c, options in found:
                    if select(key, index):
                        yield key, label, jit, sig, c, options


def _signature(jit, dt, out, consts):
    sig = {}
    for p in jit.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in POINTER_TYPES:
            t = POINTER_TYPES[p.name]
            sig[p.name] = "*" + {"dt": dt, "out": out}.get(t, t)
        elif p.name in SCALAR_TYPES:
            sig[p.name] = SCALAR_TYPES[p.name]
        else:
            raise KeyError(f"{jit.__name__}: no type for argument {p.name!r} (add it to POINTER_TYPES/SCALAR_TYPES)")
    missing = [p.name for p in jit.params if p.is_constexpr and p.name not in consts]
    if missing:
        raise KeyError(f"{jit.__name__}: no value for constexpr {missing}")
    return sig


# SASS opcode (the mnemonic before the first '.') -> the mix's column.
SASS_MIX = {"HGMMA": "wgmma", "HMMA": "mma", "LDSM": "ldsm", "LDGSTS": "cp.async", "UTMALDG": "tma",
            "UBLKCP": "tma", "LDG": "ldg", "STG": "stg", "LDS": "lds", "STS": "sts", "LDL": "ldl", "STL": "stl",
            "FFMA": "ffma", "MUFU": "mufu", "BAR": "bar"}
_SASS_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def sass_mix(text: str) -> dict:
    """Static instruction counts of SASS text (cuobjdump -sass), by SASS_MIX column, plus the total."""
    ops = Counter(m.group(1) for m in _SASS_LINE.finditer(text))
    mix = Counter()
    for op, n in ops.items():
        if op in SASS_MIX:
            mix[SASS_MIX[op]] += n
    mix["total"] = sum(ops.values())
    return dict(mix)


def analyse_cubin(cubin: bytes, cuobjdump: str | None, sass: bool = True) -> dict[str, dict]:
    """Per kernel function of a cubin: reg, stack, local, shared (static) and, with `sass`, the SASS mix."""
    if cuobjdump is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                                   timeout=120).stdout
            text = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True,
                                  timeout=300).stdout if sass else ""
        except (OSError, subprocess.SubprocessError):
            return {}
    out: dict[str, dict] = {}
    for name, body in re.findall(r"Function (\S+?):?\s*\n?\s*(REG:.*)", usage):
        out[name] = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", body)}
    for name, body in re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", text, flags=re.S):
        out.setdefault(name, {})["sass"] = sass_mix(body)
    return out


def tools() -> tuple[dict, str | None]:
    """({triton, ptxas, cuobjdump}, skip reason or None)."""
    try:
        import triton
    except Exception as e:  # noqa: BLE001
        return {}, f"triton does not import: {e!r}"
    info = {"triton": triton.__version__}
    try:
        from triton.backends import backends
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return info, f"triton {triton.__version__}: no backend registry / GPUTarget ({e!r})"
    if "nvidia" not in backends:
        return info, f"triton {triton.__version__} has no NVIDIA backend (backends: {sorted(backends)})"
    try:
        from triton import knobs

        ptxas = knobs.nvidia.ptxas
        cuobjdump = knobs.nvidia.cuobjdump
        info.update(ptxas=f"{ptxas.path} ({ptxas.version})", cuobjdump=cuobjdump.path if cuobjdump else None)
    except Exception as e:  # noqa: BLE001 (no knobs before triton 3.4: ptxas is only checked by compiling)
        info.update(ptxas=f"unknown ({e!r})", cuobjdump=None)
        return info, None
    if ptxas is None:
        return info, "no usable ptxas (TRITON_PTXAS_PATH or triton/backends/nvidia/bin/ptxas)"
    return info, None


def child_main(args) -> int:
    """Compile shard i/n of the matrix here; print one JSON line."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print(json.dumps({"error": "TRITON_INTERPRET is set: @triton.jit would build interpreter objects"}))
        return 1
    os.environ["COCOS_KERNELS_TRITON_AUTOTUNE"] = "1"  # the modules' GPU configs
    found_tools, skip = tools()
    if skip:
        print(json.dumps({"env": found_tools, "skip": skip}))
        return 0
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    shard, shards = map(int, args.shard.split("/"))
    results = []
    archs = [int(a) for a in args.archs.split(",")]
    for i, (key, label, jit, sig, consts, options) in enumerate(cases(args.matrix, archs)):
        if i % shards != shard:
            continue
        index = {n: j for j, n in enumerate(jit.arg_names)}
        constexprs = {(index[k],): v for k, v in consts.items() if k in index}
        attrs = {(index[n],): [["tt.divisibility", 16]] for n, t in sig.items() if t.startswith("*") or t == "i32"}
        row = dict(key, config=label, num_warps=options["num_warps"])
        t0 = time.perf_counter()
        try:
            src = _ast_source(ASTSource, jit, sig, constexprs, attrs)
            compiled = triton.compile(src, target=GPUTarget("cuda", key["arch"], 32), options=options)
            shared = int(compiled.metadata.shared)
            row.update(ok=True, shared=shared, fits=shared <= SHARED_LIMIT[key["arch"]])
            row["seconds"] = round(time.perf_counter() - t0, 2)
            found = analyse_cubin(compiled.asm.get("cubin", b""), found_tools.get("cuobjdump"), sass=args.sass)
            usage = next(iter(found.values()), {})
            row.update({k: v for k, v in usage.items() if k in ("reg", "stack", "local", "sass")})
        except Exception as e:  # noqa: BLE001
            row.update(ok=False, error=f"{type(e).__name__}: {e}"[-4000:], seconds=round(time.perf_counter() - t0, 2))
        results.append(row)
    kernels = {name: module_kernels(importlib.import_module(path)) for name, path in MODULES.items()}
    print(json.dumps({"env": found_tools, "kernels_in_modules": kernels, "results": results}))
    return 0


# ----------------------------------------------------------------------------- parent side


def run_matrix(matrix: str, jobs: int, cache_dir: str | None = None, timeout: float = 7200,
               archs: str = "90,80", sass: bool = False) -> dict:
    """Compile `matrix` in `jobs` child processes (TRITON_INTERPRET unset); merged JSON reports."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    tmp = None
    if cache_dir is None and "TRITON_CACHE_DIR" not in env:  # a cold cache: compile times are real
        tmp = tempfile.TemporaryDirectory(prefix="triton-aot-cache-")
        cache_dir = tmp.name
    if cache_dir is not None:
        env["TRITON_CACHE_DIR"] = cache_dir
    jobs = max(1, jobs)
    t0 = time.perf_counter()
    try:
        procs = [subprocess.Popen([sys.executable, "-m", "cocos_kernels.triton.aot", "--matrix", matrix,
                                   "--archs", archs, "--shard", f"{i}/{jobs}", *(["--sass"] if sass else [])],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(jobs)]
        reports = []
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            lines = [line for line in out.splitlines() if line.startswith("{")]
            if p.returncode != 0 or not lines:
                raise RuntimeError(f"compile child failed (exit {p.returncode}):\n{out[-3000:]}\n{err[-3000:]}")
            reports.append(json.loads(lines[-1]))
    finally:
        if tmp is not None:
            tmp.cleanup()
    merged = dict(reports[0])
    merged["results"] = [r for rep in reports for r in rep.get("results", [])]
    merged["wall_s"] = round(time.perf_counter() - t0, 1)
    return merged


RESULT_FIELDS = ("config", "ok", "shared", "fits", "reg", "local", "stack", "seconds", "error", "sass", "num_warps",
                 "blocks_per_sm")


def case_of(row: dict) -> tuple:
    return tuple((k, v) for k, v in row.items() if k not in RESULT_FIELDS)


def blocks_per_sm(arch: int, regs: int | None, shared: int, warps: int) -> int:
    """Resident blocks per SM allowed by registers (allocated per warp in 256-register units), shared
    memory (plus 1 KiB reserved per block) and threads."""
    lim, threads = SM_LIMITS[arch], 32 * warps
    by_regs = lim["regs"] // (warps * math.ceil(max(regs or 1, 1) * 32 / 256) * 256)
    by_shared = lim["shared"] // (shared + 1024)
    return max(0, min(by_regs, by_shared, lim["threads"] // threads, lim["blocks"]))




def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="One compile shard of run_matrix (a child process): prints one JSON line.")
    p.add_argument("--matrix", choices=tuple(SELECT), default="default")
    p.add_argument("--archs", default="90,80", help="compute capabilities (default: %(default)s)")
    p.add_argument("--shard", default="0/1", help="i/n: compile every n-th case from i (default: %(default)s)")
    p.add_argument("--sass", action="store_true", help="also count the SASS instruction mix (cuobjdump -sass)")
    return p


if __name__ == "__main__":
    sys.exit(child_main(_parser().parse_args()))
