"""Peak memory and time of one CoCosNet training step: materialised (--backend reference) vs fused.

    python -m benchmarks.bench_train_step --trace                   # 256/512/1024 px in a minute, no memory used
    python -m benchmarks.bench_train_step --sides 256               # measured: reference vs cpu, each +/- checkpointing
    python -m benchmarks.bench_train_step --device cuda --impls reference triton --sides 512 1024

One step is what `python -m cocosnet.train` does per batch (cocosnet.trainer.Trainer.train_step):
the generator forward with every loss of the ADE20K recipe (151 classes, --maskmix, mask loss,
self-attention in G and D, contextual loss), its backward and Adam update, then the
discriminator's. Batch 1, synthetic scenes at the given side, a randomly initialised VGG-19
(the weights do not change the cost). `impl` is the cocos_kernels backend of every HW x HW
computation: "reference" materialises the matrices as the reference code does, "cpu" / "triton" /
"cuda" are the fused kernels. Each impl runs without and with --activation_checkpointing
(`--checkpointing off on`), which recomputes the residual blocks' activations in the backward.

The step is a steady-state one: Adam's moments exist before it (allocated by a zero-gradient
update that leaves the weights unchanged), as in every step after the first. Two numbers:
`peak` = the most the step allocates above what exists before it; `total` = that plus the
baseline (weights, buffers, Adam's moments), what has to fit on the card.

Measured (default): each (impl, side, checkpointing) runs in a fresh process under a memory cap
through benchmarks.harness.measure (how peak memory and time are measured, what OOM means: see
that module); a config that runs out of memory is recorded as OOM, not a crash. On the CPU the
baseline comes from the traced run (RSS cannot tell the weights from the rest).

Traced (--trace): the step runs on value-less tensors (torch's FakeTensorMode) and every tensor
it allocates is counted, in 512-byte blocks, from its creation until its storage is freed: what
torch.cuda.max_memory_allocated would report for the same step, without the convolution
libraries' workspaces and without the fused kernels' internal buffers (both O(HW), hundreds of
MiB at most at 1024 px), and without allocator fragmentation. No arithmetic runs, so 1024 px
costs seconds on any machine; where a measurement exists, it is the number to trust.
Writes train_step-<cpu-Nc | cuda-card>[-trace].json and .md under --out-dir.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import re
import shlex
import sys
import tempfile
import weakref
from pathlib import Path

from benchmarks import report
from benchmarks.harness import cpu_model, measure, mem_total_gib

MIN_SIDE = 64  # the harness warms a worker up at side 16; the model needs a multiple of 32 and attention
BLOCK = 512  # bytes: the CUDA caching allocator's rounding


def _options(config: dict, side: int):
    from cocosnet.options import parse

    return parse(["--recipe", "ade20k", "--dataset_mode", "synthetic", "--label_nc", "150", "--contain_dontcare_label",
                  "--crop_size", str(side), "--load_size", str(side), "--preprocess_mode", "resize_and_crop",
                  "--batchSize", str(config["batch"]), "--nThreads", "0", "--synthetic_size", str(2 * config["batch"]),
                  "--synthetic_mixes", "1", "--vgg_random_init", "--backend", config["impl"], "--no_tensorboard",
                  *(["--activation_checkpointing"] if config.get("activation_checkpointing") else []),
                  "--checkpoints_dir", tempfile.mkdtemp(prefix="bench_train_step-"),
                  "--gpu_ids", "0" if config["device"] == "cuda" else "-1"], mode="train")


def _allocate_optimizer_state(trainer) -> None:
    """Adam's moments as after a first step, the weights unchanged: a zero gradient moves nothing."""
    import torch

    for optimizer in (trainer.optimizer_G, trainer.optimizer_D):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def make_step(config: dict, side: int):
    """A function running one training step at `side` px with backend config['impl'] (harness API)."""
    import torch

    from cocosnet.models import Pix2PixModel
    from cocosnet.trainer import Trainer

    torch.manual_seed(0)
    trainer = Trainer(_options(config, max(MIN_SIDE, side)), Pix2PixModel)
    _allocate_optimizer_state(trainer)
    batch = next(iter(trainer.loader))

    def step():
        trainer.train_step(batch)
    return step


