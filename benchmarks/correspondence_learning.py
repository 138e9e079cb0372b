"""Does CoCosNet's correspondence network learn? A measured run on the CPU, untrained vs trained.

    python -m benchmarks.correspondence_learning                         # the measured run (about 15 min, 2 cores)
    python -m benchmarks.correspondence_learning --steps 40 --eval_every 20   # a quick look
    python -m benchmarks.correspondence_learning --compare_backends --size 256 --steps 5

Trains the correspondence network alone (ADE20K recipe: 151 classes, --maskmix, 3x3 patch
matching; domain alignment, warp and cycle losses, no VGG) on pseudo-exemplar pairs of the ADE20K
training samples and of synthetic scenes, and measures on the held-out validation samples, at step 0
and every --eval_every steps: the end-point error of the argmax correspondence (feature cells) and
the accuracy of the exemplar's label map warped onto the input (see cocosnet.correspondence_learning).
Writes correspondence_learning-<size>px.{json,md,png} (the learning curve) under --out_dir.

--compare_backends trains twice from the same weights on the same batches, with --backend
reference (the materialised matrices) and with the fused backend, and tabulates the losses of every
step: correspondence_learning-backends-<size>px.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import cocos_kernels as ck
from benchmarks.harness import cpu_model
from benchmarks.report import table, write
from cocosnet import correspondence_learning as cl

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
METRICS = {"epe": "EPE (cells, lower is better)", "label_accuracy": "label accuracy, pseudo pairs",
           "retrieval_label_accuracy": "label accuracy, retrieval pairs"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.correspondence_learning",
                                description=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64, help="image side in pixels, a multiple of 32 (default: %(default)s)")
    p.add_argument("--width", type=int, default=8, help="--ngf of the correspondence network (default: %(default)s)")
    p.add_argument("--steps", type=int, default=150, help="training steps (default: %(default)s)")
    p.add_argument("--batch", type=int, default=4, help="pairs per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--warp_w", type=float, default=100.0, help="weight of the warp loss (default: %(default)s)")
    p.add_argument("--cycle_w", type=float, default=1.0, help="weight of the cycle loss (default: %(default)s)")
    p.add_argument("--synthetic", type=int, default=32, help="synthetic scenes besides the real ones (default: %(default)s)")
    p.add_argument("--synthetic_fraction", type=float, default=0.5,
                   help="share of training pairs drawn from the synthetic scenes (default: %(default)s)")
    p.add_argument("--eval_every", type=int, default=25, help="evaluate every this many steps (default: %(default)s)")
    p.add_argument("--backend", choices=ck.backend_names(), default="auto",
                   help="cocos_kernels backend of the warps (default: %(default)s)")
    p.add_argument("--compare_backends", action="store_true",
                   help="train with --backend reference and with --backend, tabulate the losses per step")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the pairs (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: %(default)s)")
    p.add_argument("--data", type=Path, default=cl.DEFAULT_DATA, help="the samples folder (default: data/cocosnet-samples)")
    p.add_argument("--out_dir", type=Path, default=RESULTS, help="where the results go (default: benchmarks/results)")
    p.add_argument("--checkpoint", type=Path, help="also save the trained network's state dict here (torch.save)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.size % 32 or args.size < 64:
        p.error(f"--size must be a multiple of 32, at least 64, got {args.size}")
    for name in ("width", "steps", "batch", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.width % 8:
        p.error(f"--width must be a multiple of 8, got {args.width}")
    if not 0 <= args.synthetic_fraction <= 1:
        p.error(f"--synthetic_fraction must lie in [0, 1], got {args.synthetic_fraction}")
    return args


def run(args, backend: str, evaluate: bool) -> tuple[dict, torch.nn.Module]:
    """One training run from the seed's weights; returns (history, network)."""
    opt = cl.build_options(size=args.size, width=args.width, backend=backend, seed=args.seed, cycle_w=args.cycle_w)
    torch.manual_seed(args.seed)
    net = cl.build_network(opt)
    data = cl.load_data(opt, args.data, synthetic=args.synthetic, batch=args.batch)
    with tqdm(total=args.steps, desc=f"training ({backend})", unit="step") as bar:
        def progress(step, losses, metrics):
            bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()})
            bar.update()
            if metrics is not None:
                bar.write(f"step {step}: " + ", ".join(f"{METRICS[k]} {v:.3f}" for k, v in metrics.items()))
        history = cl.train(net, data, args.steps, batch=args.batch, lr=args.lr, warp_w=args.warp_w,
                           synthetic_fraction=args.synthetic_fraction, eval_every=args.eval_every if evaluate else None,
                           seed=args.seed, progress=progress)
    return history, net


