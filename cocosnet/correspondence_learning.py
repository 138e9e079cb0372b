"""CoCosNet's correspondence network trained alone, on pseudo-exemplar pairs whose correspondence is known.

A pair is one scene seen twice: the input is a crop of it (its label map; its photo is the ground
truth), the exemplar the same photo under another crop, a flip and a small affine warp (rotation,
scale, shift). Every input position then has a known place in the exemplar, so the learned
correspondence is measured, not only looked at (`evaluate`):

- end-point error (EPE): the distance, in feature cells (size/4 grid), between each input cell's
  best match in the exemplar (`cocos_kernels.correspondence_argmax` on the network's theta and phi,
  3x3 patches as the network matches) and where that cell really is, over the cells that lie
  inside the exemplar;
- label accuracy: the exemplar's one-hot label map warped onto the input by the network's softmax
  (its `warp_mask`), argmax, against the input's label map on the same grid (cells labelled
  "other" not counted); also on real retrieval pairs (an input and a different photo as exemplar,
  the pairing list of data/cocosnet-samples), where no geometric ground truth exists.

Scenes: the ADE20K photos of data/cocosnet-samples (`training/` to train, `validation/` held out for
the metrics) and synthetic scenes with ADE20K's 151 classes (`cocosnet.data.synthetic`). Losses, the
reference's weights by default: domain alignment (`--novgg_featpair` 10: L1 between the normalised
features of the input map and of its photo), the warp loss (`warp_w` 100, as DeepFashion's
`--warp_self_w`: L1 between the warped exemplar and the ground truth) and the cycle loss
(`--warp_cycle_w` 1, CelebA-HQ edge's: the warp sent back vs the exemplar). No VGG, no generator.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import cocos_kernels as ck
from cocosnet.models import NoVGGCorrespondence
from cocosnet.models.blocks import init_weights
from cocosnet.options import parse

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "data" / "cocosnet-samples"
SCENE_MARGIN = 1.25  # scenes are this much larger than a view: crops have room to move
OTHER = 0  # ADE20K's "other": no label to get right


@dataclass
class Scene:
    label: torch.Tensor  # (1, L, L) class ids, float (grid_sample takes floats; nearest keeps them whole)
    photo: torch.Tensor  # (3, L, L) in [-1, 1]


@dataclass
class Pair:
    """A batch of input/exemplar pairs, and where each input cell lies in its exemplar (cell units)."""
    label: torch.Tensor      # (B, 1, H, W) int64 class ids of the input
    image: torch.Tensor      # (B, 3, H, W) the input's photo (the ground truth)
    ref: torch.Tensor        # (B, 3, H, W) the exemplar
    label_ref: torch.Tensor  # (B, 1, H, W) the exemplar's class ids
    target: torch.Tensor | None = None  # (B, h, w, 2) (row, column) of each input cell in the exemplar


def scene_from(label: Image.Image, photo: Image.Image, side: int) -> Scene:
    """Shorter side resized to `side` (maps nearest, photos bicubic), centre crop side x side."""
    w, h = photo.size
    scale = side / min(w, h)
    size = (max(side, round(w * scale)), max(side, round(h * scale)))
    box = ((size[0] - side) // 2, (size[1] - side) // 2, (size[0] - side) // 2 + side, (size[1] - side) // 2 + side)
    label = np.asarray(label.resize(size, Image.NEAREST).crop(box), dtype=np.float32)
    photo = np.asarray(photo.convert("RGB").resize(size, Image.BICUBIC).crop(box), dtype=np.float32)
    return Scene(torch.from_numpy(label)[None], torch.from_numpy(photo / 127.5 - 1).permute(2, 0, 1).contiguous())


def ade20k_scenes(root: Path, split: str, side: int) -> dict[str, Scene]:
    """{file name: Scene} of `root`/ade20k/`split`/ADE_*.jpg with the .png label map beside each."""
    folder = root / "ade20k" / split
    photos = sorted(folder.glob("ADE_*.jpg"))
    if not photos:
        raise FileNotFoundError(f"no ADE_*.jpg in {folder} (the data/cocosnet-samples layout)")
    return {p.name: scene_from(Image.open(p.with_suffix(".png")), Image.open(p), side) for p in photos}


def synthetic_scenes(opt, count: int, side: int) -> list[Scene]:
    from cocosnet.data.synthetic import SyntheticDataset

    argv = ["--dataset_mode", "synthetic", "--label_nc", str(opt.label_nc), "--contain_dontcare_label",
            "--synthetic_size", str(count), "--synthetic_mixes", str(max(1, count // 4)), "--crop_size", str(opt.crop_size),
            "--load_size", str(side), "--preprocess_mode", "resize_and_crop", "--seed", str(opt.seed)]
    data = SyntheticDataset(parse(argv, mode="train"))
    return [scene_from(*data.scene(i), side) for i in range(count)]


def _rotation(angle: float, scale: float, flip: bool) -> torch.Tensor:
    c, s = math.cos(angle) * scale, math.sin(angle) * scale
    return torch.tensor([[c, -s], [s, c]], dtype=torch.float64) @ torch.diag(torch.tensor([-1.0 if flip else 1.0, 1.0],
                                                                                          dtype=torch.float64))


def draw_views(rng: random.Random, size: int, side: int, max_angle: float = 15.0, max_zoom: float = 0.15,
               max_shift: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine maps (2, 3) of the input and the exemplar view: view coordinates -> scene coordinates
    (normalised, align_corners=False). The input: a crop of the scene, maybe flipped; the exemplar:
    another crop near it, maybe flipped, rotated and zoomed."""
    crop = size / side
    room = 1 - crop
    centre = torch.tensor([rng.uniform(-room, room), rng.uniform(-room, room)], dtype=torch.float64)
    input_view = torch.cat([_rotation(0.0, crop, rng.random() < 0.5), centre[:, None]], 1)
    angle = math.radians(rng.uniform(-max_angle, max_angle))
    zoom = crop * rng.uniform(1 - max_zoom, 1 + max_zoom)
    shift = torch.tensor([rng.uniform(-max_shift, max_shift), rng.uniform(-max_shift, max_shift)], dtype=torch.float64)
    exemplar_view = torch.cat([_rotation(angle, zoom, rng.random() < 0.5), (centre + shift)[:, None]], 1)
    return input_view, exemplar_view


