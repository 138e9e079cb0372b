"""Ahead-of-time compilation of the Triton kernels of `cocos_kernels.triton.correspondence_warp`
for NVIDIA targets (sm_90 = H100, sm_80 = A100), on a machine without a GPU.

The rest of the suite runs these kernels on the Triton CPU interpreter (TRITON_INTERPRET=1, set
by conftest.py), which never lowers them to PTX: a kernel that the interpreter runs may still
fail to compile, or need more shared memory than the card has. Here every kernel is compiled
with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` (TTIR -> TTGIR -> LLVM
-> PTX -> cubin with the bundled ptxas) for the configs its launcher would use on a GPU:

* the autotuned attention kernels (`_forward_kernel`, `_backward_dq_kernel`,
  `_backward_dkdv_kernel`): every config the autotuner keeps for the dtype (the module's own
  `early_config_prune` decides, with the module imported as on a GPU: not interpreted, autotuning
  on), with the launcher's constexprs (BLOCK_CV, PRECISION, NEED_DK/NEED_DV) and the module's
  heuristics (ONE_CHUNK), for float32 (each precision) / float16 / bfloat16, D = 256 (one 3x3-less
  feature row) and 2304 (3x3 patches of 256 channels), Cv = 3 (RGB), 48 and 151 (ADE20K labels);
* the prologue kernels, for each dtype, CENTER x NORMALIZE and C = 64 / 256.

Asserted: every config compiles; for each case (kernel, target, dtype, precision, D, Cv, flags) at
least one config fits the card's shared memory (sm_90: 232448 bytes = 227 KiB, the H100's opt-in
per-block limit; sm_80: 166912 bytes, the A100's). A config that does not fit is only reported (a
warning): the autotuner drops it at run time (OutOfResources). Registers and stack frame (ptxas's
register spills) per config are in the report, not asserted.

Because `@triton.jit` builds interpreter objects once TRITON_INTERPRET=1 is set, the compilation
runs in child processes with TRITON_INTERPRET unset: this file is also the child's script
(`python tests/test_triton_compile.py --matrix default --archs 90 --shard 0/2` prints JSON).
By hand, for the whole table: `python tests/test_triton_compile.py --matrix full --table`.

Triton API: written against triton 3.8, where `ASTSource(fn, signature, constexprs, attrs)` takes
`signature` {arg name: type string, "constexpr" for constexpr arguments}, `constexprs`
{(arg index,): value} and `attrs` {(arg index,): [["tt.divisibility", 16]]}, and
`triton.compile(src, target=GPUTarget(...), options={num_warps, num_stages, ...})`. The upstream
source from the 3.3 era has the same ASTSource/compile signatures, so triton 3.6 (the GPU
machines) should take the same calls (not run here: only 3.8 is installed). Triton <= 3.2 named
the argument `constants` and took an `AttrsDescriptor`: `_ast_source` passes `constants=` where
the installed ASTSource has no `constexprs` parameter, but the attrs format of those versions is
not handled (such a triton fails the compile, it is not skipped). The NVIDIA backend, its bundled
ptxas and cuobjdump are located through `triton.knobs.nvidia` (triton >= 3.4).

Runtime, 2 cores, cold cache (a fresh TRITON_CACHE_DIR per pytest run): the default subset
(`in_default`, 35 compiles) ~21 s; the full matrix (about 4800 compiles, both targets, every flag
combination, behind `-m slow`) about twice the ~28 min measured before key masks doubled it.
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

MODULE = "cocos_kernels.triton.correspondence_warp"
REPO = Path(__file__).resolve().parents[1]

# Per-block shared memory a kernel may use (cudaDevAttrMaxSharedMemoryPerBlockOptin), the limit
# Triton's launcher checks (OutOfResources) before the first launch.
SHARED_LIMIT = {90: 232448, 80: 166912}  # H100 (227 KiB), A100 (163 KiB)

AUTOTUNED = ("_forward_kernel", "_backward_dq_kernel", "_backward_dkdv_kernel")
PROLOGUE = ("_prologue_kernel", "_prologue_backward_kernel")
KERNELS = AUTOTUNED + PROLOGUE

# Types of the non-constexpr arguments, by name; "dt" is the kernels' input dtype (features,
# value, grad_out: `input_dtype(dtype)`), everything the kernels accumulate or save is float32.
POINTER_TYPES = {
    "Q": "dt", "K": "dt", "V": "dt", "DO": "dt", "Out": "out", "Lse": "fp32", "Delta": "fp32",
    "DQ": "fp32", "DK": "fp32", "DV": "fp32", "MQ": "fp32", "AQ": "fp32", "MK": "fp32", "AK": "fp32", "Sums": "fp32",
    "X": "dt", "Rows": "dt", "G": "fp32", "DX": "fp32", "KeyMask": "u8",
}
SCALAR_TYPES = {"scale_log2": "fp32", "scale": "fp32", "eps": "fp32", "dwin": "fp32",
                "Nq": "i32", "Nk": "i32", "keys_per_split": "i32", "N": "i32", "Lq": "i32", "Lk": "i32",
                "lo_q": "i32", "lo_k": "i32", "width_q": "i32", "width_k": "i32"}
TRITON_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}

# The full matrix: everything the launchers can pass on a GPU, on sm_90 and sm_80.
FULL = dict(archs=(90, 80), dtypes=("float32", "float16", "bfloat16"), precisions=("ieee", "tf32x3", "tf32"),
            dims=(256, 2304), cvs=(3, 48, 151), out_fp32=(False, True),
            need=((True, True), (True, False), (False, True)), key_mask=(False, True), patch=(1, 3), channels=(64, 256),
            center_normalize=((True, True), (True, False), (False, True), (False, False)))


def in_default(key: dict, config_index: int) -> bool:
    """The default (fast) subset of FULL: 35 compiles, ~21 s on 2 cores.

    float32 tile products at precision "ieee" lower to unrolled FMA loops that take ptxas 5-50 s
    per config (the tensor-core paths of half precision take ~1-3 s), so the default takes every
    config only at bfloat16, at the shape with the largest tiles (Cv = 151 -> BLOCK_CV = 256) with
    D = 256 (both the ONE_CHUNK configs, BLOCK_D = 256, and the chunked ones, BLOCK_D = 64); the
    first (smallest) config elsewhere: float32 "ieee" at D = 2304, float16 with the other flags
    (the float32 output of a key split, dK or dV alone), and sm_80 for the forward kernel.
    """
    kernel, arch, dtype = key["kernel"], key["arch"], key["dtype"]
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
        return (key["D"] == 256 and key["CV"] == 151 and key.get("out") != "fp32"
                and key.get("need_dk", True) and key.get("need_dv", True))
    if dtype == "float32":
        return config_index == 0 and key["precision"] == "ieee" and key["D"] == 2304 and key["CV"] == 3
    return (config_index == 0 and key["D"] == 2304 and key["CV"] == 48
            and (key.get("out") == "fp32" or not (key.get("need_dk", False) and key.get("need_dv", False))))


# ----------------------------------------------------------------------------- child process


def _ast_source(ASTSource, fn, signature, constexprs, attrs):
    import inspect

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


def _module_kernels(module):
    """Names of the module's launchable kernels: the JIT functions (bare or wrapped) not called by others.

    A helper (`@triton.jit` function called from a kernel) is told apart by name: the launchers
    launch `*_kernel`s only.
    """
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction

    return sorted(name for name, obj in vars(module).items()
                  if isinstance(obj, (JITFunction, Autotuner, Heuristics)) and name.endswith("_kernel"))


def _cases(module, matrix, archs=None):
    """Yield (case key dict, config label, JITFunction, signature, constexprs, options) to compile."""
    import types

    import torch

    m = FULL
    block_cv = module._block_cv
    for name in KERNELS:
        if not hasattr(module, name):  # renamed or removed: test_every_kernel_is_covered says so
            continue
        jit, tuner, heuristics = _unwrap(getattr(module, name))
        for arch in archs or m["archs"]:
            for dtype in m["dtypes"]:
                dt = TRITON_DTYPE[dtype]
                if name in AUTOTUNED:
                    precisions = m["precisions"] if dtype == "float32" else ("ieee",)
                    outs = sorted({"fp32" if f else dt for f in m["out_fp32"]}) if name == "_forward_kernel" else [dt]
                    needs = m["need"] if name == "_backward_dkdv_kernel" else [None]
                    patches = m["patch"]
                    for precision in precisions:
                        for D in m["dims"]:
                            for cv in m["cvs"]:
                                for out, need, has_mask, patch in itertools.product(outs, needs, m["key_mask"], patches):
                                    key = dict(kernel=name, arch=arch, dtype=dtype, D=D, CV=cv, key_mask=has_mask)
                                    consts = dict(D=D, CV=cv, BLOCK_CV=block_cv(cv), HAS_MASK=has_mask,
                                                  PRECISION=module._dot_precision(getattr(torch, dtype), precision))
                                    key["patch"] = consts["PATCH"] = patch
                                    if dtype == "float32":
                                        key["precision"] = precision
                                    if name == "_forward_kernel":
                                        key["out"] = out
                                    if need is not None:
                                        key["need_dk"], key["need_dv"] = need
                                        consts.update(NEED_DK=need[0], NEED_DV=need[1])
                                    # The module's own pruning picks the configs for the dtype.
                                    nargs = {a: types.SimpleNamespace(dtype=getattr(torch, dtype))
                                             for a in ("Q", "K", "V")}
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
                                                 + f" w{config.num_warps} s{config.num_stages}"
                                                 + (" one_chunk" if c.get("ONE_CHUNK") else ""))
                                        if matrix == "full" or in_default(key, index):
                                            yield key, label, jit, _signature(jit, dt, out, c), c, options
                else:
                    for C in m["channels"]:
                        for center, normalize in m["center_normalize"]:
                            key = dict(kernel=name, arch=arch, dtype=dtype, C=C, center=center, normalize=normalize)
                            c = dict(C=C, CENTER=center, NORMALIZE=normalize, **module._PROLOGUE_BLOCKS)
                            label = "C{BLOCK_C} N{BLOCK_N} w4 s3".format(**module._PROLOGUE_BLOCKS)
                            if matrix == "full" or in_default(key, 0):
                                yield key, label, jit, _signature(jit, dt, dt, c), c, dict(num_warps=4, num_stages=3)


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


def _resource_usage(cubin: bytes, cuobjdump: str | None) -> dict:
    """REG and STACK (bytes of stack frame per thread: ptxas's register spills) of a cubin, via cuobjdump."""
    import re
    import tempfile

    if cuobjdump is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            text = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                                  text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return {}
    found = dict(re.findall(r"\b(REG|LOCAL|STACK):(\d+)", text))
    return {k.lower(): int(v) for k, v in found.items()}


def _environment() -> tuple[dict, str | None]:
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


def child_main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--matrix", choices=("default", "full"), default="default")
    parser.add_argument("--shard", default="0/1", help="i/n: compile every n-th case starting at i")
    parser.add_argument("--table", action="store_true", help="run the shards here and print a table, not JSON")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--archs", default="90,80", help="compute capabilities, e.g. 90 or 90,80")
    parser.add_argument("--json-out", help="with --table: also write the merged report here")
    args = parser.parse_args(argv)
    if args.table:
        report = run_matrix(args.matrix, args.jobs, archs=args.archs)
        print(format_table(report))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(report, indent=1))
        return 0

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print(json.dumps({"error": "TRITON_INTERPRET is set: @triton.jit would build interpreter objects"}))
        return 1
    os.environ["COCOS_KERNELS_TRITON_AUTOTUNE"] = "1"  # the module's GPU configs
    env, skip = _environment()
    if skip:
        print(json.dumps({"env": env, "skip": skip}))
        return 0
    sys.path.insert(0, str(REPO))
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = importlib.import_module(MODULE)
    shard, shards = map(int, args.shard.split("/"))
    results = []
    archs = [int(a) for a in args.archs.split(",")]
    for i, (key, label, jit, sig, consts, options) in enumerate(_cases(module, args.matrix, archs)):
        if i % shards != shard:
            continue
        arch = key["arch"]
        index = {n: j for j, n in enumerate(jit.arg_names)}
        constexprs = {(index[k],): v for k, v in consts.items() if k in index}
        attrs = {(index[n],): [["tt.divisibility", 16]] for n, t in sig.items() if t.startswith("*") or t == "i32"}
        row = dict(key, config=label)
        t0 = time.perf_counter()
        try:
            src = _ast_source(ASTSource, jit, sig, constexprs, attrs)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
            shared = compiled.metadata.shared
            row.update(ok=True, shared=int(shared), fits=int(shared) <= SHARED_LIMIT[arch])
            row.update(_resource_usage(compiled.asm.get("cubin", b""), env.get("cuobjdump")))
        except Exception as e:  # noqa: BLE001
            text = f"{type(e).__name__}: {e}"
            row.update(ok=False, error=text[-4000:])
        row["seconds"] = round(time.perf_counter() - t0, 2)
        results.append(row)
    print(json.dumps({"env": env, "kernels_in_module": _module_kernels(module), "results": results}))
    return 0


