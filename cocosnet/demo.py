"""CoCosNet end to end on the CPU in a few minutes: learn a correspondence, translate real ADE20K pairs.

    python -m cocosnet.demo                       # 30 + 4 steps at 64 px, 3 pairs: outputs/cocosnet_demo.png
    python -m cocosnet.demo --corr_steps 1 --steps 1 --pairs 1       # the quickest run
    python -m cocosnet.demo --corr_checkpoint corr.pt                 # a network from benchmarks.correspondence_learning

1. Correspondence learning (`cocosnet.correspondence_learning`): the correspondence network alone,
   --corr_steps steps on pseudo-exemplar pairs of the ADE20K training samples and synthetic scenes
   (domain alignment, warp and cycle losses), measured before and after on the held-out validation
   samples (end-point error of the argmax match, accuracy of the warped exemplar labels); or a
   network trained that way loaded from --corr_checkpoint.
2. Training: `cocosnet.trainer.Trainer` with the real Pix2PixModel (the ADE20K recipe: 150
   classes + "other", that correspondence network, SPADE generator, discriminators, every loss) at a
   tiny width, for --steps iterations on the synthetic dataset (generated on the fly; no download)
   with a randomly initialised VGG-19 for the losses (no VGG weights can be downloaded here).
3. Inference: `cocosnet.infer` with the checkpoint just written, on real ADE20K sample pairs
   (input label map of a validation image, exemplar photo of a training image) from the pairing
   list of data/cocosnet-samples.
4. One PNG grid, a row per pair: input label map | exemplar | warped exemplar | output | ground truth.

The warped exemplar is the learned correspondence (softmax of cosine similarities at temperature
0.01 through cocos_kernels) moving the exemplar's colours onto the input's layout: a short run
on a dozen photos, so a coarse one. The generator has had a few steps on synthetic scenes
and trains nothing: the generated output is not a photo.
"""
from __future__ import annotations

import argparse
import logging
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import cocos_kernels as ck
from cocos_kernels.demo import draw_grid, palette

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "data" / "cocosnet-samples"
RUN_NAME = "demo"
TITLES = ["input\nlabel map", "exemplar\nphoto", "warped exemplar\n(learned)", "generated\n(untrained)", "ground\ntruth"]
MIN_SIZE, MAX_SIZE = 64, 512


