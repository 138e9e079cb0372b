"""Translate inputs with exemplars: `python -m cocosnet.infer --input label.png --exemplar photo.jpg --out out.png`.

Writes the output (`out.png`) and the warped exemplar (`out_warp.png`, what the correspondence
network made of the exemplar, upsampled to the output size). With folders, `--input` and
`--exemplar` are paired in sorted order (or one exemplar file serves every input) and `--out` is a
folder receiving `<input stem>.png` and `<input stem>_warp.png`.

What an input is depends on --dataset_mode (as in training):
- ade20k, celebahq, synthetic: a class-index png (celebahq: the all_parts_except_glasses map; its
  glasses mask is found through the CelebAMask-HQ layout);
- celebahqedge, deepfashion: the photo of the dataset layout whose annotation files (part masks,
  pose keypoints) give the input map.
The exemplar is a photo; its own map (used by --maskmix recipes) is `--exemplar_label`, or found
beside it as training finds it (ADE20K: the .png of the same name).

Weights: `<checkpoints_dir>/<name>/<which_epoch>_net_{G,Corr}.pth` -- the reference's released
files or ours (`python -m cocosnet.train` writes the same format). `--random_weights` runs
untrained networks (a smoke test: the output is noise, the warp already shows the matching).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cocosnet.data import DATASETS
from cocosnet.data.transforms import to_image_tensor
from cocosnet.options import build_parser, parse

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def add_infer_options(p):
    g = p.add_argument_group("inference")
    g.add_argument("--input", required=True, help="input map file (or folder), see above")
    g.add_argument("--exemplar", required=True, help="exemplar photo (or folder, paired with --input in sorted order)")
    g.add_argument("--exemplar_label", default=None, help="the exemplar's own map, where it is not found beside it")
    g.add_argument("--out", required=True, help="output png (or folder with folder inputs)")
    g.add_argument("--random_weights", action="store_true",
                   help="do not load weights: untrained networks (smoke tests and demos only)")


def _files(path: str, what: str) -> list[str]:
    p = Path(path)
    if p.is_dir():
        files = sorted(str(f) for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"--{what} folder {path!r} holds no {'/'.join(IMAGE_SUFFIXES)} files")
        return files
    if not p.is_file():
        raise FileNotFoundError(f"--{what} {path!r} does not exist")
    return [path]


def pairs(opt) -> list[tuple[str, str, str]]:
    """(input, exemplar, output stem) triples from --input / --exemplar / --out."""
    inputs, exemplars = _files(opt.input, "input"), _files(opt.exemplar, "exemplar")
    if len(exemplars) == 1:
        exemplars = exemplars * len(inputs)
    if len(exemplars) != len(inputs):
        raise ValueError(f"--exemplar folder has {len(exemplars)} files and --input {len(inputs)}: pair them one "
                         "to one, or give one exemplar file")
    if Path(opt.input).is_dir():
        return [(i, e, str(Path(opt.out) / Path(i).stem)) for i, e in zip(inputs, exemplars)]
    if not opt.out.lower().endswith(".png"):
        raise ValueError(f"--out must be a .png file for a single input, got {opt.out!r}")
    return [(inputs[0], exemplars[0], opt.out[:-4])]


def load_item(opt, loader, input_path: str, exemplar_path: str) -> dict:
    """A batch of one, built as the test-time dataset builds it (no random crop or flip)."""
    rng = random.Random(0)
    label_path = input_path
    if not input_path.lower().endswith(".png"):  # a photo of the dataset layout: its annotations give the map
        label_path = loader.image_to_label_path(input_path)
    label, _ = loader.load_label(label_path, rng)
    ref_label, params = loader.load_label(opt.exemplar_label or loader.image_to_label_path(exemplar_path), rng)
    ref = to_image_tensor(opt, params, Image.open(exemplar_path))
    # The networks do not read 'image' at inference; the exemplar's shape fills the slot.
    return {"label": label[None], "label_ref": ref_label[None], "ref": ref[None], "image": torch.zeros_like(ref)[None],
            "self_ref": torch.zeros(1)}


def save_image(x: torch.Tensor, path: str) -> None:
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    Image.fromarray(np.ascontiguousarray(arr)).save(path)


def parse_args(argv: list[str] | None = None):
    """The test options (with their dataset and recipe defaults, as `cocosnet.options.parse`) + the flags above."""
    argv = sys.argv[1:] if argv is None else argv
    full = build_parser("test")
    add_infer_options(full)
    full.parse_args(argv)  # --help, and errors for unknown or malformed flags
    own = argparse.ArgumentParser(add_help=False)
    add_infer_options(own)
    flags, rest = own.parse_known_args(argv)
    opt = parse(rest, mode="test")
    vars(opt).update(vars(flags))
    return opt


def main(argv: list[str] | None = None) -> None:
    try:
        opt = parse_args(argv)
    except ValueError as e:
        sys.exit(f"python -m cocosnet.infer: error: {e}")
    from cocosnet.convert import load_reference_checkpoints
    from cocosnet.models import Pix2PixModel

    device = torch.device("cuda") if torch.cuda.is_available() and opt.gpu_ids != "-1" else torch.device("cpu")
    try:  # the options, checkpoints or files do not fit: say so, no traceback
        model = Pix2PixModel(opt).to(device).eval()
        if opt.random_weights:
            print("cocosnet.infer: --random_weights: untrained networks, the output is not a translation",
                  file=sys.stderr)
        else:
            load_reference_checkpoints(model.net, os.path.join(opt.checkpoints_dir, opt.name), opt.which_epoch)
        loader = DATASETS[opt.dataset_mode].file_loader(opt)
        jobs = pairs(opt)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"python -m cocosnet.infer: error: {e}")
    os.makedirs(os.path.dirname(jobs[0][2]) or ".", exist_ok=True)
    for input_path, exemplar_path, stem in jobs:
        data = load_item(opt, loader, input_path, exemplar_path)
        out = model(data, mode="inference")
        save_image(out["fake_image"][0], stem + ".png")
        warp = out["warp_out"]
        if warp.shape[-2:] != out["fake_image"].shape[-2:]:
            warp = torch.nn.functional.interpolate(warp, size=out["fake_image"].shape[-2:], mode="nearest")
        save_image(warp[0], stem + "_warp.png")
        print(f"{input_path} + {exemplar_path} -> {stem}.png, {stem}_warp.png")


if __name__ == "__main__":
    main()
