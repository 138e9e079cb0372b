"""The benchmarks' one timer: `time_call(fn, device)`, on the standard timer of each device.

CPU: `torch.utils.benchmark.Timer.blocked_autorange`. It warms up while it picks how many calls
one timed block makes (enough that the timer's overhead is negligible, one for a call slower than
`min_run_time_s`), then times blocks until `min_run_time_s` has passed; it runs at torch's current
thread count (the Timer's own default is one thread). `min_run_time_s=0` times one call
(`Timer.timeit(1)`), for a caller that has warmed up already and can afford no more (the GPU
check's dry run on the Triton interpreter). `timer` replaces its clock (e.g.
time.process_time: the process's CPU time, which other processes' load does not inflate).

CUDA: `triton.testing.do_bench`. It synchronises the device, flushes the L2 cache before each call,
warms up for a quarter of `min_run_time_s` (at least a millisecond), then times calls with CUDA
events for `min_run_time_s`, resetting the gradients of `grads` outside the timed region.

A call slower than `min_run_time_s` is made about twice on the CPU and about eight times on CUDA
(do_bench's estimate of five calls, its warm-up and one timed call): callers with a time cap
estimate the per-call time first (benchmarks/run.py).
"""
from __future__ import annotations

import timeit


def time_call(fn, device: str, min_run_time_s: float = 0.2, grads=(), timer=timeit.default_timer) -> dict:
    """Seconds per call of fn(): {"median_s", "p20_s", "p80_s", "times_s" (every sample)}.

    `grads`: tensors whose .grad is set to None before each call (so backward passes do not
    accumulate into them); on the CPU inside the timed call (the Timer times whole blocks)."""
    import numpy
    import torch

    grads = list(grads)
    if device == "cuda":
        import triton.testing

        rep_ms = max(1.0, min_run_time_s * 1e3)
        times = [t / 1e3 for t in triton.testing.do_bench(fn, warmup=max(1.0, rep_ms / 4), rep=rep_ms,
                                                          grad_to_none=grads or None, return_mode="all")]
    else:
        from torch.utils.benchmark import Timer

        def call():
            for t in grads:
                t.grad = None
            fn()
        t = Timer("call()", globals={"call": call}, timer=timer, num_threads=torch.get_num_threads())
        measurement = t.blocked_autorange(min_run_time=min_run_time_s) if min_run_time_s > 0 else t.timeit(1)
        times = list(measurement.times)
    median, p20, p80 = numpy.quantile(times, [0.5, 0.2, 0.8]).tolist()
    return {"median_s": median, "p20_s": p20, "p80_s": p80, "times_s": times}
