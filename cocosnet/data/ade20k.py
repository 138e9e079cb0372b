"""ADE20K in the reference layout: ADEChallengeData2016/images/{training,validation}/ADE_*.jpg with
each annotation png beside its jpg; 150 classes + 0 ("other"), one-hot channel 0 carrying no mask
loss (label_nc 150 with contain_dontcare_label: 151 channels)."""
from __future__ import annotations

import os

from cocosnet.data.pix2pix import Pix2pixDataset


class ADE20KDataset(Pix2pixDataset):
    list_name = "ade20k"

    def get_paths(self, opt):
        phase, folder = ("val", "validation") if opt.phase == "test" else ("train", "training")
        root = os.path.join(opt.dataroot, folder)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"dataroot {opt.dataroot!r} has no {folder}/ folder (ADE20K layout: "
                                    "<dataroot>/{training,validation}/ADE_*.jpg with the .png beside it)")
        names = sorted(n for n in os.listdir(root) if f"_{phase}_" in n)
        images = [os.path.join(root, n) for n in names if n.endswith(".jpg")]
        labels = [os.path.join(root, n) for n in names if n.endswith(".png")]
        stems = lambda paths: [os.path.splitext(os.path.basename(p))[0] for p in paths]  # noqa: E731
        if stems(images) != stems(labels):
            raise ValueError(f"{root}: photos and label maps do not pair one to one "
                             f"({len(images)} .jpg, {len(labels)} .png)")
        return labels, images

    def ref_image_path(self, image_path, ref):
        return os.path.join(self.opt.dataroot, "training", ref)  # exemplars come from the training split