class _AllocationCounter:
    """Bytes of live tensor storage, and their peak, under a dispatch mode (see `trace`)."""

    def __init__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        counter = self
        self.live, self.now, self.peak = {}, 0, 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        counter.add(t)
                return out
        self.mode = Mode()

    def add(self, t) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self.live:  # a view, or an in-place op's output
            return
        size = -(-storage.nbytes() // BLOCK) * BLOCK
        self.live[key] = (weakref.ref(storage, lambda _, key=key: self._free(key)), size)
        self.now += size
        self.peak = max(self.peak, self.now)

    def _free(self, key) -> None:
        self.now -= self.live.pop(key)[1]


def trace(config: dict, side: int) -> dict:
    """One steady-state step on value-less tensors: {"peak_bytes", "baseline_bytes"} (module docstring)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from cocosnet.models import Pix2PixModel
    from cocosnet.trainer import Trainer

    fake = FakeTensorMode(allow_non_fake_inputs=True)  # the data loader's batch comes in real
    counter = _AllocationCounter()

    def fake_model(opt):
        model = Pix2PixModel(opt)  # real weights first (they do not depend on the side), then value-less copies
        with fake:
            for m in model.modules():
                for group in (m._parameters, m._buffers):
                    for name, t in group.items():
                        if t is None:
                            continue
                        f = fake.from_tensor(t)
                        group[name] = torch.nn.Parameter(f, requires_grad=t.requires_grad) if group is m._parameters else f
                        counter.add(group[name])
        model.to = lambda *args, **kwargs: model  # Trainer moves the model: it is where it should be
        model.check_label_ids = lambda label: None  # needs the values
        return model

    class TracedTrainer(Trainer):
        _finite = staticmethod(lambda t: True)  # needs the values

    if config["impl"] not in ("reference", "cpu"):
        raise ValueError(f"--trace compares 'reference' with 'cpu' (every fused backend allocates the same "
                         f"tensors), got {config['impl']!r}")
    torch.manual_seed(0)
    trainer = TracedTrainer(_options({**config, "device": "cpu"}, max(MIN_SIDE, side)), fake_model)
    batch = next(iter(trainer.loader))
    with fake, counter.mode:
        _allocate_optimizer_state(trainer)
        baseline = counter.peak = counter.now
        trainer.train_step(batch)
    return {"peak_bytes": counter.peak - baseline, "baseline_bytes": baseline}


def _gib(x) -> str:
    return f"{x / 2**30:.2f}"


def total_bytes(r: dict) -> int:
    """A measured config's total: the step's peak plus the weights, buffers and Adam's moments."""
    return r["peak_bytes"] + (r.get("baseline_bytes") or 0)


def label(r: dict) -> str:
    return f"{r['impl']}{' + checkpointing' if r['activation_checkpointing'] else ''}"


def cells(r: dict) -> list:
    ok = r["status"] == "ok"
    total = _gib(total_bytes(r)) if ok and r.get("baseline_bytes") is not None else "-"
    t = f"{r['time_median_s']:.2f}" if ok and r.get("time_median_s") else "-"
    return [r["side"], r["impl"], "on" if r["activation_checkpointing"] else "off", r["status"],
            _gib(r["peak_bytes"]) if ok else r["status"], total, t]


def comparisons(results: list[dict], memory_cap_gb: float) -> list[str]:
    """Each fused config against the materialised step without checkpointing (the reference code's)."""
    lines = []
    by = {(r["side"], r["impl"], r["activation_checkpointing"]): r for r in results}
    for (side, impl, ckpt), r in by.items():
        ref = by.get((side, "reference", False))
        if impl == "reference" and not ckpt or r["status"] != "ok" or ref is None:
            continue
        if ref["status"] == "ok":
            time = (f", {r['time_median_s'] / ref['time_median_s']:.2f}x its time"
                    if r.get("time_median_s") and ref.get("time_median_s") else "")
            lines.append(f"{side} px: {label(r)} needs {total_bytes(r) / total_bytes(ref):.2f}x the materialised "
                         f"step's total ({_gib(total_bytes(r))} vs {_gib(total_bytes(ref))} GiB){time}")
        elif ref["status"] == "OOM":
            lines.append(f"{side} px: the materialised step does not fit in {memory_cap_gb:g} GiB; "
                         f"{label(r)} needs {_gib(total_bytes(r))} GiB in total")
    return lines


def table(results: list[dict]) -> list[str]:
    return ["peak: what the step allocates above what exists before it; total: peak + weights, buffers and "
            "Adam's moments.", "",
            *report.table(["side (px)", "impl", "activation checkpointing", "status", "peak (GiB)", "total (GiB)",
                           "time per step (s)"], [cells(r) for r in results])]


def markdown(meta: dict, results: list[dict]) -> str:
    how = ("traced on value-less tensors (see the module docstring; `cpu` stands for every fused backend, "
           "which allocate the same tensors outside their kernels)" if meta["trace"] else "measured")
    lines = [f"# One CoCosNet training step (ADE20K recipe, batch {meta['batch']}): {meta['device_name']}", "",
             f"`{meta['command']}` -- {meta['date']}, torch {meta['torch_version']}, {how}"
             + ("" if meta["trace"] else f", memory cap {meta['memory_cap_gb']} GiB") + ".", "",
             *table(results), "", *[f"- {x}" for x in comparisons(results, meta["memory_cap_gb"])]]
    lines += [f"- error at {r['side']} px / {r['impl']}: {r['error'][:300]}" for r in results if r["status"] == "error"]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sides", type=int, nargs="+", default=[256, 512, 1024], help="image sides in px (multiples of 32)")
    p.add_argument("--impls", nargs="+", default=["reference", "cpu"], help="cocos_kernels backends to compare")
    p.add_argument("--checkpointing", nargs="+", choices=("off", "on"), default=["off", "on"],
                   help="run each impl without / with --activation_checkpointing")
    p.add_argument("--trace", action="store_true",
                   help="count the allocations of a step on value-less tensors instead of running it (seconds, "
                        "no memory; see the module docstring for what it leaves out)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--min-run-time-s", type=float, default=1.0,
                   help="the timer's budget after the memory step (benchmarks/timing.py; a step slower than it is "
                        "timed once after one warm-up step; 0: memory only)")
    p.add_argument("--memory-cap-gb", type=float, default=24.0,
                   help="memory cap of each worker (RLIMIT_DATA on the CPU, the allocator's fraction on CUDA)")
    p.add_argument("--timeout-s", type=float, default=7200.0, help="wall-clock limit of one config")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    for s in args.sides:
        if s < MIN_SIDE or s % 32:
            p.error(f"--sides: {s} is not a multiple of 32 of at least {MIN_SIDE}")
    if args.trace and (args.device != "cpu" or set(args.impls) - {"reference", "cpu"}):
        p.error("--trace runs on the CPU with --impls reference cpu (every fused backend allocates the same tensors)")

    import torch
    from tqdm import tqdm

    results = []
    with tqdm(list(itertools.product(args.sides, args.impls, args.checkpointing)), desc="train steps",
              unit="config") as bar:
        for side, impl, ckpt in bar:
            bar.set_postfix_str(f"{side} px {impl} checkpointing {ckpt}")
            config = {"op": "train_step", "impl": impl, "side": side, "mode": "forward+backward",
                      "batch": args.batch, "device": args.device, "activation_checkpointing": ckpt == "on"}
            if args.trace:
                r = {k: config[k] for k in ("op", "impl", "side", "mode", "batch", "device")}
                r.update(status="ok", time_median_s=None, **trace(config, side))
            else:
                r = measure({**config, "min_run_time_s": args.min_run_time_s, "memory_cap_gb": args.memory_cap_gb,
                             "timeout_s": args.timeout_s})
                if args.device == "cpu" and impl in ("reference", "cpu"):  # RSS holds no baseline of its own
                    r["baseline_bytes"] = trace(config, side)["baseline_bytes"]
            r["activation_checkpointing"] = ckpt == "on"
            bar.write(report.table(["side", "impl", "ckpt", "status", "peak", "total", "time"], [cells(r)])[-1])
            results.append(r)
    device_name = (torch.cuda.get_device_name(0) if args.device == "cuda"
                   else f"{cpu_model()}, {results[0].get('threads') or torch.get_num_threads()} threads, "
                        f"{mem_total_gib():.0f} GiB")
    meta = {"command": "python -m benchmarks.bench_train_step " + shlex.join(sys.argv[1:] if argv is None else argv),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch_version": torch.__version__, "device_name": device_name, "memory_cap_gb": args.memory_cap_gb,
            "batch": args.batch, "trace": args.trace, "python": platform.python_version()}
    card = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    tag = (f"cuda-{card}" if args.device == "cuda" else f"cpu-{os.cpu_count()}c") + ("-trace" if args.trace else "")
    base = args.out_dir / f"train_step-{tag}"
    report.write(base, {"meta": meta, "results": results}, markdown(meta, results))
    print(f"wrote {base}.json and {base}.md")


if __name__ == "__main__":
    main()
