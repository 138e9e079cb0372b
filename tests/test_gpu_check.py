"""benchmarks/gpu_check.py on the CPU: the plan's order, the per-item limits and the deadline, the
report and the targets; the whole dry run (~90 s on 2 cores) behind `slow`."""
import json
import sys
import time

import pytest

from benchmarks import gpu_check


def _timing_row(impl, dtype="float32", side=128, mode="forward+backward", precision="tf32x3", patch_size=1,
                value_channels=3, **fields):
    return dict(impl=impl, dtype=dtype, side=side, mode=mode, precision=precision, patch_size=patch_size,
                value_channels=value_channels, batch=4, channels=256, **fields)


def test_headline_plan_order():
    args = gpu_check.parse_args([])
    items = gpu_check.timing_items(args)
    impls = [it["impl"] for it in items]
    # triton's rows first, then cuda's, then the peers'
    assert impls.index("cuda") > max(i for i, x in enumerate(impls) if x == "triton")
    assert min(i for i, x in enumerate(impls) if x in gpu_check.PEERS) > max(i for i, x in enumerate(impls) if x == "cuda")
    triton = [(it["dtype"], it["precision"], it["side"], it["value_channels"], it["patch_size"], it["mode"])
              for it in items if it["impl"] == "triton"]
    assert triton[:4] == [("bfloat16", None, 256, 3, 1, "forward"), ("bfloat16", None, 256, 3, 1, "forward+backward"),
                          ("bfloat16", None, 256, 48, 1, "forward"), ("bfloat16", None, 256, 48, 1, "forward+backward")]
    assert [t[2] for t in triton if t[4] == 3] == [64, 64, 128, 128]
    assert [(t[1], t[2]) for t in triton if t[0] == "float32"][::2] == [("tf32x3", 128), ("ieee", 128)]
    assert all(it["batch"] == 4 and it["channels"] == 256 for it in items)
    assert not [it for it in items if it["impl"] == "cuda" and it["precision"] == "tf32x3"]  # no such mode
    more = gpu_check.timing_items(args, more=True)
    assert not any(dict(it) in items for it in more)  # the sweep repeats no headline row


def test_dry_run_defaults_are_tiny():
    args = gpu_check.parse_args(["--dry-run"])
    assert (args.headline_side, args.channels, args.batch, args.deadline_s) == (8, 8, 1, 85.0)
    assert gpu_check.parse_args([]).deadline_s == 540.0  # under the device tool's 600 s per command


# A stand-in phase process: items [first, last); item i sleeps SLEEP[i] s, or exits with 3 for "crash".
_FAKE_CHILD = """
import json, sys, time
first, last, plan = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
for i in range(first, last):
    print(json.dumps({"start": i}), flush=True)
    if plan[i] == "crash":
        sys.exit(3)
    time.sleep(plan[i])
    print(json.dumps({"index": i, "rows": [{"item": i, "status": "ok"}]}), flush=True)
"""


def _run(plan, limit_s=5.0, deadline_in=60.0, tmp_path=None):
    rows = []
    items = [{"item": i} for i in range(len(plan))]
    with open(tmp_path / "log", "w") as log:
        gpu_check.run_items(items, 0, len(items),
                            lambda a, b: [sys.executable, "-c", _FAKE_CHILD, str(a), str(b), json.dumps(plan)],
                            lambda index, r: rows.extend(r), log, {}, limit_s, time.time() + deadline_in)
    return rows


def test_items_stream_and_a_slow_item_is_stopped(tmp_path):
    rows = _run([0, 30, 0], limit_s=1.0, tmp_path=tmp_path)
    assert rows == [{"item": 0, "status": "ok"}, {"item": 1, "status": "stopped: over its 1 s limit"},
                    {"item": 2, "status": "ok"}]  # a fresh process resumed after the stopped item


def test_a_crashed_item_fails_and_the_rest_run(tmp_path):
    rows = _run([0, "crash", 0], tmp_path=tmp_path)
    assert [r["status"] for r in rows] == ["ok", "FAILED: its process exited with 3 (see gpu_check.log)", "ok"]


def test_nothing_starts_past_the_deadline(tmp_path):
    rows = _run([0, 0], deadline_in=-1.0, tmp_path=tmp_path)
    assert [r["status"] for r in rows] == ["not run: past the deadline"] * 2


