"""benchmarks/gpu_check.py on the CPU, through its command line: the plan's order (--plan), the
deadline, the report and the targets (--from-results on saved rows), the pytest shard plugin; the
whole dry run (~90 s on 2 cores) behind `slow`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
PEERS = ("reference", "sdpa-cudnn", "sdpa-flash-pad-C", "sdpa-efficient-pad-8")


def _gpu_check(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _plan(*args: str) -> tuple[dict, dict[str, list[dict]]]:
    """The resolved options and each phase's items of `gpu_check.py --plan ARGS`."""
    options, phases = None, {}
    for line in _gpu_check("--plan", *args).stdout.splitlines():
        entry = json.loads(line)
        if "options" in entry:
            options = entry["options"]
        else:
            phases.setdefault(entry.pop("phase"), []).append(entry)
    return options, phases


def test_help():
    assert "--dry-run" in _gpu_check("--help").stdout


def test_headline_plan_order():
    options, phases = _plan()
    items = phases["timing"]
    impls = [it["impl"] for it in items]
    # triton's rows first, then cuda's, then the peers'
    assert impls.index("cuda") > max(i for i, x in enumerate(impls) if x == "triton")
    assert min(i for i, x in enumerate(impls) if x in PEERS) > max(i for i, x in enumerate(impls) if x == "cuda")
    triton = [(it["dtype"], it["precision"], it["side"], it["value_channels"], it["patch_size"], it["mode"])
              for it in items if it["impl"] == "triton"]
    assert triton[:4] == [("bfloat16", None, 256, 3, 1, "forward"), ("bfloat16", None, 256, 3, 1, "forward+backward"),
                          ("bfloat16", None, 256, 48, 1, "forward"), ("bfloat16", None, 256, 48, 1, "forward+backward")]
    assert [t[2:4] for t in triton if t[4] == 3] == [(64, 3)] * 2 + [(128, 3)] * 2 + [(64, 151)] * 2
    assert [(t[1], t[2]) for t in triton if t[0] == "float32"][::2] == [("tf32x3", 128), ("ieee", 128)]
    assert all(it["batch"] == 4 and it["channels"] == 256 for it in items)
    assert [it for it in items if it["impl"] == "cuda" and it["precision"] == "tf32x3"]  # tensor-core float32
    assert not any(it in items for it in phases["timing_more"])  # the sweep repeats no headline row
    assert options["deadline_s"] == 540.0  # under the device tool's 600 s per command


def test_dry_run_defaults_are_tiny():
    options, phases = _plan("--dry-run")
    assert (options["headline_side"], options["channels"], options["batch"], options["deadline_s"]) == (8, 8, 1, 85.0)
    assert max(it["side"] for it in phases["timing"]) == 8


