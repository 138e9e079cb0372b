"""Time and peak memory of contextual_loss: materialised reference vs the fused CPU backend.

Runs the loss between two feature maps of one VGG-19 layer at the sizes CoCosNet's contextual
loss sees them, unpooled: relu2_2 (C=128, side/2), relu3_2 (C=256, side/4), relu4_2 (C=512,
side/8) and relu5_2 (C=512, side/16) of an image of side `--image-sizes` (256 by default; 512 and
1024 on request: the reference needs N^2 floats per matrix, 16 GiB each at relu2_2 of 512px).
Features are non-negative (post-ReLU); "forward" runs under torch.no_grad(), "forward+backward"
makes x (the generated image's features) require grad, as in training where the exemplar's
features are detached, and back-propagates a fixed random (B,) gradient.

Every config runs in a fresh worker process through `benchmarks.bench_correspondence_warp.measure`
(see that module and benchmarks/README.md for how time and peak memory are measured and what
OOM and error mean). Writes a JSON file and a markdown table under --out-dir.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import sys
from pathlib import Path

from benchmarks.bench_correspondence_warp import MODES, SEED, _cpu_model, _mem_total_gib, comparison_markdown, measure

BANDWIDTH = 0.1
# layer -> (channels, image side / feature side)
LAYERS = {"relu2_2": (128, 2), "relu3_2": (256, 4), "relu4_2": (512, 8), "relu5_2": (512, 16)}


def _make_step(config: dict, side: int):
    """Inputs of this config at `side`, and a function running one call of its impl and mode."""
    import torch

    import cocos_kernels as ck

    gen = torch.Generator().manual_seed(SEED)
    B, C = config["batch"], config["channels"]
    x = torch.randn(B, C, side, side, generator=gen).relu_()
    y = torch.randn(B, C, side, side, generator=gen).relu_()
    impl, center = config["impl"], config.get("center", "channel")

    if config["mode"] == "forward":
        def step():
            with torch.no_grad():
                ck.contextual_loss(x, y, BANDWIDTH, center=center, backend=impl)
        return step

    grad = torch.rand(B, generator=gen)
    x.requires_grad_(True)

    def step():
        x.grad = None
        ck.contextual_loss(x, y, BANDWIDTH, center=center, backend=impl).backward(grad)
    return step


def markdown(meta: dict, results: list[dict]) -> str:
    by_key = {(r["impl"], r["image_size"], r["layer"], r["mode"]): r for r in results}
    groups = []
    for size in meta["image_sizes"]:
        for layer in meta["layers"]:
            channels, down = LAYERS[layer]
            side = size // down
            for mode in meta["modes"]:
                groups.append(([f"{size}px", layer, str(side), str(side * side), str(channels), mode],
                               {i: by_key[(i, size, layer, mode)] for i in meta["impls"]}))
    setup = [
        f"- torch {meta['torch_version']}, {meta['threads']} threads, float32",
        f"- Shapes: batch {meta['batch']}, x and y both the unpooled VGG-19 features of the layer "
        f"(N = side^2 positions, C channels), bandwidth {BANDWIDTH}, center {meta['center']!r}",
    ]
    return comparison_markdown(meta, "contextual_loss", setup, ["image", "layer", "side", "N", "C", "mode"],
                               groups, lambda r: f"{r['image_size']}px {r['layer']} {r['mode']}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_contextual_loss",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Quick check: python -m benchmarks.bench_contextual_loss --layers relu4_2 relu5_2 --repeats 2",
    )
    p.add_argument("--image-sizes", type=int, nargs="+", default=[256],
                   help="image sides whose VGG-19 feature sizes are run (default: %(default)s)")
    p.add_argument("--layers", nargs="+", choices=list(LAYERS), default=list(LAYERS),
                   help="VGG-19 layers (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default: %(default)s)")
    p.add_argument("--center", choices=["channel", "spatial"], default="channel",
                   help="centring mode (default: %(default)s)")
    p.add_argument("--impls", nargs="+", default=["reference", "cpu"],
                   help="backends to compare; the first is the baseline of the ratios (default: %(default)s)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="what one timed call runs (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed calls per config; 0: measure memory only (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before the timed ones (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    p.add_argument("--memory-cap-gb", type=float, default=20.0,
                   help="RLIMIT_DATA of each worker process in GiB (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="seconds one config may run before it is recorded as an error (default: %(default)s)")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="where the .json and .md files go (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    import torch
    from tqdm import tqdm

    threads = args.threads or torch.get_num_threads()
    cpu_model = _cpu_model()
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_model": cpu_model, "logical_cpus": os.cpu_count(), "mem_total_gib": _mem_total_gib(),
        "platform": platform.platform(), "torch_version": torch.__version__, "threads": threads,
        "command": shlex.join(["python", "-m", "benchmarks.bench_contextual_loss",
                               *(sys.argv[1:] if argv is None else argv)]),
        "image_sizes": args.image_sizes, "layers": args.layers, "impls": args.impls, "modes": args.modes,
        "batch": args.batch, "center": args.center, "repeats": args.repeats, "warmup": args.warmup,
        "memory_cap_gb": args.memory_cap_gb, "bandwidth": BANDWIDTH, "dtype": "float32",
    }
    configs = [
        {"op": "contextual_loss", "impl": impl, "image_size": size, "layer": layer,
         "side": size // LAYERS[layer][1], "channels": LAYERS[layer][0], "mode": mode,
         "batch": args.batch, "center": args.center, "repeats": args.repeats, "warmup": args.warmup,
         "threads": threads, "memory_cap_gb": args.memory_cap_gb, "timeout_s": args.timeout}
        for size in args.image_sizes for layer in args.layers for mode in args.modes for impl in args.impls
    ]
    results = []
    with tqdm(configs, desc="configs", unit="config") as bar:
        for config in bar:
            bar.set_postfix_str(f"{config['impl']} {config['image_size']}px {config['layer']} {config['mode']}")
            results.append({"image_size": config["image_size"], "layer": config["layer"], **measure(config)})

    stem = f"contextual_loss-cpu-{re.sub(r'[^a-z0-9]+', '-', cpu_model.lower()).strip('-')}-{threads}t"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown(meta, results)
    paths = [args.out_dir / f"{stem}.{ext}" for ext in ("json", "md")]
    paths[0].write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    paths[1].write_text(table)
    print(table)
    print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