def test_targets_and_markdown():
    timing = [
        _timing_row("reference", status="ok", time_ms=40.0, peak_bytes=40 * 2**30, tflops=1.0),
        _timing_row("triton", status="ok", time_ms=10.0, peak_bytes=2**30, tflops=4.0, error_vs_float32=1e-6),
        _timing_row("triton", dtype="bfloat16", side=256, mode="forward", precision=None, status="ok", time_ms=5.0,
                    tflops=450.0),
        _timing_row("triton", dtype="bfloat16", side=64, mode="forward+backward", precision=None, patch_size=3,
                    status="ok", time_ms=5.0, tflops=200.0),
        _timing_row("reference", dtype="bfloat16", side=256, precision=None, status="OOM"),
    ]
    results = {"env": [dict(card="NVIDIA H200", torch="2.11", triton="3.6.0", bf16_matmul_tflops=900.0,
                            tf32_matmul_tflops=450.0, fp32_matmul_tflops=60.0)],
               "timing": timing, "tests": {"status": "passed", "command": "pytest", "tests": 3, "failures": 0},
               "contextual": [], "train_step": [], "accuracy": [], "timing_more": []}
    targets = gpu_check.report_targets(results)
    assert "128^2 float32 tf32x3 fwd+bwd: triton 4.00x the reference's speed (target >= 3): met" in targets
    assert "128^2 float32 tf32x3 fwd+bwd: triton peak memory 0.025x the reference's (target <= 0.05): met" in targets
    assert ("256^2 bfloat16 forward: triton 450 TFLOP/s = 50% of the bf16 matmul peak (target >= 50%): met"
            in targets)
    assert ("64^2 3x3 windows forward+backward: triton 200 TFLOP/s = 22% of the bf16 matmul peak (target >= 30%): "
            "NOT met" in targets)
    meta = dict(card="NVIDIA H200", started="today", channels=256, batch=4, wall_s=300.0, last_done="tests",
                cuda_build={"status": "ok"})
    text = gpu_check.markdown(meta, results, targets)
    assert "# correspondence_warp GPU check: NVIDIA H200" in text and "bf16 matmul 900 TFLOP/s" in text
    assert "**Partial report**, written after tests" in text
    assert ("| float32 (tf32x3) | 3 | 128^2 | 1x1 | forward+backward | triton | 10.000 | 1024 | 4.0 | 4.00x | "
            "1.0e-06 | ok |") in text
    assert "| bfloat16 | 3 | 256^2 | 1x1 | forward+backward | reference |  |  |  |  |  | OOM |" in text
    assert "## CUDA build\n\n**ok**" in text and "**passed** (3 tests, 0 failures" in text


def test_contextual_layers_are_the_vgg19_sizes():
    assert gpu_check.CONTEXTUAL_LAYERS == {"relu2_2": (128, 2), "relu3_2": (256, 4), "relu4_2": (512, 8),
                                           "relu5_2": (512, 16)}
    items = gpu_check.contextual_items(gpu_check.parse_args([]))
    assert {it["image"] for it in items if it["part"] == "timing"} == {256, 512, 1024}


def test_train_step_targets_and_table():
    def row(side, impl, ckpt, status="ok", peak=None, baseline=2 * 2**30, t=1.0):
        return dict(op="train_step", side=side, impl=impl, activation_checkpointing=ckpt, status=status,
                    peak_bytes=peak, baseline_bytes=baseline, time_median_s=t, memory_cap_gb=80.0)
    rows = [row(512, "reference", False, peak=24 * 2**30), row(512, "triton", True, peak=3 * 2**30, t=1.3),
            row(1024, "triton", True, peak=13 * 2**30), row(512, "triton", False, peak=16 * 2**30),
            row(1024, "triton", False, status="OOM")]
    targets = gpu_check._train_step_targets(rows)
    assert "512 px train step: triton + checkpointing total 0.19x the materialised one's (target < 0.25): met" in targets
    assert "512 px train step: triton total 0.69x the materialised one's (target < 0.25): NOT met" in targets
    assert "1024 px train step: triton + checkpointing total 15.0 GiB (target: fits in 80 GiB): met" in targets
    assert not any("1024 px train step: triton total" in t for t in targets)  # OOM: no total to judge
    text = "\n".join(gpu_check._train_step_markdown(rows))
    assert "| 512 | triton | on | ok | 3.00 | 5.00 | 1.30 |" in text and "| 1024 | triton | off | OOM | OOM | - | - |" in text
    assert [it["impl"] for it in gpu_check.train_step_items(gpu_check.parse_args([]))][:2] == ["reference", "triton"]


def test_shard_plugin_keeps_every_nth(monkeypatch):
    items = list(range(10))
    monkeypatch.setenv(gpu_check.SHARD_VARIABLE, "1/3")
    gpu_check.pytest_collection_modifyitems(None, items)
    assert items == [1, 4, 7]


@pytest.mark.slow
def test_dry_run_writes_every_phase(tmp_path):
    assert gpu_check.main(["--dry-run", "--out-dir", str(tmp_path), "--deadline-s", "300"]) == 0
    report = json.loads((tmp_path / "gpu_check_cpu-dry-run.json").read_text())
    assert report["meta"]["last_done"] == "all phases"
    assert report["tests"]["status"].startswith("passed (dry run: collected only")
    for phase in ("env", "timing", "contextual", "train_step", "accuracy"):
        assert report[phase] and not any(r["status"].startswith("not run") for r in report[phase] if "status" in r)
