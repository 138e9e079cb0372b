"""Micro-benchmarks of the CPU paths for regression tracking (pytest-benchmark).

    pytest benchmarks/ --benchmark-only                      # time them
    pytest benchmarks/ --benchmark-only --benchmark-autosave # keep a record to --benchmark-compare later

Not part of the normal test run (`python -m pytest` collects tests/ only). Each case times one
call built by the op's own `make_step` (benchmarks/bench_<op>.py) at a small size, in this
process: for regressions of the same machine, not for the memory figures (benchmarks.run).
"""
import pytest

pytest.importorskip("pytest_benchmark")

from benchmarks import bench_contextual_loss, bench_correspondence_warp  # noqa: E402
from benchmarks.harness import DEFAULT_CONFIG, MODES  # noqa: E402

SIDE = 32


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ["reference", "key_chunked", "cpu"])
def test_correspondence_warp(benchmark, impl, mode):
    config = {**DEFAULT_CONFIG, "impl": impl, "mode": mode, "channels": 64, "value_channels": 3}
    benchmark(bench_correspondence_warp.make_step(config, SIDE))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_contextual_loss(benchmark, impl, mode):
    config = {**DEFAULT_CONFIG, "op": "contextual_loss", "impl": impl, "mode": mode, "channels": 128}
    benchmark(bench_contextual_loss.make_step(config, SIDE))