def _look(scenes: list[Scene], views: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    grid = F.affine_grid(views.float(), [len(scenes), 1, size, size], align_corners=False)
    photos = F.grid_sample(torch.stack([s.photo for s in scenes]), grid, mode="bilinear", align_corners=False)
    labels = F.grid_sample(torch.stack([s.label for s in scenes]), grid, mode="nearest", align_corners=False)
    return labels.round().long(), photos  # outside the scene: class 0 ("other"), grey


def cell_centres(h: int, w: int) -> torch.Tensor:
    """(h, w, 2) normalised (x, y) of the cell centres (align_corners=False)."""
    y = (torch.arange(h, dtype=torch.float64) * 2 + 1) / h - 1
    x = (torch.arange(w, dtype=torch.float64) * 2 + 1) / w - 1
    return torch.stack(torch.meshgrid(x, y, indexing="xy"), -1)


def make_pair(scenes: list[Scene], views: list[tuple[torch.Tensor, torch.Tensor]], size: int, down: int) -> Pair:
    """The pairs of scenes[i] seen through views[i] = (input map, exemplar map), with their cell correspondence."""
    inputs = torch.stack([v[0] for v in views])
    exemplars = torch.stack([v[1] for v in views])
    label, image = _look(scenes, inputs, size)
    label_ref, ref = _look(scenes, exemplars, size)
    h = w = size // down
    xy = cell_centres(h, w).reshape(1, -1, 2)
    in_scene = xy @ inputs[:, :, :2].transpose(1, 2) + inputs[:, None, :, 2]
    in_exemplar = torch.linalg.solve(exemplars[:, :, :2], (in_scene - exemplars[:, None, :, 2]).transpose(1, 2)).transpose(1, 2)
    col = (in_exemplar[..., 0] + 1) * w / 2 - 0.5
    row = (in_exemplar[..., 1] + 1) * h / 2 - 0.5
    target = torch.stack([row, col], -1).reshape(len(scenes), h, w, 2)
    return Pair(label, image, ref, label_ref, target)


def one_hot(label: torch.Tensor, n: int) -> torch.Tensor:
    return F.one_hot(label[:, 0], n).permute(0, 3, 1, 2).float()


def build_options(size: int = 128, width: int = 16, backend: str = "auto", seed: int = 0, cycle_w: float = 1.0,
                  domain_w: float = 10.0):
    """The ADE20K recipe's correspondence network (150 classes + "other", --maskmix, 3x3 patches) at `width`."""
    return parse(["--recipe", "ade20k", "--ngf", str(width), "--crop_size", str(size), "--load_size", str(size),
                  "--backend", backend, "--gpu_ids", "-1", "--seed", str(seed), "--warp_cycle_w", str(cycle_w),
                  "--novgg_featpair", str(domain_w)], mode="train")


def build_network(opt) -> NoVGGCorrespondence:
    net = NoVGGCorrespondence(opt)
    init_weights(net, opt.init_type, opt.init_variance)
    return net


def losses(net: NoVGGCorrespondence, pair: Pair, warp_w: float) -> dict[str, torch.Tensor]:
    """The training losses of one batch: domain alignment, warp (vs the ground truth), cycle."""
    n = net.opt.semantic_nc
    out = net(pair.ref, pair.image, one_hot(pair.label, n), one_hot(pair.label_ref, n))
    result = {"domain": out["loss_novgg_featpair"], "warp": F.l1_loss(out["warp_out"], pair.image) * warp_w}
    if net.opt.warp_cycle_w > 0:
        result["cycle"] = F.l1_loss(out["warp_cycle"], F.avg_pool2d(pair.ref, net.down)) * net.opt.warp_cycle_w
    return result


@torch.no_grad()
def evaluate(net: NoVGGCorrespondence, pairs: list[Pair], retrieval: list[Pair]) -> dict[str, float]:
    """EPE (cells) and label accuracy on pseudo pairs, label accuracy on retrieval pairs; in eval mode."""
    training = net.training
    net.eval()
    n, opt = net.opt.semantic_nc, net.opt
    errors, hits = [], {"pseudo": [], "retrieval": []}
    for kind, batches in (("pseudo", pairs), ("retrieval", retrieval)):
        for pair in batches:
            theta, phi, _ = net.features(pair.ref, None, one_hot(pair.label, n), one_hot(pair.label_ref, n))
            grid = theta.shape[2:]
            labels = [F.interpolate(x.float(), size=grid, mode="nearest").long() for x in (pair.label, pair.label_ref)]
            warp_mask = net.warp(theta, phi, one_hot(labels[1], n), temperature=0.01)  # as the network's warp_mask
            labelled = labels[0][:, 0] != OTHER
            hits[kind].append((warp_mask.argmax(1) == labels[0][:, 0])[labelled].double())
            if pair.target is None:
                continue
            index, _ = ck.correspondence_argmax(theta, phi, center="channel" if opt.PONO_C else "spatial",
                                                patch_size=opt.match_kernel, backend=net.backend)
            found = torch.stack([index // grid[1], index % grid[1]], -1).double()
            inside = ((pair.target > -0.5) & (pair.target < torch.tensor(grid) - 0.5)).all(-1)
            errors.append((found - pair.target).norm(dim=-1)[inside])
    net.train(training)
    return {"epe": torch.cat(errors).mean().item(), "label_accuracy": torch.cat(hits["pseudo"]).mean().item(),
            "retrieval_label_accuracy": torch.cat(hits["retrieval"]).mean().item()}


@dataclass
class Data:
    """Training scenes (real and synthetic) and the fixed evaluation pairs."""
    train: list[Scene]
    synthetic: list[Scene]
    eval_pairs: list[Pair]
    retrieval: list[Pair]


def load_data(opt, root: Path = DEFAULT_DATA, synthetic: int = 32, eval_views: int = 4, batch: int = 4) -> Data:
    """Real ADE20K training scenes, `synthetic` synthetic ones, and the held-out pairs: `eval_views` fixed
    pseudo pairs of every validation photo, plus the pairing list's (validation input, training exemplar) pairs."""
    size, down = opt.crop_size, opt.down
    side = round(size * SCENE_MARGIN)
    train = ade20k_scenes(root, "training", side)
    held_out = ade20k_scenes(root, "validation", side)
    rng = random.Random(f"{opt.seed}/eval")
    items = [(s, draw_views(rng, size, side)) for s in held_out.values() for _ in range(eval_views)]
    eval_pairs = [make_pair([s for s, _ in items[i:i + batch]], [v for _, v in items[i:i + batch]], size, down)
                  for i in range(0, len(items), batch)]
    identity = torch.cat([_rotation(0.0, size / side, False), torch.zeros(2, 1, dtype=torch.float64)], 1)
    retrieval = []
    for line in (root / "lists" / "ade20k_ref_test.txt").read_text().split():
        key, ref = line.split(",")[:2]
        label, image = _look([held_out[key]], identity[None], size)
        label_ref, photo = _look([train[ref]], identity[None], size)
        retrieval.append(Pair(label, image, photo, label_ref))
    return Data(list(train.values()), synthetic_scenes(opt, synthetic, side) if synthetic else [], eval_pairs, retrieval)


def training_batch(data: Data, rng: random.Random, size: int, down: int, batch: int, synthetic_fraction: float) -> Pair:
    side = round(size * SCENE_MARGIN)
    scenes = [rng.choice(data.synthetic if data.synthetic and rng.random() < synthetic_fraction else data.train)
              for _ in range(batch)]
    return make_pair(scenes, [draw_views(rng, size, side) for _ in scenes], size, down)


def train(net: NoVGGCorrespondence, data: Data, steps: int, batch: int = 4, lr: float = 5e-4, warp_w: float = 100.0,
          synthetic_fraction: float = 0.5, eval_every: int | None = 0, seed: int = 0, progress=None) -> dict:
    """`steps` Adam steps (betas (0, 0.9) as the reference's TTUR; eps 1e-8, not its 1e-3, and a larger
    learning rate than its 1e-4: a run of minutes, not days) on random pairs.

    Returns {"steps": [...], "losses": {name: [...]}, "seconds": [...], "evals": [(step, metrics), ...]}:
    the losses of every step, and `evaluate` at step 0, every `eval_every` steps (0: none between) and at the
    end; none at all with eval_every None.
    `progress(step, losses, metrics)` is called after each step (metrics: `evaluate`'s, or None)."""
    opt = net.opt
    rng = random.Random(f"{seed}/train")
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.0, 0.9))
    net.train()
    history = {"steps": [], "losses": {}, "seconds": [], "evals": []}
    if eval_every is not None:
        history["evals"].append((0, evaluate(net, data.eval_pairs, data.retrieval)))
    start = time.perf_counter()
    for step in range(1, steps + 1):
        pair = training_batch(data, rng, opt.crop_size, net.down, batch, synthetic_fraction)
        terms = losses(net, pair, warp_w)
        optimizer.zero_grad(set_to_none=True)
        sum(terms.values()).backward()
        optimizer.step()
        history["steps"].append(step)
        history["seconds"].append(time.perf_counter() - start)
        for k, v in terms.items():
            history["losses"].setdefault(k, []).append(v.item())
        metrics = None
        if eval_every is not None and (step == steps or (eval_every and step % eval_every == 0)):
            metrics = evaluate(net, data.eval_pairs, data.retrieval)
            history["evals"].append((step, metrics))
        if progress is not None:
            progress(step, {k: v.item() for k, v in terms.items()}, metrics)
    return history