def recorded(args) -> dict:
    """The options as the JSON records them: paths inside the repository relative to it."""
    return {k: str(v.resolve().relative_to(ROOT)) if isinstance(v, Path) and v.resolve().is_relative_to(ROOT) else v
            for k, v in vars(args).items()}


def header(args, started: str) -> str:
    command = shlex.join(["python", "-m", "benchmarks.correspondence_learning", *sys.argv[1:]])
    return (f"`{command}` -- {started} UTC, {cpu_model()}, {args.threads} thread(s), "
            f"torch {torch.__version__}; {args.size} px (a {args.size // 4}x{args.size // 4} feature grid), "
            f"width {args.width}, batch {args.batch}, Adam lr {args.lr}, warp loss x{args.warp_w}, cycle x{args.cycle_w}, "
            f"domain x10, {args.synthetic} synthetic scenes ({args.synthetic_fraction:.0%} of the pairs)")


def plot(history: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = history["steps"]
    for name, values in history["losses"].items():
        window = max(1, len(values) // 15)
        smooth = torch.tensor(values).unfold(0, window, 1).mean(1).tolist() if len(values) >= window else values
        axes[0].plot(steps[window - 1:], smooth, label=f"{name} (mean of {window})")
    axes[0].set(xlabel="step", ylabel="training loss", yscale="log", title="training losses")
    axes[0].legend()
    at = [s for s, _ in history["evals"]]
    axes[1].plot(at, [m["epe"] for _, m in history["evals"]], "o-")
    axes[1].set(xlabel="step", ylabel="cells", title="held out: end-point error of the argmax match")
    for key in ("label_accuracy", "retrieval_label_accuracy"):
        axes[2].plot(at, [m[key] for _, m in history["evals"]], "o-", label=METRICS[key])
    axes[2].set(xlabel="step", ylabel="accuracy", title="held out: warped exemplar labels vs the input's")
    axes[2].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def learning_report(args, history: dict, started: str) -> str:
    (_, before), (last, after) = history["evals"][0], history["evals"][-1]
    lines = [f"# Correspondence learning on the CPU: {args.size} px, {args.steps} steps", "", header(args, started), "",
             f"Training took {history['seconds'][-1] / 60:.1f} min ({history['seconds'][-1] / args.steps:.2f} s/step, "
             "evaluations excluded). Held out: the ADE20K validation samples, 4 pseudo pairs each (EPE, label "
             "accuracy), and the pairing list's 6 (validation input, training exemplar) pairs.", "",
             *table(["metric", "untrained (step 0)", f"trained (step {last})"],
                    [[METRICS[k], f"{before[k]:.3f}", f"{after[k]:.3f}"] for k in METRICS])]
    lines += ["", "Learning curve:", "",
              *table(["step", *METRICS.values()], [[s, *(f"{m[k]:.3f}" for k in METRICS)] for s, m in history["evals"]])]
    return "\n".join(lines) + "\n"


def backends_report(args, histories: dict, started: str) -> str:
    (ref_name, ref), (fused_name, fused) = histories.items()
    lines = [f"# Correspondence learning, {ref_name} vs {fused_name} backend: {args.size} px, first {args.steps} steps", "",
             header(args, started), "", "The same weights and batches; float32. Relative difference of each loss term.", ""]
    worst, rows = 0.0, []
    for i, step in enumerate(ref["steps"]):
        for term in ref["losses"]:
            a, b = ref["losses"][term][i], fused["losses"][term][i]
            diff = abs(a - b) / max(abs(a), 1e-30)
            worst = max(worst, diff)
            rows.append([step, term, f"{a:.7g}", f"{b:.7g}", f"{diff:.1e}"])
    lines += table(["step", "term", ref_name, fused_name, "relative difference"], rows)
    seconds = {name: h["seconds"][-1] / len(h["steps"]) for name, h in histories.items()}
    lines += ["", f"Largest relative difference: {worst:.1e}. Seconds per step: "
              + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    fused = ck.select(args.backend, torch.device("cpu"), torch.float32).name
    if args.compare_backends:
        histories = {name: run(args, name, evaluate=False)[0] for name in ("reference", fused)}
        stem = args.out_dir / f"correspondence_learning-backends-{args.size}px"
        text = backends_report(args, histories, started)
        write(stem, {"args": recorded(args), "histories": histories}, text)
        print(text)
        return
    start = time.perf_counter()
    history, net = run(args, fused, evaluate=True)
    stem = args.out_dir / f"correspondence_learning-{args.size}px"
    text = learning_report(args, history, started)
    write(stem, {"args": recorded(args), "history": history}, text)
    plot(history, stem.with_suffix(".png"), f"CoCosNet correspondence learning, {args.size} px, CPU")
    if args.checkpoint is not None:
        args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), args.checkpoint)
    print(text)
    print(f"wrote {stem}.{{json,md,png}} in {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
