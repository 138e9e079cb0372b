"""The benchmark suite's plumbing at tiny sizes: implementations agree with the reference,
refusals, OOM and the time cap are recorded, reports are written, the memory fit is right."""
import json
import os

import pytest
import torch

import cocos_kernels as ck
from benchmarks import bench_contextual_loss, bench_correspondence_warp, bench_cpu_roofline, run
from benchmarks.harness import Refused

BASELINES = ["chunked", "key_chunked", "sdpa-math", "sdpa-flash-pad-C"]


@pytest.mark.parametrize("impl", BASELINES)
def test_baselines_match_the_reference_across_chunks(impl, monkeypatch):
    # Blocks smaller than the grid, neither dividing it: the chunk loops' edges are exercised.
    monkeypatch.setattr(bench_correspondence_warp, "QUERY_CHUNK", 24)
    monkeypatch.setattr(bench_correspondence_warp, "KEY_CHUNK", 40)
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 16, 8, 10, generator=g, dtype=torch.float64) for _ in range(2))
    v, grad = (torch.rand(2, 3, 8, 10, generator=g, dtype=torch.float64) for _ in range(2))
    results = []
    for name in ("reference", impl):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = bench_correspondence_warp.implementation(name, torch.device("cpu"), torch.float64)(*inputs)
        out.backward(grad)
        results.append([out, *(t.grad for t in inputs)])
    for got, expected in zip(*reversed(results)):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_sdpa_refusal_gives_torchs_reasons():
    run_sdpa = bench_correspondence_warp.implementation("sdpa-flash", torch.device("cpu"), torch.float32)
    with pytest.raises(Refused, match="same last dimension"):  # value width 3 != C = 8
        run_sdpa(torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4), torch.rand(1, 3, 4, 4))


def test_every_fused_backend_of_the_device_is_benchmarked():
    fused = [n for n, b in ck.BACKENDS.items() if b.fused and "cpu" in b.devices]
    assert set(fused) <= set(bench_correspondence_warp.impls("cpu"))
    assert "reference" in bench_contextual_loss.impls("cpu")


def test_contextual_loss_configs_have_the_vgg_layer_sizes():
    sweeps = [{"image_sizes": [512], "layers": ["relu2_2", "relu5_2"], "batch": [1], "dtypes": ["float32"],
               "modes": ["forward"]}]
    configs = run.configs_of("contextual_loss", sweeps, "cpu", ["reference"])
    assert {(c["layer"], c["side"], c["channels"]) for c in configs} == {("relu2_2", 256, 128), ("relu5_2", 32, 512)}


def _row(**kw):
    base = {"op": "correspondence_warp", "impl": "cpu", "mode": "forward", "dtype": "float32", "channels": 8, "patch_size": 1,
            "value_channels": 3, "batch": 1, "status": "ok", "error": None, "warmup": 0, "repeats": 1}
    return {**base, **kw}


def test_memory_fit_tells_linear_from_quadratic():
    rows = [_row(impl=impl, side=s, n=s * s, peak_bytes=scale * (s * s) ** power)
            for impl, scale, power in (("cpu", 2**14, 1), ("reference", 2**4, 2)) for s in (32, 64, 128)]
    fits = {f["impl"]: f for f in run.memory_fits(rows, "cpu")}
    assert fits["cpu"]["kind"] == "linear" and abs(fits["cpu"]["exponent"] - 1) < 1e-9
    assert fits["reference"]["kind"] == "quadratic" and abs(fits["reference"]["exponent"] - 2) < 1e-9


def test_larger_points_of_a_refused_or_oom_curve_are_recorded_without_running(monkeypatch):
    monkeypatch.setattr(run, "measure", lambda config: pytest.fail("should not run"))
    done = [_row(side=16, n=256, status="OOM", error="x"), _row(impl="sdpa-flash", side=16, n=256,
                                                               status="refused", error="why")]
    assert run.run_config(_row(side=32, flops=1.0), done, 10.0)["status"] == "OOM"
    refused = run.run_config(_row(impl="sdpa-flash", side=32, flops=1.0), done, 10.0)
    assert (refused["status"], refused["error"]) == ("refused", "why")


def test_over_the_time_cap_only_the_memory_call_runs(monkeypatch):
    calls = []

    def fake_measure(config):
        calls.append(config)
        return {**config, "status": "error", "error": "timed out after 70 s", "time_median_s": None}
    monkeypatch.setattr(run, "measure", fake_measure)
    done = [_row(side=16, n=256, flops=1e9, time_median_s=1.0)]
    row = run.run_config(_row(side=64, n=4096, flops=1e11), done, 10.0)  # estimated 100 s per call
    assert row["status"] == "skipped" and row["error"].startswith("> 10 s per call estimated (100 s")
    assert (calls[0]["repeats"], calls[0]["warmup"], calls[0]["timeout_s"]) == (0, 0, 70.0)


