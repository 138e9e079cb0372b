"""The CoCosNet training loop: G step then D step per batch, TTUR schedule, AMP, DDP, crash-safe state.

`Trainer(opt, model)` runs `python -m cocosnet.train`. The model follows the Pix2PixModel
interface: `model(data, mode="generator") -> (losses, outputs)`, `model(data,
mode="discriminator") -> losses`, `create_optimizers(opt) -> (optimizer_G, optimizer_D)` and the
networks as attributes `net_G`, `net_D`, `net_Corr`.

Training state:
- every `save_latest_freq` iterations, at every epoch end, at `max_steps` and on SIGINT/SIGTERM,
  the full state is written atomically (cocosnet.checkpoint): networks, both optimisers, both
  LR schedulers, the AMP scaler, the RNG states of python, numpy and torch (CPU and CUDA, per
  rank), the epoch and the number of batches consumed in it, and the skip counter;
- `--continue_train` resumes from the newest intact state: the data loader restarts at the
  next unseen batch of the same epoch order (cocosnet.data.ResumableSampler), so a run that is
  killed and resumed ends with the same weights as one that never stopped (tested bit for bit
  on the CPU);
- a NaN/Inf loss or gradient skips that optimiser's update with a logged reason; after
  `max_nonfinite_steps` consecutive skipped iterations training stops with an error (the last
  checkpoint stays the last good one);
- SIGINT/SIGTERM set a flag; the loop finishes its iteration, saves and exits (code 128 + signal).
"""
from __future__ import annotations

import logging
import math
import os
import pickle
import random
import signal
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from cocosnet.checkpoint import CheckpointManager, save_atomic, write_atomic
from cocosnet.data import create_dataloader, create_dataset

log = logging.getLogger("cocosnet.train")

NETS = ("net_G", "net_Corr", "net_D")
STATE_FORMAT = 2


def lr_factor(opt):
    """The reference's schedule per completed epoch k: constant for niter epochs, then linear to 0."""
    def factor(k: int) -> float:
        return 1.0 - max(0, k - opt.niter) / opt.niter_decay if opt.niter_decay > 0 else 1.0
    return factor