def test_contextual_layers_are_the_vgg19_sizes_and_train_step_order():
    _, phases = _plan()
    timing = [it for it in phases["contextual"] if it["part"] == "timing"]
    assert {it["image"] for it in timing} == {256, 512, 1024}
    layers = {"relu2_2": (128, 2), "relu3_2": (256, 4), "relu4_2": (512, 8), "relu5_2": (512, 16)}
    assert all((it["channels"], it["image"] // it["side"]) == layers[it["layer"]] for it in timing)
    assert {it["layer"] for it in timing} == set(layers)
    assert [it["impl"] for it in phases["train_step"]][:2] == ["reference", "triton"]


def test_nothing_starts_past_the_deadline(tmp_path):
    _gpu_check("--dry-run", "--deadline-s", "0", "--out-dir", str(tmp_path))
    report = json.loads((tmp_path / "gpu_check_unknown.json").read_text())
    rows = [r for phase in ("env", "timing", "contextual", "train_step", "accuracy", "timing_more") for r in report[phase]]
    assert rows and all(r["status"] == "not run: past the deadline" for r in rows)
    assert report["tests"]["status"] == "not run"


def test_accuracy_phase_alone_judges_the_cpu_backends(tmp_path):
    """The README's accuracy table: the accuracy phase only (--phases), on the CPU, for chosen backends."""
    _gpu_check("--dry-run", "--phases", "accuracy", "--accuracy-backends", "reference", "cpu", "--accuracy-sides", "4",
               "--accuracy-patches", "1", "--accuracy-value-channels", "3", "--out-dir", str(tmp_path))
    report = json.loads((tmp_path / "gpu_check_cpu-dry-run.json").read_text())
    assert report["timing"] == [] and report["tests"]["status"] == "skipped (--phases)"
    judged = {(r["backend"], r["mode"]): r for r in report["accuracy"]}
    assert {b for b, _ in judged} == {"reference", "cpu"}
    for dtype in ("float32-ieee", "float16", "bfloat16"):
        assert judged["cpu", dtype]["status"] == "ok" and set(judged["cpu", dtype]["errors"]) == {
            "out", "grad query", "grad key", "grad value"}
    assert judged["cpu", "float32-tf32"]["status"].startswith("skipped: no precision=")
    assert "| cpu | bfloat16 | 4^2 |" in (tmp_path / "gpu_check_cpu-dry-run.md").read_text()


def _timing_row(impl, dtype="float32", side=128, mode="forward+backward", precision="tf32x3", patch_size=1,
                value_channels=3, **fields):
    return dict(impl=impl, dtype=dtype, side=side, mode=mode, precision=precision, patch_size=patch_size,
                value_channels=value_channels, batch=4, channels=256, **fields)


def _train_row(side, impl, ckpt, status="ok", peak=None, baseline=2 * 2**30, t=1.0):
    return dict(op="train_step", side=side, impl=impl, activation_checkpointing=ckpt, status=status, peak_bytes=peak,
                baseline_bytes=baseline, time_median_s=t, memory_cap_gb=80.0)


def test_report_and_targets_from_saved_results(tmp_path):
    timing = [
        _timing_row("reference", status="ok", time_ms=40.0, peak_bytes=40 * 2**30, tflops=1.0),
        _timing_row("triton", status="ok", time_ms=10.0, peak_bytes=2**30, tflops=4.0, error_vs_float32=1e-6),
        _timing_row("triton", dtype="bfloat16", side=256, mode="forward", precision=None, status="ok", time_ms=5.0,
                    tflops=450.0),
        _timing_row("triton", dtype="bfloat16", side=64, mode="forward+backward", precision=None, patch_size=3,
                    status="ok", time_ms=5.0, tflops=200.0),
        _timing_row("reference", dtype="bfloat16", side=256, precision=None, status="OOM"),
    ]
    train_step = [_train_row(512, "reference", False, peak=24 * 2**30), _train_row(512, "triton", True, peak=3 * 2**30, t=1.3),
                  _train_row(1024, "triton", True, peak=13 * 2**30), _train_row(512, "triton", False, peak=16 * 2**30),
                  _train_row(1024, "triton", False, status="OOM")]
    accuracy = [dict(backend="triton", mode="bfloat16", side=16, patch_size=3, status="ok",
                     errors={"out": {"fused": 1e-3, "materialised": 2e-3}})]
    saved = {"meta": dict(card="NVIDIA H200", started="today", channels=256, batch=4, wall_s=300.0, last_done="tests",
                          cuda_build={"status": "ok"}, accuracy_value_channels=48, failures=[]),
             "env": [dict(card="NVIDIA H200", torch="2.11", triton="3.6.0", bf16_matmul_tflops=900.0,
                          tf32_matmul_tflops=450.0, fp32_matmul_tflops=60.0)],
             "timing": timing, "tests": {"status": "passed", "command": "pytest", "tests": 3, "failures": 0},
             "contextual": [], "train_step": train_step, "accuracy": accuracy, "timing_more": []}
    (tmp_path / "saved.json").write_text(json.dumps(saved))
    out = tmp_path / "out"
    _gpu_check("--from-results", str(tmp_path / "saved.json"), "--out-dir", str(out))
    targets = json.loads((out / "gpu_check_nvidia-h200.json").read_text())["targets"]
    assert "128^2 float32 tf32x3 fwd+bwd: triton 4.00x the reference's speed (target >= 3): met" in targets
    assert "128^2 float32 tf32x3 fwd+bwd: triton peak memory 0.025x the reference's (target <= 0.05): met" in targets
    assert "256^2 bfloat16 forward: triton 450 TFLOP/s = 50% of the bf16 matmul peak (target >= 50%): met" in targets
    assert ("64^2 3x3 windows forward+backward: triton 200 TFLOP/s = 22% of the bf16 matmul peak (target >= 30%): "
            "NOT met" in targets)
    assert "512 px train step: triton + checkpointing total 0.19x the materialised one's (target < 0.25): met" in targets
    assert "512 px train step: triton total 0.69x the materialised one's (target < 0.25): NOT met" in targets
    assert "1024 px train step: triton + checkpointing total 15.0 GiB (target: fits in 80 GiB): met" in targets
    assert not any("1024 px train step: triton total" in t for t in targets)  # OOM: no total to judge

    text = (out / "gpu_check_nvidia-h200.md").read_text()
    assert "# correspondence_warp GPU check: NVIDIA H200" in text and "bf16 matmul 900 TFLOP/s" in text
    assert "**Partial report**, written after tests" in text
    assert ("| float32 (tf32x3) | 3 | 128^2 | 1x1 | forward+backward | triton | 10.000 | 1024 | 4.0 | 4.00x | "
            "1.0e-06 | ok |") in text
    assert "| bfloat16 | 3 | 256^2 | 1x1 | forward+backward | reference |  |  |  |  |  | OOM |" in text
    assert "## CUDA build\n\n**ok**" in text and "**passed** (3 tests, 0 failures" in text
    assert "| 512 | triton | on | ok | 3.00 | 5.00 | 1.30 |" in text and "| 1024 | triton | off | OOM | OOM | - | - |" in text
    assert "| triton | bfloat16 | 16^2, 3x3 patches | 1.00e-03 | 2.00e-03 |" in text
    assert "Cv=48, batch 1" in text


def test_shard_plugin_keeps_every_nth(tmp_path):
    (tmp_path / "test_ten.py").write_text("import pytest\n\n\n@pytest.mark.parametrize('i', range(10))\n"
                                          "def test_i(i):\n    pass\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = dict(os.environ, GPU_CHECK_SHARD="1/3", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                                           os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "benchmarks.gpu_check", "-p", "no:cacheprovider",
                           "--collect-only", "-q", "test_ten.py"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [line for line in proc.stdout.splitlines() if "::" in line] == [f"test_ten.py::test_i[{i}]" for i in (1, 4, 7)]


@pytest.mark.slow
def test_dry_run_writes_every_phase_headline_first(tmp_path):
    _gpu_check("--dry-run", "--out-dir", str(tmp_path), "--deadline-s", "300", timeout=600)
    report = json.loads((tmp_path / "gpu_check_cpu-dry-run.json").read_text())
    assert report["meta"]["last_done"] == "all phases"
    assert report["tests"]["status"].startswith("passed (dry run: collected only")
    for phase in ("env", "timing", "contextual", "train_step", "accuracy"):
        assert report[phase] and not any(r["status"].startswith("not run") for r in report[phase] if "status" in r)
    impls = [r["impl"] for r in report["timing"]]
    assert impls[0] == "triton" and impls.index("cuda") > max(i for i, x in enumerate(impls) if x == "triton")
    assert min(i for i, x in enumerate(impls) if x in PEERS) > max(i for i, x in enumerate(impls) if x == "cuda")
    text = (tmp_path / "gpu_check_cpu-dry-run.md").read_text()
    sections = ["## Targets", "## Headline timing", "## CUDA build", "## Tests", "## contextual_loss",
                "## Training step", "## Accuracy against float64", "## More timing"]
    assert [text.index(s) for s in sections] == sorted(text.index(s) for s in sections)
    assert (tmp_path / "gpu_check_junit.xml").exists() and (tmp_path / "gpu_check.log").exists()