def _positive(name: str):
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}")
        return value
    return check


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cocosnet.demo", description=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=_positive("--steps"), default=4,
                   help="training iterations (batch of 1) on the synthetic data (default: %(default)s)")
    p.add_argument("--corr_steps", type=_positive("--corr_steps"), default=30,
                   help="correspondence-learning steps (batch of 4 pseudo-exemplar pairs) before the full model's "
                        "(default: %(default)s)")
    p.add_argument("--corr_checkpoint", type=Path,
                   help="instead, the correspondence network's state dict from python -m benchmarks.correspondence_learning "
                        "--checkpoint PATH (with the same --width)")
    p.add_argument("--size", type=int, default=64,
                   help=f"image side in pixels for training and inference, a multiple of 32 from {MIN_SIZE} to "
                        f"{MAX_SIZE}; the correspondence runs on a size/4 grid (default: %(default)s)")
    p.add_argument("--width", type=int, default=8,
                   help="network width: --ngf of the generator and correspondence network, --ndf of the "
                        "discriminator, a multiple of 8 (default: %(default)s)")
    p.add_argument("--pairs", type=_positive("--pairs"), default=3,
                   help="how many ADE20K input/exemplar pairs to translate, from the top of the pairing list "
                        "(one grid row each) (default: %(default)s)")
    p.add_argument("--backend", choices=ck.backend_names(), default="auto",
                   help="cocos_kernels backend of every HW x HW computation (correspondence, attention, "
                        "contextual loss); 'auto' picks the fused CPU kernel (built on first use), "
                        "'reference' materialises the matrices (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the synthetic data (default: %(default)s)")
    p.add_argument("--threads", type=_positive("--threads"), default=torch.get_num_threads(),
                   help="torch CPU threads (torch.set_num_threads) (default: %(default)s, this machine's)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="the ADE20K samples: <data>/ade20k/{training,validation}/ADE_*.{jpg,png} and the pairing "
                        "list <data>/lists/ade20k_ref_test.txt (default: %(default)s)")
    p.add_argument("--work_dir", type=Path, default=Path("outputs/cocosnet_demo"),
                   help=f"where the training run ({RUN_NAME}/: checkpoints, samples) and the per-pair outputs "
                        "go (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("outputs/cocosnet_demo.png"),
                   help="the PNG grid, one row per pair (default: %(default)s)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.size % 32 or not MIN_SIZE <= args.size <= MAX_SIZE:
        p.error(f"--size must be a multiple of 32 from {MIN_SIZE} to {MAX_SIZE} (the generator starts at size/32), "
                f"got {args.size}")
    if args.width < 8 or args.width % 8:
        p.error(f"--width must be a multiple of 8 (the attention blocks use width*4/8 channels), got {args.width}")
    if args.corr_checkpoint is not None and not args.corr_checkpoint.is_file():
        p.error(f"--corr_checkpoint {str(args.corr_checkpoint)!r}: no such file")
    if args.out.suffix.lower() != ".png":
        p.error(f"--out must be a .png file, got {str(args.out)!r}")
    try:
        ck.select(args.backend, torch.device("cpu"), torch.float32)
    except ValueError as e:
        p.error(f"--backend {args.backend} cannot run on the CPU here: {e}")
    pairs_file = args.data / "lists" / "ade20k_ref_test.txt"
    if not pairs_file.is_file():
        p.error(f"--data {str(args.data)!r}: no pairing list {pairs_file} (lay the folder out as data/cocosnet-samples)")
    pairs = read_pairs(args.data)
    if args.pairs > len(pairs):
        p.error(f"--pairs must be at most {len(pairs)} (the pairs in {pairs_file}), got {args.pairs}")
    args.pair_list = pairs[: args.pairs]
    missing = [str(f) for pair in args.pair_list for f in (*pair, pair[1].with_suffix(".png")) if not f.is_file()]
    if missing:
        p.error(f"--data {str(args.data)!r}: files of the pairing list are missing: {', '.join(missing)}")
    return args


def read_pairs(root: Path) -> list[tuple[Path, Path]]:
    """(input label map .png, exemplar photo .jpg) paths from the ADE20K pairing list, as cocosnet.infer takes them."""
    pairs = []
    for line in (root / "lists" / "ade20k_ref_test.txt").read_text().splitlines():
        if not line.strip():
            continue
        key, ref = line.split(",")[:2]
        pairs.append(((root / "ade20k" / "validation" / key).with_suffix(".png"), root / "ade20k" / "training" / ref))
    return pairs


def network_args(args) -> list[str]:
    """The options that fix the networks' shapes, shared by training and inference."""
    return ["--recipe", "ade20k", "--gpu_ids", "-1", "--backend", args.backend, "--ngf", str(args.width),
            "--crop_size", str(args.size), "--checkpoints_dir", str(args.work_dir), "--name", RUN_NAME,
            "--seed", str(args.seed)]


def learn_correspondence(args) -> tuple[dict, dict | None]:
    """The correspondence network's state dict, and its held-out metrics before and after learning
    (None when loaded from --corr_checkpoint)."""
    from cocosnet import correspondence_learning as cl

    if args.corr_checkpoint is not None:
        return torch.load(args.corr_checkpoint, map_location="cpu", weights_only=True), None
    opt = cl.build_options(size=args.size, width=args.width, backend=args.backend, seed=args.seed)
    torch.manual_seed(args.seed)
    net = cl.build_network(opt)
    data = cl.load_data(opt, args.data, synthetic=16, eval_views=2)
    history = cl.train(net, data, args.corr_steps, eval_every=0, seed=args.seed)
    return net.state_dict(), {"untrained": history["evals"][0][1], "trained": history["evals"][-1][1]}


def train(args, correspondence: dict) -> None:
    from cocosnet.options import parse
    from cocosnet.train import default_model
    from cocosnet.trainer import Trainer

    def model(opt):
        built = default_model(opt)
        built.net["netCorr"].load_state_dict(correspondence)
        return built

    # Synthetic scenes with ADE20K's classes (150 + "other"), so the weights fit the ADE20K samples.
    argv = network_args(args) + [
        "--dataset_mode", "synthetic", "--label_nc", "150", "--contain_dontcare_label",
        "--load_size", str(args.size + args.size // 8), "--preprocess_mode", "resize_and_crop",
        "--synthetic_size", str(max(4, args.steps)), "--synthetic_mixes", "2", "--batchSize", "1", "--nThreads", "0",
        "--vgg_random_init", "--ndf", str(args.width), "--niter", "1", "--niter_decay", "0",
        "--max_steps", str(args.steps), "--print_freq", "1", "--display_freq", str(args.steps),
        "--save_latest_freq", str(args.steps), "--keep_checkpoints", "1", "--no_tensorboard"]
    Trainer(parse(argv, mode="train"), model).train()


def infer(args, label_path: Path, exemplar_path: Path) -> tuple[Path, Path]:
    from cocosnet import infer as cocosnet_infer

    stem = args.work_dir / "pairs" / label_path.stem
    cocosnet_infer.main(network_args(args) + ["--load_size", str(args.size), "--input", str(label_path),
                                              "--exemplar", str(exemplar_path), "--out", f"{stem}.png"])
    return Path(f"{stem}.png"), Path(f"{stem}_warp.png")


def row(args, label_path: Path, exemplar_path: Path, output: Path, warp: Path) -> list[Image.Image]:
    """The tiles of one pair, resized as the test-time transform resizes them (maps nearest, photos bicubic)."""
    size = (args.size, args.size)
    label = np.array(Image.open(label_path).convert("L").resize(size, Image.NEAREST))
    photo = lambda path: Image.open(path).convert("RGB").resize(size, Image.BICUBIC)  # noqa: E731
    truth = label_path.with_suffix(".jpg")
    return [Image.fromarray(palette(256)[label]), photo(exemplar_path), Image.open(warp).convert("RGB"),
            Image.open(output).convert("RGB"),
            photo(truth) if truth.is_file() else Image.new("RGB", size, "lightgray")]


def with_note(sheet: Image.Image, note: str, size: int) -> Image.Image:
    """The sheet with `note` wrapped in a footer under it."""
    font_size = max(8, size // 16)
    font = ImageFont.load_default(size=font_size)
    lines = textwrap.wrap(note, width=max(20, int(sheet.width / (0.6 * font_size))))
    line_h = int(1.3 * font_size)
    out = Image.new("RGB", (sheet.width, sheet.height + line_h * len(lines) + font_size // 2), "white")
    out.paste(sheet, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((max(2, size // 64), sheet.height + i * line_h), line, fill="black", font=font)
    return out


def main(argv=None) -> Path:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    backend = ck.select(args.backend, torch.device("cpu"), torch.float32)
    print(f"cocosnet.demo: backend {args.backend} -> {backend.name} ({'fused' if backend.fused else 'materialised'}), "
          f"CPU, {args.threads} thread(s), {args.size}x{args.size} px, width {args.width}")
    times = {}

    start = time.perf_counter()
    correspondence, metrics = learn_correspondence(args)
    times["correspondence"] = time.perf_counter() - start
    if metrics is None:
        learned = f"the correspondence network from {args.corr_checkpoint}"
    else:
        before, after = metrics["untrained"], metrics["trained"]
        learned = (f"the correspondence network after {args.corr_steps} step(s) of correspondence learning (held-out "
                   f"end-point error {before['epe']:.2f} -> {after['epe']:.2f} cells, warped-label accuracy "
                   f"{before['label_accuracy']:.0%} -> {after['label_accuracy']:.0%} on pseudo pairs, "
                   f"{before['retrieval_label_accuracy']:.0%} -> {after['retrieval_label_accuracy']:.0%} on real pairs)")
        print(f"cocosnet.demo: learned the correspondence in {times['correspondence']:.1f} s: {learned}")

    start = time.perf_counter()
    train(args, correspondence)
    times["train"] = time.perf_counter() - start
    print(f"cocosnet.demo: trained {args.steps} step(s) on synthetic data in {times['train']:.1f} s "
          f"({times['train'] / args.steps:.1f} s/step, model build and checkpoint included)")

    start = time.perf_counter()
    rows = []
    for label_path, exemplar_path in args.pair_list:
        output, warp = infer(args, label_path, exemplar_path)
        rows.append(row(args, label_path, exemplar_path, output, warp))
    times["inference"] = time.perf_counter() - start

    start = time.perf_counter()
    note = (f"Warped exemplar: {learned}, moving the exemplar's colours onto the input's layout (coarse: a short "
            f"run on a dozen photos). Generator: untrained ({args.steps} step(s) on synthetic data, random "
            f"VGG), so the generated output is not a photo.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with_note(draw_grid(rows, TITLES, args.size), note, args.size).save(args.out)
    times["grid"] = time.perf_counter() - start

    print(f"cocosnet.demo: NOTE: {note}")
    print("cocosnet.demo: times: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items())
          + f", total {sum(times.values()):.1f} s (backend {backend.name})")
    print(f"cocosnet.demo: wrote {args.out} ({len(rows)} pair(s): {', '.join(t.replace(chr(10), ' ') for t in TITLES)}); "
          f"checkpoint in {args.work_dir / RUN_NAME}")
    return args.out


if __name__ == "__main__":
    main()