# ----------------------------------------------------------------------------- parent side


def run_matrix(matrix: str, jobs: int, cache_dir: str | None = None, timeout: float = 7200,
               archs: str = "90,80") -> dict:
    """Compile `matrix` in `jobs` child processes (TRITON_INTERPRET unset); merged JSON reports."""
    import tempfile

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    tmp = None
    if cache_dir is None and "TRITON_CACHE_DIR" not in env:
        tmp = tempfile.TemporaryDirectory(prefix="triton-aot-cache-")
        cache_dir = tmp.name
    if cache_dir is not None:
        env["TRITON_CACHE_DIR"] = cache_dir
    jobs = max(1, jobs)
    t0 = time.perf_counter()
    try:
        procs = [subprocess.Popen([sys.executable, __file__, "--matrix", matrix, "--archs", archs, "--shard", f"{i}/{jobs}"],
                                  cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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


def case_of(row: dict) -> tuple:
    return tuple((k, v) for k, v in row.items()
                 if k not in ("config", "ok", "shared", "fits", "reg", "local", "stack", "seconds", "error"))


def format_table(report: dict) -> str:
    lines = [f"triton {report.get('env', {}).get('triton')}, wall {report.get('wall_s')} s, "
             f"{len(report.get('results', []))} compiles"]
    if report.get("skip"):
        lines.append(f"skipped: {report['skip']}")
    for r in report.get("results", []):
        case = " ".join(f"{k}={v}" for k, v in case_of(r))
        if r["ok"]:
            flag = "" if r["fits"] else f"  > {SHARED_LIMIT[r['arch']]}: DOES NOT FIT"
            lines.append(f"{case} | {r['config']} | shared {r['shared']} reg {r.get('reg')} "
                         f"stack {r.get('stack')} | {r['seconds']} s{flag}")
        else:
            lines.append(f"{case} | {r['config']} | FAILED ({r['seconds']} s): {r['error'][:2000]}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(child_main())


# ----------------------------------------------------------------------------- the tests

_reports: dict = {}


def _report(matrix: str, tmp_path_factory) -> dict:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if matrix not in _reports:
        jobs = min(4, os.cpu_count() or 1)
        _reports[matrix] = run_matrix(matrix, jobs, cache_dir=str(tmp_path_factory.mktemp(f"triton-cache-{matrix}")))
    report = _reports[matrix]
    if report.get("skip"):
        pytest.skip(f"no AOT compilation for NVIDIA targets: {report['skip']}")
    return report


def _check(report: dict, kernel: str) -> None:
    rows = [r for r in report["results"] if r["kernel"] == kernel]
    assert rows, f"{kernel}: no compile cases"
    failures = [r for r in rows if not r["ok"]]
    assert not failures, f"{kernel}: {len(failures)} of {len(rows)} configs fail to compile:\n" + "\n".join(
        f"  {dict(case_of(r))} {r['config']}: {r['error'][:3000]}" for r in failures)
    cases: dict = {}
    for r in rows:
        cases.setdefault(case_of(r), []).append(r)
    none_fit, too_big = [], []
    for case, rs in cases.items():
        if not any(r["fits"] for r in rs):
            none_fit.append(f"  {dict(case)}: " + ", ".join(f"{r['config']} {r['shared']} B" for r in rs))
        too_big += [f"{dict(case)} {r['config']}: {r['shared']} B" for r in rs if not r["fits"]]
    if too_big:  # the autotuner drops these configs at run time (OutOfResources)
        warnings.warn(f"{kernel}: {len(too_big)} configs exceed the card's shared memory: " + "; ".join(too_big))
    assert not none_fit, f"{kernel}: no config fits the card's shared memory for:\n" + "\n".join(none_fit)


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_compiles_for_nvidia(kernel, tmp_path_factory):
    _check(_report("default", tmp_path_factory), kernel)


def test_every_kernel_is_covered(tmp_path_factory):
    """A kernel added to the module must be added to KERNELS (with its argument types) here."""
    listed = _report("default", tmp_path_factory)["kernels_in_module"]
    assert sorted(listed) == sorted(KERNELS), f"kernels in {MODULE}: {listed}; compiled here: {sorted(KERNELS)}"


@pytest.mark.slow
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_compiles_for_nvidia_full_matrix(kernel, tmp_path_factory):
    _check(_report("full", tmp_path_factory), kernel)
