"""Train CoCosNet: `python -m cocosnet.train [options]` (reference option names; --help lists them).

    python -m cocosnet.train --recipe ade20k --dataroot ADEChallengeData2016/images --ref_dir data
    python -m cocosnet.train --dataset_mode synthetic --label_nc 12 --crop_size 128 --load_size 143 \\
        --batchSize 2 --vgg_random_init --gpu_ids -1 --max_steps 20
    torchrun --nproc_per_node 2 -m cocosnet.train ...            # DistributedDataParallel
    python -m cocosnet.train ... --continue_train                  # resume from the newest checkpoint

Writes into <checkpoints_dir>/<name>/: state/ (crash-safe training states, newest
--keep_checkpoints kept), <epoch>_net_{G,Corr,D}.pth and latest_net_*.pth (the reference's
file names), samples/ (image grids every --display_freq iterations) and tensorboard/.
"""
from __future__ import annotations

import logging
import sys

import torch

from cocosnet.options import parse
from cocosnet.trainer import NonFiniteError, Trainer


def default_model(opt):
    from cocosnet.models import Pix2PixModel
    return Pix2PixModel(opt)


def main(argv: list[str] | None = None, model_factory=default_model) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        trainer = Trainer(parse(argv, mode="train"), model_factory)
    except (ValueError, FileNotFoundError) as e:  # the options or the data do not fit: say so, no traceback
        sys.exit(f"python -m cocosnet.train: error: {e}")
    try:
        trainer.train()
    except NonFiniteError as e:
        logging.getLogger("cocosnet.train").error("%s", e)
        sys.exit(3)
    except torch.OutOfMemoryError as e:
        opt = trainer.opt
        hints = [] if opt.activation_checkpointing else ["--activation_checkpointing (at 512 px about a third "
                                                         "of the memory, see docs/training.md)"]
        hints += ["--amp bf16"] if opt.amp == "none" else []
        hints += [f"a smaller --batchSize than {opt.batchSize}"] if opt.batchSize > 1 else []
        hints += ["a fused --backend (not 'reference')"] if opt.backend == "reference" else []
        logging.getLogger("cocosnet.train").error(
            "out of memory at --crop_size %d, batch %d: %s. Try %s. The newest checkpoint in %s is intact "
            "(--continue_train resumes from it).", opt.crop_size, opt.batchSize, str(e).splitlines()[0],
            ", ".join(hints) or "a smaller --crop_size", trainer.checkpoints.directory)
        sys.exit(4)


if __name__ == "__main__":
    main()
