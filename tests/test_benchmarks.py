"""The benchmark suite's command lines at tiny sizes, each in its own process as a user runs them from
the repository root: refusals, OOM and the time cap are recorded, reports are written, the memory fit
tells linear from quadratic, plots survive curves that never finished, the baselines agree with the
reference."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cocos_kernels as ck

ROOT = Path(__file__).resolve().parents[1]
CLIS = ["run", "bench_correspondence_warp", "bench_contextual_loss", "bench_cpu_roofline", "bench_train_step",
        "correspondence_learning", "kernel_report"]


def _cli(module: str, *args: str, expect: int = 0, timeout: float = 600) -> subprocess.CompletedProcess:
    """python -m benchmarks.<module> ARGS from the repository root."""
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _only(tmp_path: Path, suffix: str) -> Path:
    (path,) = tmp_path.glob(f"*{suffix}")
    return path


@pytest.mark.parametrize("module", CLIS)
def test_help(module):
    assert "usage:" in _cli(module, "--help").stdout


def test_unknown_impl_lists_every_implementation():
    error = _cli("run", "--impls", "nonexistent", expect=2).stderr
    listed = error.rsplit("choose from", 1)[1].split()
    assert {n for n, b in ck.BACKENDS.items() if b.fused and "cpu" in b.devices} | {"reference", "key_chunked"} <= set(listed)


def test_suite_records_oom_refusals_and_the_time_cap_and_writes_reports(tmp_path):
    # A 2 GiB cap: torch's footprint (~0.85 GiB) and the warm-up fit, the reference's 5 GiB matrix at 192x192
    # does not. The time cap (1 ns) leaves side 16 its memory call only; side 256 is not run after the OOM.
    _cli("run", "--ops", "correspondence_warp", "--sides", "8", "16", "192", "256", "--channels", "8",
         "--impls", "reference", "sdpa-efficient", "sdpa-flash", "--modes", "forward", "--min-run-time-s", "0.01",
         "--time-cap-s", "1e-9", "--memory-cap-gb", "2", "--out-dir", str(tmp_path))
    assert {p.suffix for p in tmp_path.iterdir()} == {".json", ".md", ".png"}
    saved = json.loads(_only(tmp_path, ".json").read_text())
    assert saved["meta"]["matmul_tflops"]["float32"] > 0
    rows = {(r["impl"], r["side"]): r for r in saved["results"]}
    assert {k: r["status"] for k, r in rows.items() if k[0] == "reference"} == {
        ("reference", 8): "ok", ("reference", 16): "ok", ("reference", 192): "OOM", ("reference", 256): "OOM"}
    assert rows["reference", 8]["time_median_s"] > 0 and rows["reference", 8]["times_s"]
    assert rows["reference", 16]["time_median_s"] is None and rows["reference", 16]["peak_bytes"] is not None
    assert rows["reference", 16]["error"].startswith("timing skipped: > 1e-09 s per call estimated")
    assert rows["reference", 256]["error"] == "not run: out of memory already at side 192"
    assert all(r["status"] == "refused" for (impl, _), r in rows.items() if impl.startswith("sdpa"))
    assert "same last dimension" in rows["sdpa-flash", 8]["error"]  # torch's reason: value width 3 != C = 8
    table = _only(tmp_path, ".md").read_text()
    assert "| 8 | 64 | 8 | 1 | 3 | 1 | float32 | forward | reference | ok |" in table
    assert "sdpa-efficient (refused" in table


def test_contextual_loss_configs_have_the_vgg_layer_sizes(tmp_path):
    _cli("run", "--ops", "contextual_loss", "--image-sizes", "32", "--layers", "relu2_2", "relu5_2", "--impls",
         "reference", "--modes", "forward", "--min-run-time-s", "0.01", "--out-dir", str(tmp_path))
    rows = json.loads(_only(tmp_path, ".json").read_text())["results"]
    assert {(r["layer"], r["side"], r["channels"], r["status"]) for r in rows} == {("relu2_2", 16, 128, "ok"),
                                                                                 ("relu5_2", 2, 512, "ok")}


def _row(impl, side, status="ok", seconds=None, peak=None, **kw):
    return {"op": "correspondence_warp", "impl": impl, "mode": "forward", "dtype": "float32", "channels": 8,
            "patch_size": 1, "value_channels": 3, "batch": 1, "side": side, "n": side * side, "status": status,
            "error": None, "time_median_s": seconds, "peak_bytes": peak, "flops": 1e6, **kw}


def test_reports_from_saved_results_fit_memory_and_plot_curves_that_never_finished(tmp_path):
    """--from-results: the memory fit of exact power laws, and every plot path with curves that have no
    finished point (a log axis with no positive data makes matplotlib's layout raise)."""
    meta = {"date": "today", "suite": "quick", "device": "cpu", "device_name": "test", "cpu_model": "test",
            "logical_cpus": 2, "mem_total_gib": 8.0, "platform": "test", "torch_version": "x", "threads": 2,
            "command": "test", "note": "", "memory_cap_gb": 4.0, "time_cap_s": 20.0, "min_run_time_s": 0.5,
            "matmul_tflops": {"float32": 0.1}, "impls": {"correspondence_warp": ["reference", "cpu"]}}
    finished = [_row("cpu", s, "ok", 0.1 * s, 2**20 * s) for s in (8, 16)]
    cases = {
        "fit": [_row(impl, s, "ok", 1.0, scale * (s * s) ** power)
                for impl, scale, power in (("cpu", 2**14, 1), ("reference", 2**4, 2)) for s in (32, 64, 128)],
        "all_missing": [_row(i, s, status) for i, status in (("reference", "OOM"), ("cpu", "error")) for s in (8, 16)],
        "one_curve_missing": finished + [_row("reference", s, "OOM") for s in (8, 16)],
        "all_refused": [_row(i, s, "refused") for i in ("reference", "cpu") for s in (8, 16)],
        "zero_peaks": [_row("cpu", s, "ok", 0.1, 0) for s in (8, 16)],
    }
    saved = tmp_path / "saved"
    saved.mkdir()
    for name, rows in cases.items():
        (saved / f"{name}.json").write_text(json.dumps({"meta": meta, "results": rows}))
    out = tmp_path / "out"
    _cli("run", "--from-results", *(str(saved / f"{name}.json") for name in cases), "--out-dir", str(out))
    for name in cases:
        assert (out / f"{name}.png").stat().st_size > 0 and (out / f"{name}.md").exists()
    fits = {f["impl"]: f for f in json.loads((out / "fit.json").read_text())["memory_fits"]}
    assert fits["cpu"]["kind"] == "linear" and abs(fits["cpu"]["exponent"] - 1) < 1e-9
    assert fits["reference"]["kind"] == "quadratic" and abs(fits["reference"]["exponent"] - 2) < 1e-9
    assert "| cpu | forward | float32 | 8 | 1 | 3 | 1 | 1024, 4096, 16384 | 1.00 | linear |" in (out / "fit.md").read_text()


def test_baselines_match_the_reference_past_their_chunk_edges():
    out = _cli("run", "--check", "--impls", "chunked", "key_chunked", "sdpa-math", "sdpa-flash-pad-C").stdout
    assert out.count("agrees with the reference") == 4, out


def test_cpu_roofline_writes_shares_and_ratios(tmp_path):
    _cli("bench_cpu_roofline", "--sides", "8", "--modes", "forward", "--repeats", "1", "--min-run-time-s", "0.01",
         "--out", str(tmp_path / "r"))
    (row,) = json.loads((tmp_path / "r.json").read_text())
    assert row["share_of_peak"].keys() == {"cpu", "sdpa-flash-pad-C"} and row["speedup_vs_sdpa"] > 0
    assert set(row["times_s"]) == {"wall", "cpu"}
    assert "| 8 | 64 | 256 | 3 | forward |" in (tmp_path / "r.md").read_text()


def test_train_step_trace_counts_what_a_step_allocates(tmp_path):
    """The traced train step (value-less tensors): the weights and Adam's moments are the baseline, the
    materialised matrices show, and activation checkpointing leaves less alive at the peak."""
    _cli("bench_train_step", "--trace", "--sides", "64", "--out-dir", str(tmp_path))
    base = tmp_path / f"train_step-cpu-{os.cpu_count()}c-trace"
    report = json.loads(base.with_suffix(".json").read_text())
    peak = {(r["impl"], r["activation_checkpointing"]): r["peak_bytes"] for r in report["results"]}
    baselines = {r["baseline_bytes"] for r in report["results"]}
    assert len(baselines) == 1 and baselines.pop() > 2**30  # ~170M weights and Adam's two moments of the trained ones
    assert peak["reference", False] > peak["cpu", False] > peak["cpu", True] > 0
    assert peak["reference", True] < peak["reference", False]
    assert "| 64 | cpu | on | ok |" in base.with_suffix(".md").read_text()
