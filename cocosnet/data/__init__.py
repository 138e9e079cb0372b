"""Datasets in the reference's layouts, the synthetic dataset, and a resumable data loader.

`create_dataset(opt)` picks the dataset by `opt.dataset_mode`; `create_dataloader(opt, dataset,
rank, world_size)` returns a loader whose order depends only on (seed, epoch), so that training
resumes at the exact batch where it stopped (`ResumableSampler.set_position`).
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Sampler

from cocosnet.data.ade20k import ADE20KDataset
from cocosnet.data.celebahq import CelebAHQDataset
from cocosnet.data.celebahqedge import CelebAHQEdgeDataset
from cocosnet.data.deepfashion import DeepFashionDataset
from cocosnet.data.synthetic import SyntheticDataset

DATASETS = {
    "ade20k": ADE20KDataset,
    "celebahq": CelebAHQDataset,
    "celebahqedge": CelebAHQEdgeDataset,
    "deepfashion": DeepFashionDataset,
    "synthetic": SyntheticDataset,
}


def create_dataset(opt):
    if opt.dataset_mode not in DATASETS:
        raise ValueError(f"dataset_mode must be one of {sorted(DATASETS)}, got {opt.dataset_mode!r}")
    return DATASETS[opt.dataset_mode](opt)


class ResumableSampler(Sampler):
    """This rank's share of one epoch's order, from `position` on.

    The order is a permutation seeded by (seed, epoch) (or 0..n-1 without shuffling), padded by
    wrapping to a multiple of world_size and dealt out round-robin, as DistributedSampler does;
    `set_position(epoch, samples_done)` skips what this rank already consumed in that epoch.
    """

    def __init__(self, n: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1):
        if n < 1:
            raise ValueError(f"dataset is empty (n={n})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.n, self.shuffle, self.seed, self.rank, self.world_size = n, shuffle, seed, rank, world_size
        self.epoch, self.position = 0, 0

    def set_position(self, epoch: int, position: int = 0) -> None:
        self.epoch, self.position = epoch, position

    def order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = -(-self.n // self.world_size) * self.world_size
        order = (order * (total // self.n + 1))[:total]
        return order[self.rank::self.world_size]

    def __iter__(self):
        return iter(self.order()[self.position:])

    def __len__(self) -> int:
        return -(-self.n // self.world_size) - self.position


def create_dataloader(opt, dataset, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Batches of `opt.batchSize` per process; training drops the last incomplete batch."""
    sampler = ResumableSampler(len(dataset), shuffle=opt.isTrain and not opt.serial_batches,
                               seed=getattr(opt, "seed", 0), rank=rank, world_size=world_size)
    # Its own generator: creating an iterator draws a worker seed, which must not advance the
    # global torch RNG (a resumed run creates one more iterator than an uninterrupted one).
    return DataLoader(dataset, batch_size=opt.batchSize, sampler=sampler, num_workers=int(opt.nThreads),
                      drop_last=opt.isTrain, generator=torch.Generator().manual_seed(getattr(opt, "seed", 0)))