def rng_state() -> dict:
    """The RNG states as tensors and plain data (a training state is loaded with weights_only=True)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "gauss": float(gauss)}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class NonFiniteError(RuntimeError):
    """Too many consecutive iterations had a NaN/Inf loss or gradient."""


def _label_colors(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.rand(n, 3, generator=g) * 2 - 1


def visual_grid(data: dict, outputs: dict, max_items: int = 4) -> torch.Tensor:
    """(3, H', W') in [0, 1]: one row per item, columns input | exemplar | warped | output | ground truth."""
    label = data["label"][:max_items].detach().float().cpu()
    if label.shape[1] <= 2:  # class ids (celebahq: + the glasses mask): a fixed colour per class
        colors = _label_colors(max(256, int(label[:, 0].max().item()) + 1))
        label = colors[label[:, 0].long()].permute(0, 3, 1, 2)
    else:  # dense maps in [0, 1] (edges, pose): the first three channels
        label = label[:, :3] * 2 - 1
    h, w = data["image"].shape[-2:]

    def fit(x):
        x = x[:max_items].detach().float().cpu()
        return torch.nn.functional.interpolate(x, size=(h, w), mode="nearest") if x.shape[-2:] != (h, w) else x

    cols = [fit(label), fit(data["ref"])]
    cols += [fit(outputs[k]) for k in ("warp_out", "fake_image") if outputs.get(k) is not None]
    cols.append(fit(data["image"]))
    grid = torch.cat([torch.cat(cols, dim=3)[i] for i in range(cols[0].shape[0])], dim=1)
    return ((grid.clamp(-1, 1) + 1) / 2)


def check_training_options(opt) -> None:
    """ValueError naming the option for values the loop cannot use."""
    for name in ("keep_checkpoints", "max_nonfinite_steps", "print_freq", "display_freq", "save_latest_freq",
                 "save_epoch_freq", "batchSize"):
        if getattr(opt, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(opt, name)}")
    for name in ("max_steps", "niter", "niter_decay", "nThreads"):
        if getattr(opt, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(opt, name)}")
    if opt.niter + opt.niter_decay < 1:
        raise ValueError(f"--niter + --niter_decay must be >= 1 epoch, got {opt.niter} + {opt.niter_decay}")


class Trainer:
    def __init__(self, opt, model_factory):
        check_training_options(opt)
        self.opt = opt
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.distributed and not dist.is_initialized():
            use_cuda = torch.cuda.is_available() and opt.gpu_ids != "-1"
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available() and opt.gpu_ids != "-1":
            gpu = local_rank if self.distributed else int(opt.gpu_ids.split(",")[0])
            self.device = torch.device("cuda", gpu)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.is_main = self.rank == 0

        seed_everything(opt.seed)  # identical initial weights on every rank (DDP also broadcasts them)
        self.dataset = create_dataset(opt)
        self.loader = create_dataloader(opt, self.dataset, self.rank, self.world_size)
        self.batches_per_epoch = len(self.loader)
        if self.batches_per_epoch == 0:
            raise ValueError(f"batchSize {opt.batchSize} x {self.world_size} process(es) exceeds the dataset's "
                             f"{len(self.dataset)} items: no full batch per epoch")
        self.model = model_factory(opt).to(self.device)
        self.optimizer_G, self.optimizer_D = self.model.create_optimizers(opt)
        self.scheduler_G = torch.optim.lr_scheduler.LambdaLR(self.optimizer_G, lr_factor(opt))
        self.scheduler_D = torch.optim.lr_scheduler.LambdaLR(self.optimizer_D, lr_factor(opt))
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[opt.amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=opt.amp == "fp16")
        self.forward = self.model
        if self.distributed:
            # Each mode uses a subset of the networks (the D step no G), hence find_unused_parameters.
            self.forward = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)

        self.run_dir = Path(opt.checkpoints_dir) / opt.name
        self.checkpoints = CheckpointManager(self.run_dir / "state", keep=opt.keep_checkpoints)
        self.epoch, self.batches_done, self.step, self.nonfinite_streak = 0, 0, 0, 0
        self.stop_signal = None
        self.writer = self._tensorboard() if self.is_main else None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        rngs = [rng_state()]
        if self.distributed:
            rngs = [None] * self.world_size
            dist.all_gather_object(rngs, rng_state())
        return {
            "format": STATE_FORMAT,
            "nets": {n: getattr(self.model, n).state_dict() for n in NETS if getattr(self.model, n, None) is not None},
            "optimizer_G": self.optimizer_G.state_dict(), "optimizer_D": self.optimizer_D.state_dict(),
            "scheduler_G": self.scheduler_G.state_dict(), "scheduler_D": self.scheduler_D.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": rngs,
            "epoch": self.epoch, "batches_done": self.batches_done, "step": self.step,
            "nonfinite_streak": self.nonfinite_streak, "world_size": self.world_size,
            "opt": vars(self.opt),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"training state format {state.get('format')!r} is not {STATE_FORMAT}")
        if state["world_size"] != self.world_size:
            raise ValueError(f"the checkpoint was written by {state['world_size']} process(es), this run has "
                             f"{self.world_size}: the data order and RNG streams would differ")
        for n, sd in state["nets"].items():
            getattr(self.model, n).load_state_dict(sd)
        self.optimizer_G.load_state_dict(state["optimizer_G"])
        self.optimizer_D.load_state_dict(state["optimizer_D"])
        self.scheduler_G.load_state_dict(state["scheduler_G"])
        self.scheduler_D.load_state_dict(state["scheduler_D"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"][self.rank])
        self.epoch, self.batches_done, self.step = state["epoch"], state["batches_done"], state["step"]
        self.nonfinite_streak = state["nonfinite_streak"]

    def save(self, reason: str) -> None:
        """The training state, and the networks as the reference's latest_net_*.pth."""
        state = self.state_dict()  # collective under DDP: every rank takes part
        if self.is_main:
            path = self.checkpoints.save(state, self.step)
            self.export_nets("latest")
            log.info("saved %s (%s)", path, reason)

    def resume(self) -> bool:
        found = self.checkpoints.latest(map_location="cpu")
        if found is None:
            log.info("no checkpoint in %s: starting from scratch", self.checkpoints.directory)
            return False
        state, path = found
        self.load_state_dict(state)
        log.info("resumed from %s: epoch %d, batch %d, step %d", path, self.epoch + 1, self.batches_done, self.step)
        return True

    def export_nets(self, label: str) -> None:
        """`<label>_net_{G,Corr,D}.pth` in the reference's format (its key names: the reference code and
        cocosnet.convert.load_reference_checkpoints load them), with the options beside them as the
        reference writes them (opt.txt, opt.pkl)."""
        if not self.is_main:
            return
        for n in NETS:
            net = getattr(self.model, n, None)
            if net is not None:
                save_atomic(net.state_dict(), self.run_dir / f"{label}_{n}.pth")
        options = vars(self.opt)
        text = "".join(f"{k}: {options[k]}\n" for k in sorted(options))
        write_atomic(self.run_dir / "opt.txt", text.encode())
        write_atomic(self.run_dir / "opt.pkl", pickle.dumps(options))

    # ------------------------------------------------------------------ one iteration
    def _all_ranks(self, ok: bool) -> bool:
        if not self.distributed:
            return ok
        flag = torch.tensor([1.0 if ok else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    @staticmethod
    def _finite(t: torch.Tensor) -> bool:
        # The step's only data-dependent branch (benchmarks/bench_train_step.py traces the step
        # with value-less tensors and replaces it).
        return bool(torch.isfinite(t.detach()).all())

    def _update(self, name: str, losses: dict, optimizer) -> bool:
        """Backward and step of one optimiser; False (with a logged reason) where it was skipped."""
        total = sum(losses.values())
        bad = [k for k, v in losses.items() if not self._finite(v)]
        if not self._all_ranks(not bad):
            log.warning("step %d: skipped the %s update: non-finite loss %s", self.step, name,
                        ", ".join(f"{k}={losses[k].detach().float().item()}" for k in bad) or "on another rank")
            return False
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, math.inf) if params else torch.tensor(0.0)
        finite = self._finite(norm)
        if finite or self.scaler.is_enabled():  # fp16 overflow: the scaler skips the step and lowers its scale
            self.scaler.step(optimizer)
        # Gradients dropped at once: their memory is free for the next forward (and for D's step).
        optimizer.zero_grad(set_to_none=True)
        if not finite and self.scaler.is_enabled():
            log.info("step %d: fp16 gradient overflow in the %s update; loss scale lowered", self.step, name)
        elif not finite:
            log.warning("step %d: skipped the %s update: gradient norm is %s", self.step, name, norm.item())
            return False
        return True

    def train_step(self, data: dict) -> tuple[dict, dict, dict]:
        """One G update then one D update on `data`; returns (losses, G outputs, data on the device)."""
        data = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in data.items()}
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)
        with autocast:
            g_losses, outputs = self.forward(data, mode="generator")
        ok_g = self._update("generator", g_losses, self.optimizer_G)
        with autocast:  # D sees the G step's (detached) fake, as in the reference
            d_losses = self.forward(data, mode="discriminator", GforD=outputs)
        ok_d = self._update("discriminator", d_losses, self.optimizer_D)
        self.scaler.update()
        self.nonfinite_streak = 0 if ok_g and ok_d else self.nonfinite_streak + 1
        if self.nonfinite_streak >= self.opt.max_nonfinite_steps:
            raise NonFiniteError(f"{self.nonfinite_streak} consecutive iterations had a NaN/Inf loss or gradient "
                                 f"(--max_nonfinite_steps {self.opt.max_nonfinite_steps}); stopping at step "
                                 f"{self.step}. The newest checkpoint in {self.checkpoints.directory} predates them.")
        return {**g_losses, **d_losses}, outputs, data

    # ------------------------------------------------------------------ the loop
    def _tensorboard(self):
        if self.opt.no_tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("TensorBoard is not installed (pip install tensorboard): training without its logs", file=sys.stderr)
            return None
        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def _on_signal(self, signum, frame):
        self.stop_signal = signum

    def _stop_requested(self) -> bool:
        return not self._all_ranks(self.stop_signal is None)

    def _log(self, losses: dict, bar) -> None:
        values = {k: v.detach().float().item() for k, v in losses.items()}
        if bar is not None:
            bar.set_postfix({k: f"{v:.3g}" for k, v in values.items()}, refresh=False)
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"loss/{k}", v, self.step)
            self.writer.add_scalar("lr/G", self.optimizer_G.param_groups[0]["lr"], self.step)
            self.writer.add_scalar("lr/D", self.optimizer_D.param_groups[0]["lr"], self.step)

    def _display(self, data: dict, outputs: dict) -> None:
        grid = visual_grid(data, outputs)
        if self.writer is not None:
            self.writer.add_image("input|exemplar|warped|output|ground_truth", grid, self.step)
        from PIL import Image
        out = self.run_dir / "samples"
        out.mkdir(parents=True, exist_ok=True)
        arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(out / f"step_{self.step:09d}.png")

    def train(self) -> None:
        opt = self.opt
        total_epochs = opt.niter + opt.niter_decay
        if opt.continue_train:
            self.resume()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._loop(total_epochs)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self.writer is not None:
                self.writer.close()
        if self.stop_signal is not None:
            raise SystemExit(128 + self.stop_signal)

    def _loop(self, total_epochs: int) -> None:
        opt = self.opt
        sampler = self.loader.sampler
        while self.epoch < total_epochs:
            sampler.set_position(self.epoch, self.batches_done * opt.batchSize)
            self.dataset.set_epoch(self.epoch)
            opt.epoch = self.epoch + 1  # 1-based as the reference; --noise_for_mask compares it with --mask_epoch
            bar = tqdm(total=self.batches_per_epoch, initial=self.batches_done, disable=not self.is_main,
                       desc=f"epoch {self.epoch + 1}/{total_epochs}", dynamic_ncols=True)
            for data in self.loader:
                losses, outputs, data = self.train_step(data)
                self.step += 1
                self.batches_done += 1
                bar.update(1)
                if self.is_main and self.step % opt.print_freq == 0:
                    self._log(losses, bar)
                if self.is_main and self.step % opt.display_freq == 0:
                    self._display(data, outputs)
                if self._stop_requested():
                    bar.close()
                    self.save(f"signal {signal.Signals(self.stop_signal or signal.SIGTERM).name}")
                    return
                if opt.max_steps and self.step >= opt.max_steps:
                    bar.close()
                    self.save(f"--max_steps {opt.max_steps}")
                    return
                if self.step % opt.save_latest_freq == 0 and self.batches_done < self.batches_per_epoch:
                    self.save("--save_latest_freq")
            bar.close()
            self.epoch += 1
            self.batches_done = 0
            self.scheduler_G.step()
            self.scheduler_D.step()
            self.save(f"end of epoch {self.epoch}")
            if self.epoch % opt.save_epoch_freq == 0 or self.epoch == total_epochs:
                self.export_nets(str(self.epoch))
