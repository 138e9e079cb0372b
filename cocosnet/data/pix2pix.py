"""The reference's paired dataset: input map, photo and an exemplar (retrieved or pseudo).

Each item is a dict with the reference's keys:
  label      the input map (class indices (1, H, W) int64, or a float multi-channel map)
  image      the ground-truth photo, (3, H, W) float in [-1, 1]
  ref        the exemplar photo, (3, H, W) float in [-1, 1]
  label_ref  the exemplar's map, same kind as label
  self_ref   float scalar: 1 where the exemplar is the pseudo-exemplar of the input, else 0
             (the reference stores a (3, H, W) tensor of that value; one number carries it)
  path       the photo's path

Exemplars as the reference picks them: with probability `real_reference_probability` (always
at test) the retrieval list's entry for the photo -- its last ("hard") entry with probability
`hard_reference_probability`, else its first ("easy") -- otherwise a pseudo pair: the same photo
and map re-transformed with freshly drawn crop and flip (DeepFashion with --video_like: a photo
of the same person in another pose, from the self-pair list).

Randomness: every item draws from its own `random.Random` seeded by (opt.seed, epoch, index)
(`set_epoch` sets the epoch), so an item is a pure function of those three numbers.
"""
from __future__ import annotations

import os
import random

import torch
from PIL import Image
from torch.utils.data import Dataset

from cocosnet.data.transforms import get_params, to_class_tensor, to_image_tensor


def read_ref_list(path: str, phase: str) -> dict[str, list[str]]:
    """A retrieval list: `key,ref1,...,refK` per line -> {key: [easy, hard]} (train) or all refs (test).

    Backslash paths (DeepFashion's lists) are turned into slashes.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"exemplar list {path!r} not found: the reference reads <ref_dir>/<dataset>_ref.txt for training "
            "and <dataset>_ref_test.txt for testing (lines 'key,ref1,...,refK'); pass --ref_dir")
    refs = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            items = [s.strip().replace("\\", "/") for s in line.strip().split(",")]
            if not items[0]:
                continue
            if len(items) < 2:
                raise ValueError(f"{path}:{n}: expected 'key,ref1,...', got {line.strip()!r}")
            refs[items[0]] = items[1:] if phase == "test" else [items[1], items[-1]]
    return refs


def read_id_list(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"file list {path!r} not found (one item per line, as the reference's "
                                "train.txt / val.txt)")
    with open(path) as f:
        return [s.strip().replace("\\", "/") for s in f if s.strip()]


class Pix2pixDataset(Dataset):
    """Base class; subclasses define the paths, the list name and how a map is loaded."""

    list_name = ""  # the retrieval lists are <list_name>_ref.txt / <list_name>_ref_test.txt

    def __init__(self, opt):
        self.opt = opt
        self.epoch = 0
        self.label_paths, self.image_paths = self.get_paths(opt)
        if not self.image_paths:
            raise ValueError(f"dataroot {opt.dataroot!r} holds no {opt.phase} items for dataset_mode "
                             f"{opt.dataset_mode!r}")
        max_size = getattr(opt, "max_dataset_size", None)
        if max_size:
            self.label_paths, self.image_paths = self.label_paths[:max_size], self.image_paths[:max_size]
        test = opt.phase == "test"
        self.real_reference_probability = 1.0 if test else opt.real_reference_probability
        self.hard_reference_probability = 0.0 if test else opt.hard_reference_probability
        self.ref_dict = self.get_ref(opt)

    # ---- what a subclass provides
    def get_paths(self, opt) -> tuple[list[str], list[str]]:
        raise NotImplementedError

    def load_label(self, path: str, rng: random.Random):
        """The map at `path`, transformed with freshly drawn parameters -> (tensor, params).

        Here a class-index png; the edge and pose datasets build theirs from annotation files."""
        return class_label(self.opt, path, rng)

    def ref_key(self, image_path: str) -> str:
        return os.path.basename(image_path)

    def ref_image_path(self, image_path: str, ref: str) -> str:
        return os.path.join(os.path.dirname(image_path), ref)

    def image_to_label_path(self, image_path: str) -> str:
        return os.path.splitext(image_path)[0] + ".png"

    def self_pair(self, key: str, rng: random.Random):
        """A real pseudo-exemplar photo path for the item, or None for the re-transformed photo."""
        return None

    # ---- shared
    @classmethod
    def file_loader(cls, opt) -> Pix2pixDataset:
        """An instance without file lists, for `load_label` / `image_to_label_path` on single files."""
        self = cls.__new__(cls)
        self.opt, self.epoch = opt, 0
        return self

    def ref_list_path(self, opt) -> str:
        suffix = "_test" if opt.phase == "test" else ""
        return os.path.join(opt.ref_dir, f"{self.list_name}_ref{suffix}.txt")

    def get_ref(self, opt) -> dict[str, list[str]]:
        if self.real_reference_probability <= 0:
            return {}  # never retrieves (DeepFashion's recipe): no list needed
        return read_ref_list(self.ref_list_path(opt), opt.phase)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def item_rng(self, index: int) -> random.Random:
        return random.Random(f"{getattr(self.opt, 'seed', 0)}/{self.epoch}/{index}")

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> dict:
        rng = self.item_rng(index)
        image_path = self.image_paths[index]
        label, params = self.load_label(self.label_paths[index], rng)
        image = Image.open(image_path).convert("RGB")
        image_tensor = to_image_tensor(self.opt, params, image)

        r = rng.random()
        key = self.ref_key(image_path)
        if r < self.real_reference_probability:
            if key not in self.ref_dict:
                raise KeyError(f"{key!r} has no line in the exemplar list {self.ref_list_path(self.opt)!r}")
            refs = self.ref_dict[key]
            ref_path = self.ref_image_path(image_path, refs[-1] if r < self.hard_reference_probability else refs[0])
            self_ref = 0.0
        else:
            ref_path = self.self_pair(key, rng)
            self_ref = 1.0
        if ref_path is None:  # pseudo pair: the same photo and map, another crop and flip
            label_ref, ref_params = self.load_label(self.label_paths[index], rng)
            ref_image = image
        else:
            label_ref, ref_params = self.load_label(self.image_to_label_path(ref_path), rng)
            ref_image = Image.open(ref_path).convert("RGB")
        return {"label": label, "image": image_tensor, "ref": to_image_tensor(self.opt, ref_params, ref_image),
                "label_ref": label_ref, "self_ref": torch.tensor(self_ref), "path": image_path}


def class_label(opt, path: str, rng: random.Random):
    """A class-index png transformed like its photo; 255 ("unknown") becomes label_nc."""
    img = Image.open(path)
    if img.mode not in ("L", "P"):
        raise ValueError(f"label map {path!r} has mode {img.mode!r}; expected a single-channel class-index png")
    params = get_params(opt, img.size, rng)
    label = to_class_tensor(opt, params, img)
    label[label == 255] = opt.label_nc
    return label, params
