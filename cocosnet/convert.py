"""Reference checkpoints (microsoft/CoCosNet `<epoch>_net_{G,Corr,D}.pth`) -> our modules, strictly.

Our modules keep the reference's module, parameter and buffer names (spectral norm's
`weight_orig`, `weight_u`, `weight_v` included), so a reference state dict is ours except that the
discriminator's never-called segmentation decoder `discriminator_<i>.dec.*` is not built here: its
keys are dropped (listed in the report).
Anything else that does not match (a missing or extra key, a shape) raises with the keys and a hint
at the options that set those shapes -- never the reference loader's silent strict=False retry.

    python -m cocosnet.convert --checkpoint_dir checkpoints/ade20k --which_epoch latest --recipe ade20k \\
        --out converted/ade20k
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch
from torch import nn

from .checkpoint import load

NETWORKS = {"G": "netG", "Corr": "netCorr", "D": "netD"}  # file label -> Pix2PixModel.net key
_UNUSED = re.compile(r"^discriminator_\d+\.dec\.")
SHAPE_HINT = ("shapes are set by --ngf/--ndf, --label_nc/--contain_dontcare_label (semantic_nc), --maskmix, "
              "--adaptor_kernel (4 for the released CelebA-HQ and DeepFashion models), --use_coordconv, "
              "--use_attention, --n_layers_D/--num_D and --warp_stride: use the recipe the checkpoint was trained with")


def from_reference(state_dict: dict) -> tuple[dict, list[str]]:
    """A reference state dict without the unused decoder's keys; returns (state dict, dropped keys)."""
    dropped = [key for key in state_dict if _UNUSED.match(key)]
    return {k: v for k, v in state_dict.items() if not _UNUSED.match(k)}, dropped


def load_reference(net: nn.Module, state_dict: dict, name: str = "network") -> list[str]:
    """Load a reference state dict into `net` strictly (ValueError on any mismatch); returns the dropped keys."""
    converted, dropped = from_reference(state_dict)
    own = net.state_dict()
    missing = sorted(set(own) - set(converted))
    unexpected = sorted(set(converted) - set(own))
    shapes = [f"{k}: checkpoint {tuple(converted[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(converted)) if converted[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        lines = [f"{name}: the reference checkpoint does not match the model built from these options"]
        for title, items in (("missing from the checkpoint", missing), ("not in the model", unexpected),
                             ("shape mismatch", shapes)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
        lines.append("  " + SHAPE_HINT)
        raise ValueError("\n".join(lines))
    net.load_state_dict(converted, strict=True)
    return dropped


def checkpoint_path(checkpoint_dir: str, epoch: str, label: str) -> str:
    return os.path.join(checkpoint_dir, f"{epoch}_net_{label}.pth")


def build_networks(opt, with_D: bool) -> nn.ModuleDict:
    """The networks a reference checkpoint set holds, built from `opt`, keyed as Pix2PixModel.net."""
    from .models import MultiscaleDiscriminator, NoVGGCorrespondence, SPADEGenerator

    nets = {"netG": SPADEGenerator(opt), "netCorr": NoVGGCorrespondence(opt)}
    if with_D:
        nets["netD"] = MultiscaleDiscriminator(opt)
    return nn.ModuleDict(nets)


def load_reference_checkpoints(nets: nn.ModuleDict, checkpoint_dir: str, epoch: str = "latest") -> dict:
    """Load `<epoch>_net_{G,Corr[,D]}.pth` into `nets` (e.g. `Pix2PixModel.net`): one file per network it holds.

    FileNotFoundError names a missing file; ValueError lists mismatching keys. Returns {label: dropped keys}.
    """
    report = {}
    for label, key in NETWORKS.items():
        if key not in nets:
            continue
        path = checkpoint_path(checkpoint_dir, epoch, label)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"reference checkpoint {path!r} not found (expected <epoch>_net_{label}.pth "
                                    f"in --checkpoint_dir, with --which_epoch {epoch!r})")
        state = load(path, f"reference checkpoint {path!r}")
        report[label] = load_reference(nets[key], state, f"{label} ({path})")
    return report


def main(argv=None) -> None:
    from .options import parse

    p = argparse.ArgumentParser(description="Convert reference CoCosNet checkpoints to cocosnet's key names, "
                                "checking them by loading strictly into networks built from the model options "
                                "given after these (--recipe, --ngf, --label_nc, ...; see python -m cocosnet.train --help).")
    p.add_argument("--checkpoint_dir", required=True, help="folder with the reference's <epoch>_net_{G,Corr,D}.pth")
    p.add_argument("--which_epoch", default="latest", help="epoch prefix of the files")
    p.add_argument("--out", required=True, help="output folder: <epoch>_net_{G,Corr[,D]}.pth in our keys + options.json")
    p.add_argument("--with_D", action="store_true", help="also convert the discriminator (to resume training)")
    args, rest = p.parse_known_args(argv)
    opt = parse(rest, mode="train")  # the train parser holds every option that shapes G, Corr and D
    nets = build_networks(opt, args.with_D)
    report = load_reference_checkpoints(nets, args.checkpoint_dir, args.which_epoch)
    os.makedirs(args.out, exist_ok=True)
    for label, key in NETWORKS.items():
        if key in nets:
            torch.save(nets[key].state_dict(), checkpoint_path(args.out, args.which_epoch, label))
    options = {k: v for k, v in vars(opt).items() if isinstance(v, (str, int, float, bool, type(None)))}
    with open(os.path.join(args.out, "options.json"), "w") as f:
        json.dump(options, f, indent=1, sort_keys=True)
    for label, dropped in report.items():
        extra = f" (dropped {len(dropped)} keys of the unused decoder)" if dropped else ""
        print(f"{label}: loaded strictly{extra} -> {checkpoint_path(args.out, args.which_epoch, label)}")


if __name__ == "__main__":
    main(sys.argv[1:])
