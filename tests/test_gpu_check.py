"""The CPU-checkable parts of benchmarks/gpu_check.py: options, the report and the targets.

(The whole script on CPU, `python benchmarks/gpu_check.py --dry-run`, takes ~30 s: not run here.)
"""
from benchmarks import gpu_check


def _timing_row(impl, dtype="float32", side=128, mode="forward+backward", **fields):
    return dict(impl=impl, dtype=dtype, side=side, mode=mode, value_channels=3, batch=4, channels=256, **fields)


def test_defaults_depend_on_the_dry_run():
    args = gpu_check._parser().parse_args([])
    assert args.sides is None and not args.dry_run and args.budget_s == 300.0
    assert gpu_check.DEFAULTS["sides"] == ([64, 128, 256], [4, 6])


def test_targets_and_markdown():
    timing = [
        _timing_row("reference", status="ok", time_ms=40.0, peak_bytes=40 * 2**30, tflops=1.0),
        _timing_row("triton", status="ok", time_ms=10.0, peak_bytes=2**30, tflops=4.0, error_vs_float32=1e-6),
        _timing_row("reference", side=256, status="OOM"),
        _timing_row("triton", dtype="bfloat16", side=256, mode="forward", status="ok", time_ms=5.0, tflops=450.0),
    ]
    targets = gpu_check._targets(timing, bf16_rate=900.0)
    assert any("peak memory 0.025x" in t and "met" in t for t in targets)
    assert any("4.00x faster" in t and ": met" in t for t in targets)
    assert any("256^2 reference: OOM" in t for t in targets)
    assert any("50% of the card's bf16 matmul rate" in t and ": met" in t for t in targets)
    meta = dict(card="NVIDIA H100 80GB HBM3", date="today", torch="2", triton="3", bf16_matmul_tflops=900.0,
                channels=256, batch=4, wall_s=300.0)
    accuracy = [dict(backend="cuda", mode="float16", side=16, status="ok",
                     errors={n: {"fused": 1e-3, "materialised": 2e-3} for n in gpu_check.ERROR_FACTOR}),
                dict(backend="triton", mode="bfloat16", side=16, status="skipped: reason")]
    contextual = [
        dict(part="accuracy", backend="triton", mode="float32", side=16, channels=64, status="ok",
             errors={n: {"fused": 3e-6, "materialised": 4e-6} for n in ("loss", "grad x", "grad y")}),
        dict(part="timing", impl="reference", image=512, layer="relu2_2", channels=128, side=256, status="OOM"),
        dict(part="timing", impl="triton", image=512, layer="relu2_2", channels=128, side=256, status="ok",
             time_ms=2500.0, peak_bytes=2**26, tflops=55.0),
    ]
    meta["cuda_build"] = {"status": "ok", "seconds": 80.0}
    text = gpu_check.markdown(meta, {"command": "pytest", "status": "passed"}, accuracy, timing, targets, contextual)
    assert "# correspondence_warp GPU check: NVIDIA H100 80GB HBM3" in text
    assert "## CUDA build\n\n**ok** (80 s)" in text
    assert "| float32 | 3 | 128^2 | forward+backward | triton | 10.000 | 1024 | 4.0 | 4.00x | 1.0e-06 | ok |" in text
    assert "| cuda | float16 | 16^2 | 1.00e-03 | 2.00e-03 |" in text and "skipped: reason" in text
    assert "| triton | float32 | 16^2 | 3.00e-06 | 4.00e-06 |" in text
    assert "| 512 | relu2_2 | 128 | 256^2 | reference |  |  |  |  | OOM |" in text
    assert "| 512 | relu2_2 | 128 | 256^2 | triton | 2500.0 | 64 | 55.0 |  | ok |" in text


def test_contextual_layers_are_the_vgg19_sizes():
    assert gpu_check.CONTEXTUAL_LAYERS == {"relu2_2": (128, 2), "relu3_2": (256, 4), "relu4_2": (512, 8),
                                           "relu5_2": (512, 16)}
    assert gpu_check.DEFAULTS["contextual_images"][0] == [256, 512, 1024]
    assert "cuda" in gpu_check.FUSED_GPU and "triton" in gpu_check.FUSED_GPU


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
    assert gpu_check.TRAIN_STEP_CONFIGS["gpu"][:2] == ((512, "reference", False), (512, "fused", True))


def test_partial_report_says_what_did_not_run():
    assert gpu_check._parser().parse_args([]).deadline_s == 540.0  # under the device tool's 600 s per command
    meta = dict(card="NVIDIA H200", date="today", torch="2", triton="3", bf16_matmul_tflops=None, channels=256,
                batch=4, wall_s=541.0, phases_done="timing", not_run=["contextual", "train_step"])
    text = gpu_check.markdown(meta, {"command": "pytest", "status": "passed"}, [], [], ["(not measured)"])
    assert "**Partial report**, written after the timing phase" in text
    assert "Not run (past the --deadline-s): contextual, train_step." in text