def test_suite_records_oom_and_refusals_and_writes_reports(tmp_path):
    # A 2 GiB cap: torch's footprint (~0.85 GiB) and the warm-up fit, the reference's 5 GiB matrix at 192x192 does not.
    by_op = run.main(["--ops", "correspondence_warp", "--sides", "8", "192", "--channels", "8",
                      "--impls", "reference", "sdpa-efficient", "--modes", "forward", "--repeats", "1",
                      "--warmup", "0", "--memory-cap-gb", "2", "--out-dir", str(tmp_path)])
    status = {(r["impl"], r["side"]): r["status"] for r in by_op["correspondence_warp"]}
    assert status == {("reference", 8): "ok", ("reference", 192): "OOM",
                      ("sdpa-efficient", 8): "refused", ("sdpa-efficient", 192): "refused"}
    (stem,) = {p.stem for p in tmp_path.iterdir()}
    assert {p.suffix for p in tmp_path.iterdir()} == {".json", ".md", ".png"}
    saved = json.loads((tmp_path / f"{stem}.json").read_text())
    assert saved["meta"]["matmul_tflops"]["float32"] > 0
    table = (tmp_path / f"{stem}.md").read_text()
    assert "| 8 | 64 | 8 | 1 | 3 | 1 | float32 | forward | reference | ok |" in table
    assert "sdpa-efficient (refused" in table


def test_cpu_roofline_writes_shares_and_ratios(tmp_path):
    bench_cpu_roofline.main(["--sides", "8", "--modes", "forward", "--repeats", "1", "--out", str(tmp_path / "r")])
    (row,) = json.loads((tmp_path / "r.json").read_text())
    assert row["share_of_peak"].keys() == {"cpu", "sdpa-flash-pad-C"} and row["speedup_vs_sdpa"] > 0
    assert set(row["times_s"]) == {"wall", "cpu"}
    assert "| 8 | 64 | 256 | 3 | forward |" in (tmp_path / "r.md").read_text()


def test_train_step_trace_counts_what_a_step_allocates(tmp_path):
    """The traced train step (value-less tensors): the weights and Adam's moments are the baseline, the
    materialised matrices show, and activation checkpointing leaves less alive at the peak."""
    from benchmarks import bench_train_step

    ck.select("cpu", torch.device("cpu"), torch.float32)
    bench_train_step.main(["--trace", "--sides", "64", "--out-dir", str(tmp_path)])
    base = tmp_path / f"train_step-cpu-{os.cpu_count()}c-trace"
    report = json.loads(base.with_suffix(".json").read_text())
    peak = {(r["impl"], r["activation_checkpointing"]): r["peak_bytes"] for r in report["results"]}
    baselines = {r["baseline_bytes"] for r in report["results"]}
    assert len(baselines) == 1 and baselines.pop() > 2**30  # ~170M weights and Adam's two moments of the trained ones
    assert peak["reference", False] > peak["cpu", False] > peak["cpu", True] > 0
    assert peak["reference", True] < peak["reference", False]
    assert "| 64 | cpu | on | ok |" in base.with_suffix(".md").read_text()


def _plot_row(impl, n, status, seconds=None, peak=None):
    return {"op": "correspondence_warp", "impl": impl, "mode": "forward", "dtype": "float32", "channels": 8,
            "patch_size": 1, "value_channels": 3, "batch": 1, "n": n, "status": status,
            "time_median_s": seconds, "peak_bytes": peak}


@pytest.mark.parametrize("case", ["all_missing", "one_curve_missing", "all_refused", "zero_peaks"])
def test_plot_draws_curves_that_never_finished(case, tmp_path):
    """Every plot path with curves that have no finished point: a PNG is written, nothing raises
    (a log axis with no positive data makes matplotlib's layout raise)."""
    finished = [_plot_row("cpu", n, "ok", 0.1 * n, 2**20 * n) for n in (64, 256)]
    rows = {
        "all_missing": [_plot_row(i, n, s) for i, s in (("reference", "OOM"), ("cpu", "timeout")) for n in (64, 256)],
        "one_curve_missing": finished + [_plot_row("reference", n, "OOM") for n in (64, 256)],
        "all_refused": [_plot_row(i, n, "refused") for i in ("reference", "cpu") for n in (64, 256)],
        "zero_peaks": [_plot_row("cpu", n, "ok", 0.1, 0) for n in (64, 256)],
    }[case]
    meta = {"impls": {"correspondence_warp": ["reference", "cpu"]}, "device_name": "test", "torch_version": "x"}
    run.plot(meta, "correspondence_warp", rows, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0
