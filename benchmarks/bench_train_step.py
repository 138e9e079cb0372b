"""Peak memory and time of one CoCosNet training step: materialised (--backend reference) vs fused.

    python -m benchmarks.bench_train_step                           # 256/512/1024 px, reference vs cpu
    python -m benchmarks.bench_train_step --sides 256 --impls reference cpu
    python -m benchmarks.bench_train_step --device cuda --impls reference triton --memory-cap-gb 80

One step is what `python -m cocosnet.train` does per batch (cocosnet.trainer.Trainer.train_step):
the generator forward with every loss of the ADE20K recipe (151 classes, --maskmix, mask loss,
self-attention in G and D, contextual loss), its backward and Adam update, then the
discriminator's. Batch 1, synthetic scenes at the given side, a randomly initialised VGG-19
(the weights do not change the cost). `impl` is the cocos_kernels backend of every HW x HW
computation: "reference" materialises the matrices as the reference code does, "cpu" / "triton"
are the fused kernels.

Each (impl, side) runs in a fresh process under a memory cap through benchmarks.harness.measure
(how peak memory and time are measured, what OOM means: see that module); the first step of a
process is the memory call, so the peak includes Adam's state being allocated, for both impls
alike. A config that runs out of memory is recorded as OOM, not a crash. Writes
train_step-<device tag>.json and .md under --out-dir.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import cpu_model, measure, mem_total_gib

MIN_SIDE = 64  # the harness warms a worker up at side 16; the model needs a multiple of 32 and attention


def make_step(config: dict, side: int):
    """A function running one training step at `side` px with backend config['impl'] (harness API)."""
    import torch

    from cocosnet.models import Pix2PixModel
    from cocosnet.options import parse
    from cocosnet.trainer import Trainer

    side = max(MIN_SIDE, side)
    run_dir = tempfile.mkdtemp(prefix="bench_train_step-")
    opt = parse(["--recipe", "ade20k", "--dataset_mode", "synthetic", "--label_nc", "150", "--contain_dontcare_label",
                 "--crop_size", str(side),
                 "--load_size", str(side), "--preprocess_mode", "resize_and_crop", "--batchSize", str(config["batch"]),
                 "--nThreads", "0", "--synthetic_size", str(2 * config["batch"]), "--synthetic_mixes", "1",
                 "--vgg_random_init", "--backend", config["impl"], "--no_tensorboard",
                 "--checkpoints_dir", run_dir, "--gpu_ids", "0" if config["device"] == "cuda" else "-1"], mode="train")
    torch.manual_seed(0)
    trainer = Trainer(opt, Pix2PixModel)
    batch = next(iter(trainer.loader))

    def step():
        trainer.train_step(batch)
    return step


def _row(r: dict) -> str:
    peak = f"{r['peak_bytes'] / 2**30:.2f}" if r["status"] == "ok" else r["status"]
    t = f"{r['time_median_s']:.1f}" if r["status"] == "ok" and r["time_median_s"] else "-"
    return f"| {r['side']} | {r['impl']} | {r['status']} | {peak} | {t} |"


def markdown(meta: dict, results: list[dict]) -> str:
    lines = [f"# One CoCosNet training step (ADE20K recipe, batch {meta['batch']}): {meta['device_name']}", "",
             f"`{meta['command']}` -- {meta['date']}, torch {meta['torch_version']}, memory cap "
             f"{meta['memory_cap_gb']} GiB.", "",
             "| side (px) | impl | status | peak memory (GiB) | time per step (s) |", "|---|---|---|---|---|"]
    lines += [_row(r) for r in results]
    by = {(r["side"], r["impl"]): r for r in results}
    ratios = []
    for side in sorted({r["side"] for r in results}):
        ref, fused = by.get((side, "reference")), [by[k] for k in by if k[0] == side and k[1] != "reference"]
        for f in fused:
            if ref and ref["status"] == "ok" and f["status"] == "ok":
                ratios.append(f"{side} px: {f['impl']} needs {f['peak_bytes'] / ref['peak_bytes']:.2f}x the "
                              f"materialised peak, {f['time_median_s'] / ref['time_median_s']:.2f}x its time")
            elif ref and ref["status"] == "OOM" and f["status"] == "ok":
                ratios.append(f"{side} px: the materialised step does not fit in {meta['memory_cap_gb']} GiB; "
                              f"{f['impl']} needs {f['peak_bytes'] / 2**30:.2f} GiB")
    if ratios:
        lines += ["", *[f"- {x}" for x in ratios]]
    errors = [r for r in results if r["status"] == "error"]
    lines += ["", *[f"- error at {r['side']} px / {r['impl']}: {r['error'][:300]}" for r in errors]]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sides", type=int, nargs="+", default=[256, 512, 1024], help="image sides in px (multiples of 32)")
    p.add_argument("--impls", nargs="+", default=["reference", "cpu"], help="cocos_kernels backends to compare")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="timed steps after the memory step")
    p.add_argument("--memory-cap-gb", type=float, default=24.0,
                   help="memory cap of each worker (RLIMIT_DATA on the CPU, the allocator's fraction on CUDA)")
    p.add_argument("--timeout-s", type=float, default=7200.0, help="wall-clock limit of one config")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    for s in args.sides:
        if s < MIN_SIDE or s % 32:
            raise SystemExit(f"--sides: {s} is not a multiple of 32 of at least {MIN_SIDE}")

    import torch
    results = []
    for side in args.sides:
        for impl in args.impls:
            r = measure({"op": "train_step", "impl": impl, "side": side, "mode": "forward+backward",
                         "batch": args.batch, "device": args.device, "repeats": args.repeats, "warmup": 0,
                         "memory_cap_gb": args.memory_cap_gb, "timeout_s": args.timeout_s})
            print(_row(r), flush=True)
            results.append(r)
    device_name = (torch.cuda.get_device_name(0) if args.device == "cuda"
                   else f"{cpu_model()}, {results[0].get('threads') or torch.get_num_threads()} threads, "
                        f"{mem_total_gib():.0f} GiB")
    meta = {"command": "python -m benchmarks.bench_train_step " + shlex.join(sys.argv[1:] if argv is None else argv),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch_version": torch.__version__, "device_name": device_name, "memory_cap_gb": args.memory_cap_gb,
            "batch": args.batch, "python": platform.python_version()}
    tag = "cuda" if args.device == "cuda" else f"cpu-{os.cpu_count()}c"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    base = args.out_dir / f"train_step-{tag}"
    base.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    base.with_suffix(".md").write_text(markdown(meta, results))
    print(f"wrote {base}.json and {base}.md")


if __name__ == "__main__":
    main()
