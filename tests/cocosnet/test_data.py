"""Datasets on the real samples (data/cocosnet-samples, the reference's layouts and test lists), the
synthetic dataset, the resumable sampler and the OpenCV/scikit-image stand-ins."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cocosnet.data import ResumableSampler, create_dataloader, create_dataset
from cocosnet.data.drawing import canny, l1_distance, label_edges
from cocosnet.options import parse

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "cocosnet-samples"
LISTS = str(SAMPLES / "lists")


def opt_for(mode, *args):
    return parse(["--ref_dir", LISTS, "--nThreads", "0", "--gpu_ids", "-1", *args], mode=mode)


def check_item(item, label_shape, label_dtype):
    assert set(item) == {"label", "image", "ref", "label_ref", "self_ref", "path"}
    assert item["label"].shape == label_shape and item["label"].dtype == label_dtype
    assert item["label_ref"].shape == label_shape and item["label_ref"].dtype == label_dtype
    for k in ("image", "ref"):
        assert item[k].shape == (3,) + label_shape[1:] and item[k].dtype == torch.float32
        assert -1 <= item[k].min() and item[k].max() <= 1
    assert item["self_ref"].shape == () and item["self_ref"].item() in (0.0, 1.0)


def test_ade20k_test_split_uses_the_reference_pairs():
    ds = create_dataset(opt_for("test", "--dataset_mode", "ade20k", "--dataroot", str(SAMPLES / "ade20k")))
    assert len(ds) == 6
    pairs = dict(line.strip().split(",") for line in open(SAMPLES / "lists" / "ade20k_ref_test.txt"))
    for i in range(len(ds)):
        item = ds[i]
        check_item(item, (1, 256, 256), torch.int64)
        assert 0 <= item["label"].min() and item["label"].max() <= 150
        assert item["self_ref"].item() == 0.0  # always the listed exemplar at test
        ref_name = pairs[os.path.basename(item["path"])]
        ref_photo = np.asarray(Image.open(SAMPLES / "ade20k" / "training" / ref_name).convert("RGB")
                               .resize((256, 256), Image.BICUBIC), dtype=np.float32) / 127.5 - 1
        assert torch.allclose(item["ref"], torch.from_numpy(ref_photo).permute(2, 0, 1), atol=1e-6)
        ref_label = np.array(Image.open(SAMPLES / "ade20k" / "training" / ref_name.replace(".jpg", ".png"))
                             .resize((256, 256), Image.NEAREST))
        assert torch.equal(item["label_ref"][0], torch.from_numpy(ref_label.astype(np.int64)))


def test_ade20k_training_pseudo_and_retrieved_exemplars(tmp_path):
    # A training list in the reference's format: key,ref1,...,refK (easy first, hard last).
    names = sorted(p.name for p in (SAMPLES / "ade20k" / "training").glob("*.jpg"))
    (tmp_path / "ade20k_ref.txt").write_text(
        "".join(f"{n},{names[(i + 1) % 6]},{names[(i + 2) % 6]},{names[(i + 3) % 6]}\n" for i, n in enumerate(names)))
    base = ["--dataset_mode", "ade20k", "--dataroot", str(SAMPLES / "ade20k"), "--ref_dir", str(tmp_path)]
    ds = create_dataset(opt_for("train", *base, "--real_reference_probability", "1", "--hard_reference_probability", "0"))
    assert ds.opt.load_size == 286 and ds.opt.crop_size == 256  # the reference's training resize + crop
    item = ds[0]
    check_item(item, (1, 256, 256), torch.int64)
    assert item["self_ref"].item() == 0.0
    ds = create_dataset(opt_for("train", *base, "--real_reference_probability", "0"))
    item = ds[0]
    assert item["self_ref"].item() == 1.0
    # A pseudo exemplar is the same photo and map under another crop and flip: the same classes.
    assert set(item["label_ref"].unique().tolist()) <= set(np.unique(np.array(Image.open(
        SAMPLES / "ade20k" / "training" / names[0].replace(".jpg", ".png")))).tolist())
    # Items are functions of (seed, epoch, index): reproducible, and re-drawn every epoch.
    again = ds[0]
    assert all(torch.equal(item[k], again[k]) for k in ("label", "image", "ref"))
    draws = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        draws.add(ds[0]["image"].sum().item())
    assert len(draws) > 1


def test_celebahq_mask_and_glasses():
    ds = create_dataset(opt_for("test", "--dataset_mode", "celebahq", "--dataroot", str(SAMPLES / "celebahq")))
    assert len(ds) == 4
    item = ds[0]
    check_item(item, (2, 256, 256), torch.float32)
    classes = item["label"][0]
    assert classes.min() >= 0 and classes.max() <= 18 and torch.equal(classes, classes.round())
    assert set(item["label"][1].unique().tolist()) <= {0.0, 1.0}
    assert os.path.basename(item["path"]) == "29922.jpg"


@pytest.fixture
def edge_root(tmp_path):
    """The CelebA-HQ edge samples with a val.txt (the sample folder ships none)."""
    for d in ("CelebA-HQ-img", "CelebAMask-HQ-mask-anno"):
        os.symlink(SAMPLES / "celebahqedge" / d, tmp_path / d)
    (tmp_path / "val.txt").write_text("29642\n")
    return tmp_path


def test_celebahqedge_fifteen_channels(edge_root):
    ds = create_dataset(opt_for("test", "--dataset_mode", "celebahqedge", "--dataroot", str(edge_root)))
    item = ds[0]
    check_item(item, (15, 256, 256), torch.float32)
    label = item["label"]
    assert 0 <= label.min() and label.max() <= 1
    part_edges, all_edges = label[14], label[0]
    assert 0 < part_edges.sum() <= all_edges.sum()
    assert torch.all(all_edges >= part_edges)  # all edges = part boundaries + Canny outside the face
    # A distance map is 0 on its part's boundary and grows away from it.
    assert label[1].min() == 0 and label[1].max() > 0.05


def test_deepfashion_pose_and_video_like_self_pair(tmp_path):
    ds = create_dataset(opt_for("test", "--dataset_mode", "deepfashion", "--dataroot", str(SAMPLES / "DeepFashion")))
    assert len(ds) == 4
    item = ds[0]
    check_item(item, (20, 256, 256), torch.float32)
    skeleton, limbs = item["label"][:3], item["label"][3:]
    assert skeleton.sum() > 0 and 0 <= limbs.min() and limbs.max() <= 1
    pairs = dict(line.strip().split(",") for line in open(SAMPLES / "lists" / "deepfashion_ref_test.txt"))
    ref = pairs[os.path.relpath(item["path"], SAMPLES / "DeepFashion").replace("/", "\\")].replace("\\", "/")
    ref_photo = np.asarray(Image.open(SAMPLES / "DeepFashion" / ref).convert("RGB").resize((256, 256), Image.BICUBIC),
                           dtype=np.float32) / 127.5 - 1
    assert torch.allclose(item["ref"], torch.from_numpy(ref_photo).permute(2, 0, 1), atol=1e-6)
    # --video_like training (the recipe: no retrieval): the pseudo exemplar is the self-pair photo of
    # the same person where the list has one, else the re-cropped photo itself.
    root = tmp_path / "DeepFashion"
    for d in ("img", "pose"):
        os.makedirs(root, exist_ok=True)
        os.symlink(SAMPLES / "DeepFashion" / d, root / d)
    (root / "train.txt").write_text("img\\WOMEN\\Dresses\\id_00000244\\02_1_front.jpg\n")
    (tmp_path / "deepfashion_self_pair.txt").write_text(
        "img\\WOMEN\\Dresses\\id_00000244\\02_1_front.jpg,img\\WOMEN\\Dresses\\id_00000203\\03_1_front.jpg\n")
    ds = create_dataset(opt_for("train", "--recipe", "deepfashion", "--dataroot", str(root), "--ref_dir", str(tmp_path)))
    item = ds[0]
    assert item["self_ref"].item() == 1.0
    # Another folder (person) in the list: the reference rejects it and uses the photo itself.
    assert ds.self_pair("img/WOMEN/Dresses/id_00000244/02_1_front.jpg", random.Random(0)) is None
    (tmp_path / "deepfashion_self_pair.txt").write_text(
        "img\\WOMEN\\Dresses\\id_00000244\\02_1_front.jpg,img\\WOMEN\\Dresses\\id_00000244\\02_1_front.jpg\n")
    ds = create_dataset(opt_for("train", "--recipe", "deepfashion", "--dataroot", str(root), "--ref_dir", str(tmp_path)))
    assert ds.self_pair("img/WOMEN/Dresses/id_00000244/02_1_front.jpg", random.Random(0)).endswith("02_1_front.jpg")


def synthetic_opt(*args):
    return opt_for("train", "--dataset_mode", "synthetic", "--label_nc", "9", "--crop_size", "64", "--load_size", "72",
                   "--preprocess_mode", "resize_and_crop", "--synthetic_size", "12", "--synthetic_mixes", "3", *args)


def test_synthetic_exemplars_share_the_class_mix():
    ds = create_dataset(synthetic_opt("--real_reference_probability", "1"))
    assert len(ds) == 12
    for i in range(len(ds)):
        item = ds[i]
        check_item(item, (1, 64, 64), torch.int64)
        mix = set(ds.mix(i))
        assert set(item["label"].unique().tolist()) <= mix
        assert set(item["label_ref"].unique().tolist()) <= mix
        assert item["self_ref"].item() == 0.0
        assert not torch.equal(item["ref"], item["image"])
    # Photos are rendered from the labels: one texture per class, so pixels of a class look alike.
    item = ds[0]
    assert ds.n_classes == 9  # label_nc 9, no dontcare label
    pseudo = create_dataset(synthetic_opt("--real_reference_probability", "0"))[0]
    assert pseudo["self_ref"].item() == 1.0


def test_synthetic_is_reproducible_and_validated():
    a, b = create_dataset(synthetic_opt()), create_dataset(synthetic_opt())
    for k in ("label", "image", "ref", "label_ref"):
        assert torch.equal(a[5][k], b[5][k])
    assert not torch.equal(create_dataset(synthetic_opt("--seed", "1"))[5]["image"], a[5]["image"])
    with pytest.raises(ValueError, match="synthetic_size \\(4\\) must be at least 2 \\* synthetic_mixes \\(3\\)"):
        create_dataset(synthetic_opt("--synthetic_size", "4"))


def test_loader_batches_and_errors(tmp_path):
    opt = synthetic_opt("--batchSize", "4")
    loader = create_dataloader(opt, create_dataset(opt))
    batch = next(iter(loader))
    assert batch["label"].shape == (4, 1, 64, 64) and batch["self_ref"].shape == (4,) and len(batch["path"]) == 4
    with pytest.raises(ValueError, match="dataset_mode must be one of"):
        opt.dataset_mode = "coco"
        create_dataset(opt)
    with pytest.raises(FileNotFoundError, match="ade20k_ref_test.txt"):
        create_dataset(opt_for("test", "--dataset_mode", "ade20k", "--dataroot", str(SAMPLES / "ade20k"),
                               "--ref_dir", str(tmp_path)))
    with pytest.raises(ValueError, match="crop_size 256 exceeds the 128x128 image"):
        create_dataset(opt_for("test", "--dataset_mode", "ade20k", "--dataroot", str(SAMPLES / "ade20k"),
                               "--load_size", "128"))[0]


def test_sampler_resumes_and_splits_across_ranks():
    s = ResumableSampler(10, shuffle=True, seed=3)
    s.set_position(2)
    full = list(s)
    assert sorted(full) == list(range(10))
    s.set_position(2, 4)
    assert list(s) == full[4:] and len(s) == 6
    s.set_position(3)
    assert list(s) != full  # another epoch, another order
    ranks = [ResumableSampler(10, shuffle=True, seed=3, rank=r, world_size=3) for r in range(3)]
    for r in ranks:
        r.set_position(2)
    shares = [list(r) for r in ranks]
    assert all(len(x) == 4 for x in shares) and set(sum(shares, [])) == set(range(10))


def test_l1_distance_matches_brute_force():
    rng = np.random.default_rng(0)
    src = (rng.random((13, 17)) > 0.1).astype(np.uint8) * 255
    zeros = np.argwhere(src == 0)
    yy, xx = np.mgrid[0:13, 0:17]
    brute = np.min(np.abs(yy[..., None] - zeros[:, 0]) + np.abs(xx[..., None] - zeros[:, 1]), axis=-1)
    assert np.array_equal(l1_distance(src), brute)


def test_edges_of_a_square():
    img = np.zeros((40, 40), dtype=np.uint8)
    img[10:30, 10:30] = 200
    e = canny(img)
    assert e[10:30, 9:11].any() and e[10:30, 29:31].any()  # both vertical sides
    assert not e[15:25, 15:25].any() and not e[:5].any()  # nothing inside or far away
    edge = np.zeros((40, 40), dtype=bool)
    label_edges(edge, img)
    assert edge[10, 10] and edge[9, 15] and not edge[20, 20]
