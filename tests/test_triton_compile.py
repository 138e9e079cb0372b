"""Ahead-of-time compilation of the Triton kernels (`cocos_kernels.triton.correspondence_warp` and
`cocos_kernels.triton.contextual_loss`) for NVIDIA targets (sm_90 = H100/H200, sm_80 = A100), on a
machine without a GPU, through `cocos_kernels.triton.aot` (its module docstring says how).

The rest of the suite runs these kernels on the Triton CPU interpreter (TRITON_INTERPRET=1, set
by conftest.py), which never lowers them to PTX: a kernel that the interpreter runs may still
fail to compile, or need more shared memory than the card has.

Asserted, on the default matrix (`aot.in_default`: the fast subset, ~40 compiles, ~30 s
on 2 cores): every config compiles, and for each case (kernel, target, dtype, precision, D, Cv,
flags) at least one config fits the card's shared memory (sm_90: 232448 bytes = 227 KiB; sm_80:
166912 bytes). A config that does not fit is only reported (a warning): the autotuner drops it at
run time (OutOfResources). On the GPU check's headline bfloat16 configs (D = 256, Cv = 3 and 48,
sm_90, every autotune config): no register spills and every config within shared memory; nor do
the contextual_loss kernels spill (sm_90, C = 256). Behind `-m slow`: the full matrix (every flag
combination, both targets).
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import pytest

from cocos_kernels.triton import aot

_reports: dict = {}
CASES = [(module, kernel) for module, kernels in aot.KERNELS.items() for kernel in kernels]


def _report(matrix: str, tmp_path_factory, archs: str = "90,80") -> dict:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if (matrix, archs) not in _reports:
        jobs = min(4, os.cpu_count() or 1)
        _reports[matrix, archs] = aot.run_matrix(matrix, jobs, archs=archs,
                                                cache_dir=str(tmp_path_factory.mktemp(f"triton-cache-{matrix}")))
    report = _reports[matrix, archs]
    if report.get("skip"):
        pytest.skip(f"no AOT compilation for NVIDIA targets: {report['skip']}")
    return report


def _check(report: dict, module: str, kernel: str) -> None:
    rows = [r for r in report["results"] if r["module"] == module and r["kernel"] == kernel]
    assert rows, f"{module}.{kernel}: no compile cases"
    failures = [r for r in rows if not r["ok"]]
    assert not failures, f"{module}.{kernel}: {len(failures)} of {len(rows)} configs fail to compile:\n" + "\n".join(
        f"  {dict(aot.case_of(r))} {r['config']}: {r['error'][:3000]}" for r in failures)
    cases: dict = {}
    for r in rows:
        cases.setdefault(aot.case_of(r), []).append(r)
    none_fit, too_big = [], []
    for case, rs in cases.items():
        if not any(r["fits"] for r in rs):
            none_fit.append(f"  {dict(case)}: " + ", ".join(f"{r['config']} {r['shared']} B" for r in rs))
        too_big += [f"{dict(case)} {r['config']}: {r['shared']} B" for r in rs if not r["fits"]]
    if too_big:  # the autotuner drops these configs at run time (OutOfResources)
        warnings.warn(f"{kernel}: {len(too_big)} configs exceed the card's shared memory: " + "; ".join(too_big), stacklevel=2)
    assert not none_fit, f"{module}.{kernel}: no config fits the card's shared memory for:\n" + "\n".join(none_fit)


@pytest.mark.parametrize("module,kernel", CASES, ids=[f"{m}.{k}" for m, k in CASES])
def test_kernel_compiles_for_nvidia(module, kernel, tmp_path_factory):
    _check(_report("default", tmp_path_factory), module, kernel)


def test_every_kernel_is_covered(tmp_path_factory):
    """A kernel added to a module must be added to aot.KERNELS (with its argument types)."""
    listed = _report("default", tmp_path_factory)["kernels_in_modules"]
    assert {m: sorted(k) for m, k in listed.items()} == {m: sorted(k) for m, k in aot.KERNELS.items()}


def test_headline_bfloat16_configs_neither_spill_nor_overflow_shared_memory(tmp_path_factory):
    """Every autotune config of the headline bfloat16 attention kernels (D = 256, Cv = 48: the GPU
    check's 256^2 rows; the default matrix compiles them with a key mask, a few registers more than
    the unmasked rows) on sm_90: launchable (shared memory) and without register spills."""
    rows = [r for r in _report("default", tmp_path_factory)["results"]
            if r["module"] == "correspondence_warp" and r["kernel"] in aot.AUTOTUNED and r["arch"] == 90
            and r["dtype"] == "bfloat16" and r["D"] == 256 and r["CV"] in (3, 48) and r["patch"] == 1
            and r.get("out") != "fp32"]
    assert rows
    bad = [f"{dict(aot.case_of(r))} {r['config']}: shared {r.get('shared')} B, stack {r.get('stack')} B" for r in rows
           if not (r["ok"] and r["fits"] and r.get("stack", 0) == 0)]
    assert not bad, "headline configs that spill or cannot launch:\n" + "\n".join(bad)


def test_contextual_loss_kernels_do_not_spill(tmp_path_factory):
    """The contextual_loss kernels (float32 tile products on FMAs, fixed tiles: no autotuner to
    drop a config that spills) on sm_90 at C = 256, the default matrix's case."""
    rows = [r for r in _report("default", tmp_path_factory)["results"] if r["module"] == "contextual_loss"]
    assert {r["kernel"] for r in rows} == set(aot.CONTEXTUAL)
    bad = [f"{dict(aot.case_of(r))} {r['config']}: stack {r.get('stack')} B" for r in rows
           if not (r["ok"] and r.get("stack", 0) == 0)]
    assert not bad, "contextual_loss kernels that spill:\n" + "\n".join(bad)


def test_sass_mix_and_occupancy():
    text = """
        Function : _forward_kernel
        /*0000*/                   LDC R1, c[0x0][0x28] ;      /* 0x00000a00ff017b82 */
        /*0010*/              @!P0 LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0030*/                   MUFU.EX2 R5, R5 ;
        /*0040*/                   STL [R1], R4 ;
    """
    assert aot.sass_mix(text) == {"ldg": 1, "wgmma": 1, "mufu": 1, "stl": 1, "total": 5}
    assert aot.blocks_per_sm(90, regs=128, shared=64 * 1024, warps=4) == 3  # shared memory bound
    assert aot.blocks_per_sm(90, regs=255, shared=0, warps=8) == 1  # registers bound
    assert aot.blocks_per_sm(90, regs=32, shared=300 * 1024, warps=4) == 0  # cannot launch


@pytest.mark.slow
@pytest.mark.parametrize("module,kernel", CASES, ids=[f"{m}.{k}" for m, k in CASES])
def test_kernel_compiles_for_nvidia_full_matrix(module, kernel, tmp_path_factory):
    _check(_report("full", tmp_path_factory), module, kernel)
