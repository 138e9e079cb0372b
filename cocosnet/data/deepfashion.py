"""DeepFashion with OpenPose keypoints (reference layout: <dataroot>/img/{MEN,WOMEN}/<cat>/id_*/*.jpg,
pose files beside them under pose/ as <name>_{candidate,subset}.txt; train.txt / val.txt list image
paths, possibly with backslashes).

The 20-channel input, as the reference builds it: the skeleton render (3 channels in [0, 1],
nearest-resized) and the 17 per-limb L1 distance maps (/ 3, clipped at 255, bilinear, in [0, 1]).
With --video_like the pseudo exemplar is another photo of the same person (deepfashion_self_pair.txt)."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from cocosnet.data.drawing import distance_map, render_pose
from cocosnet.data.pix2pix import Pix2pixDataset, read_id_list, read_ref_list
from cocosnet.data.transforms import get_params, to_unit_tensor


class DeepFashionDataset(Pix2pixDataset):
    list_name = "deepfashion"

    def get_paths(self, opt):
        rel = read_id_list(os.path.join(opt.dataroot, "train.txt" if opt.phase == "train" else "val.txt"))
        images = [os.path.join(opt.dataroot, p) for p in rel]
        return [self.image_to_label_path(p) for p in images], images

    def get_ref(self, opt):
        refs = super().get_ref(opt)
        self.self_pairs = {}
        if getattr(opt, "video_like", False):
            pairs = read_ref_list(os.path.join(opt.ref_dir, "deepfashion_self_pair.txt"), "test")
            self.self_pairs = {k: v for k, v in pairs.items()}
            # The reference's --video_like retrieval: the self pairs come first, so the "easy" exemplar
            # of a listed photo is a photo of the same person.
            refs = {k: pairs.get(k, []) + v for k, v in refs.items()}
        return refs

    def ref_key(self, image_path):
        return os.path.relpath(image_path, self.opt.dataroot).replace("\\", "/")

    def ref_image_path(self, image_path, ref):
        return os.path.join(self.opt.dataroot, ref)

    def self_pair(self, key, rng):
        others = self.self_pairs.get(key)
        if not others:
            return None
        ref = others[0]
        # Only a photo of the same person (same folder) in the same outfit (same numeric prefix).
        same = (os.path.dirname(ref) == os.path.dirname(key)
                and os.path.basename(ref).split("_")[0] == os.path.basename(key).split("_")[0])
        return os.path.join(self.opt.dataroot, ref) if same else None

    def image_to_label_path(self, image_path):
        return image_path.replace("\\", "/").replace("/img/", "/pose/").replace(".jpg", "_{}.txt")

    def load_label(self, path, rng):
        n = self.opt.load_size
        candidate = np.atleast_2d(np.loadtxt(path.format("candidate")))
        subset = np.loadtxt(path.format("subset"))
        img_path = path.replace("/pose/", "/img/").replace("_{}.txt", ".jpg")
        with Image.open(img_path) as img:
            size = img.size
        pose, limbs = render_pose(candidate, subset, size)
        pose = pose.resize((n, n), Image.NEAREST)
        params = get_params(self.opt, pose.size, rng)
        dists = [to_unit_tensor(self.opt, params, distance_map(limb), Image.BILINEAR) for limb in limbs]
        return torch.cat([to_unit_tensor(self.opt, params, pose), *dists]), params
