"""The training loop and `python -m cocosnet.train` on the synthetic data, with a tiny stand-in model
(TinyModel follows the Pix2PixModel interface) and, where it exists, the real model."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cocosnet.options import parse

ROOT = Path(__file__).resolve().parents[2]


class TinyModel(nn.Module):
    """A stand-in with Pix2PixModel's interface: one conv per network, L1 + hinge losses, and a
    random draw per generator call (so that resuming must restore the torch RNG)."""

    def __init__(self, opt):
        super().__init__()
        self.opt = opt
        nc = opt.label_nc + (1 if opt.contain_dontcare_label else 0)
        self.nc = nc
        self.net_Corr = nn.Conv2d(nc, 4, 3, padding=1)
        self.net_G = nn.Conv2d(nc + 3 + 4, 3, 3, padding=1)
        self.net_D = nn.Conv2d(nc + 3, 1, 4, stride=2, padding=1, bias=False)  # hinge: a bias gets no gradient

    def one_hot(self, label):
        return F.one_hot(label[:, 0].long(), self.nc).permute(0, 3, 1, 2).float()

    def generate(self, data):
        x = self.one_hot(data["label"])
        feat = self.net_Corr(x)
        noise = 0.01 * torch.randn_like(data["ref"])
        fake = torch.tanh(self.net_G(torch.cat([x, data["ref"] + noise, feat], 1)))
        return fake, x

    def forward(self, data, mode, GforD=None):
        if mode == "generator":
            fake, x = self.generate(data)
            losses = {"L1": F.l1_loss(fake, data["image"]) * 10,
                      "GAN": -self.net_D(torch.cat([x, fake], 1)).mean()}
            return losses, {"fake_image": fake, "warp_out": data["ref"]}
        if mode == "discriminator":
            with torch.no_grad():
                fake, x = self.generate(data)
            real = self.net_D(torch.cat([x, data["image"]], 1))
            fake = self.net_D(torch.cat([x, fake], 1))
            return {"D_real": F.relu(1 - real).mean(), "D_fake": F.relu(1 + fake).mean()}
        if mode == "inference":
            with torch.no_grad():
                fake, _ = self.generate(data)
            return {"fake_image": fake, "warp_out": data["ref"]}
        raise ValueError(f"mode must be generator, discriminator or inference, got {mode!r}")

    def create_optimizers(self, opt):
        g = list(self.net_G.parameters()) + list(self.net_Corr.parameters())
        return (torch.optim.Adam(g, lr=opt.lr / 2, betas=(0.0, 0.9), eps=1e-3),
                torch.optim.Adam(self.net_D.parameters(), lr=opt.lr * 2, betas=(0.0, 0.9)))


def tiny_args(run_dir, *extra) -> list[str]:
    """A few-second CPU training on 32px synthetic scenes."""
    return ["--dataset_mode", "synthetic", "--label_nc", "5", "--crop_size", "32", "--load_size", "36",
            "--preprocess_mode", "resize_and_crop", "--synthetic_size", "16", "--synthetic_mixes", "2",
            "--batchSize", "2", "--nThreads", "0", "--gpu_ids", "-1", "--niter", "1", "--niter_decay", "2",
            "--print_freq", "1", "--display_freq", "5", "--save_latest_freq", "3",
            "--checkpoints_dir", str(run_dir), "--name", "tiny", *extra]


def test_training_runs_and_writes_everything(tmp_path):
    from cocosnet.trainer import Trainer
    opt = parse(tiny_args(tmp_path, "--keep_checkpoints", "2", "--no_tensorboard"), mode="train")
    trainer = Trainer(opt, TinyModel)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.epoch == 3 and trainer.step == 3 * 8
    for n, p in trainer.model.named_parameters():
        assert not torch.equal(before[n], p), f"{n} was never updated"
    run = tmp_path / "tiny"
    assert len(trainer.checkpoints.paths()) == 2  # the newest K
    for f in ("latest_net_G.pth", "3_net_G.pth", "3_net_Corr.pth", "3_net_D.pth", "opt.txt", "opt.pkl"):
        assert (run / f).is_file(), f
    assert sorted((run / "samples").glob("*.png"))
    # The schedule: constant for niter epochs, then linear to zero over niter_decay (TTUR: G lr/2, D 2 lr).
    assert trainer.optimizer_G.param_groups[0]["lr"] == pytest.approx(opt.lr / 2 * (1 - 2 / 2))
    assert trainer.scheduler_D.get_last_lr()[0] == pytest.approx(0.0)


def _train_twice(tmp_path, model_factory, *args):
    from cocosnet.trainer import Trainer
    states = []
    for i in range(2):
        t = Trainer(parse(tiny_args(tmp_path / str(i), "--no_tensorboard", *args), mode="train"), model_factory)
        t.train()
        states.append({n: p.detach().clone() for n, p in t.model.named_parameters()})
    return states


def test_same_seed_same_weights_bit_for_bit(tmp_path):
    a, b = _train_twice(tmp_path, TinyModel, "--max_steps", "6")
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.slow  # two runs of the real networks on the CPU
def test_real_model_training_is_deterministic_on_cpu(tmp_path):
    pytest.importorskip("cocosnet.models")
    from cocosnet.models import Pix2PixModel
    a, b = _train_twice(tmp_path, Pix2PixModel, "--recipe", "ade20k", "--dataset_mode", "synthetic", "--label_nc", "5",
                        "--crop_size", "64", "--load_size", "72", "--ngf", "8", "--ndf", "8", "--vgg_random_init",
                        "--backend", "cpu", "--max_steps", "2")
    assert all(torch.equal(a[n], b[n]) for n in a), [n for n in a if not torch.equal(a[n], b[n])][:5]


@pytest.mark.parametrize("flag, value, message", [
    ("--keep_checkpoints", "0", "--keep_checkpoints must be >= 1, got 0"),
    ("--max_nonfinite_steps", "0", "--max_nonfinite_steps must be >= 1, got 0"),
    ("--save_latest_freq", "-5", "--save_latest_freq must be >= 1, got -5"),
    ("--max_steps", "-1", "--max_steps must be >= 0, got -1"),
])
def test_bad_training_options(tmp_path, flag, value, message):
    from cocosnet.trainer import Trainer
    with pytest.raises(ValueError, match=message):
        Trainer(parse(tiny_args(tmp_path, flag, value), mode="train"), TinyModel)


def test_lr_schedule_matches_reference():
    from cocosnet.trainer import lr_factor
    opt = parse(["--niter", "3", "--niter_decay", "4"], mode="train")
    f = lr_factor(opt)
    # The reference lowers lr by lr/niter_decay at the end of every epoch after niter (1-based).
    assert [f(k) for k in range(7)] == pytest.approx([1, 1, 1, 1, 0.75, 0.5, 0.25])


def test_nonfinite_loss_skips_then_stops(tmp_path, caplog):
    from cocosnet.trainer import NonFiniteError, Trainer

    class NaNModel(TinyModel):
        def forward(self, data, mode, GforD=None):
            out = super().forward(data, mode, GforD)
            if mode == "generator":
                out[0]["L1"] = out[0]["L1"] * float("nan")
            return out

    opt = parse(tiny_args(tmp_path, "--max_nonfinite_steps", "3"), mode="train")
    trainer = Trainer(opt, NaNModel)
    g_before = {n: p.detach().clone() for n, p in trainer.model.net_G.named_parameters()}
    with pytest.raises(NonFiniteError, match="3 consecutive"):
        trainer.train()
    assert "skipped the generator update: non-finite loss L1=nan" in caplog.text
    for n, p in trainer.model.net_G.named_parameters():
        assert torch.equal(g_before[n], p), f"{n} changed although every G step was skipped"


def test_out_of_memory_says_what_to_try(tmp_path, caplog):
    from cocosnet.train import main

    class HungryModel(TinyModel):
        def forward(self, data, mode, GforD=None):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    with pytest.raises(SystemExit) as exit_info:
        main(tiny_args(tmp_path, "--backend", "reference"), model_factory=HungryModel)
    assert exit_info.value.code == 4
    assert "out of memory at --crop_size 32, batch 2: CUDA out of memory. Tried to allocate 4.00 GiB" in caplog.text
    for hint in ("--activation_checkpointing", "--amp bf16", "smaller --batchSize than 2", "a fused --backend",
                 "--continue_train"):
        assert hint in caplog.text


def test_train_cli_help(capsys):
    from cocosnet.train import main
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--continue_train" in out and "--amp" in out and "--keep_checkpoints" in out


DDP_DRIVER = """
import os
import sys
sys.path.insert(0, {here!r})
import torch
import torch.distributed as dist
from test_train import TinyModel
from cocosnet.options import parse
from cocosnet.trainer import Trainer

class Model(TinyModel):
    generator_calls = 0

    def forward(self, data, mode, GforD=None):
        out = super().forward(data, mode, GforD)
        if mode == "generator":
            Model.generator_calls += 1
            if os.environ.get("NAN_ON_RANK_1") and dist.get_rank() == 1 and Model.generator_calls == 3:
                out[0]["L1"] = out[0]["L1"] * float("nan")
        return out

t = Trainer(parse(sys.argv[1:], mode="train"), Model)
t.train()
flat = torch.cat([p.detach().flatten() for p in t.model.parameters()])
ranks = [None] * t.world_size
dist.all_gather_object(ranks, flat)
if t.rank == 0:
    assert all(torch.equal(ranks[0], r) for r in ranks), "replicas diverged"
    print("REPLICAS_EQUAL", t.step, t.world_size, flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow  # about 40 s on 2 busy cores each: three processes import torch
@pytest.mark.parametrize("nan_on_rank_1", [False, True], ids=["finite", "nan-on-one-rank"])
def test_ddp_two_cpu_processes_with_gloo(tmp_path, nan_on_rank_1):
    """torchrun, 2 processes, gloo: every rank ends with the same weights; the state records both RNGs.
    A NaN loss on one rank makes every rank skip that update (else the replicas would diverge)."""
    (tmp_path / "ddp.py").write_text(DDP_DRIVER.format(here=str(Path(__file__).resolve().parent)))
    args = tiny_args(tmp_path, "--no_tensorboard", "--batchSize", "1", "--niter", "1", "--niter_decay", "0")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **({"NAN_ON_RANK_1": "1"} if nan_on_rank_1 else {}))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(tmp_path / "ddp.py"), *args],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # 16 scenes, batch 1 per rank, 2 ranks: 8 iterations per epoch.
    assert "REPLICAS_EQUAL 8 2" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    skipped = out.stderr.count("step 2: skipped the generator update: non-finite loss")
    assert skipped == (2 if nan_on_rank_1 else 0), out.stderr[-3000:]
    if nan_on_rank_1:  # rank 1 names its loss, rank 0 says why it skips too
        assert "L1=nan" in out.stderr and "non-finite loss on another rank" in out.stderr, out.stderr[-3000:]
    from cocosnet.checkpoint import CheckpointManager
    state, _ = CheckpointManager(tmp_path / "tiny" / "state").latest()
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["step"] == 8


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_steps(tmp_path, amp):
    from cocosnet.trainer import Trainer
    trainer = Trainer(parse(tiny_args(tmp_path, "--amp", amp, "--max_steps", "2", "--no_tensorboard"), mode="train"),
                      TinyModel)
    trainer.train()
    assert trainer.step == 2 and trainer.nonfinite_streak == 0
    assert trainer.scaler.is_enabled() == (amp == "fp16")


def test_without_tensorboard_one_notice(tmp_path, monkeypatch, capsys):
    from cocosnet.trainer import Trainer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    trainer = Trainer(parse(tiny_args(tmp_path, "--max_steps", "2"), mode="train"), TinyModel)
    trainer.train()
    err = capsys.readouterr().err
    assert err.count("TensorBoard is not installed") == 1 and trainer.step == 2


def test_tensorboard_scalars_and_grids(tmp_path):
    pytest.importorskip("tensorboard")
    from cocosnet.trainer import Trainer
    Trainer(parse(tiny_args(tmp_path, "--max_steps", "5"), mode="train"), TinyModel).train()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tiny" / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    assert {"loss/L1", "loss/D_real", "lr/G", "lr/D"} <= set(tags["scalars"])
    assert tags["images"] == ["input|exemplar|warped|output|ground_truth"]


def test_infer_rejects_bad_pairs(tmp_path):
    from cocosnet.infer import parse_args, pairs
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for i in range(2):
        (a / f"{i}.png").write_bytes(b"")
    for i in range(3):
        (b / f"{i}.jpg").write_bytes(b"")
    opt = parse_args(["--input", str(a), "--exemplar", str(b), "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="--exemplar folder has 3 files and --input 2"):
        pairs(opt)
    opt = parse_args(["--input", str(a / "0.png"), "--exemplar", str(b / "0.jpg"), "--out", "x.jpg"])
    with pytest.raises(ValueError, match="--out must be a .png file"):
        pairs(opt)
    opt = parse_args(["--input", str(a / "9.png"), "--exemplar", str(b / "0.jpg"), "--out", "x.png"])
    with pytest.raises(FileNotFoundError, match="--input .*9.png' does not exist"):
        pairs(opt)


@pytest.mark.slow  # the full-width ADE20K networks on the CPU: about a minute per command
def test_real_model_trains_then_infers_on_a_real_pair(tmp_path):
    """`python -m cocosnet.train` with the real Pix2PixModel (ADE20K recipe, 64 px, synthetic data),
    then `python -m cocosnet.infer` with the weights it wrote on a real ADE20K sample pair."""
    pytest.importorskip("cocosnet.models")
    common = ["--recipe", "ade20k", "--gpu_ids", "-1", "--backend", "cpu", "--ngf", "8",
              "--checkpoints_dir", str(tmp_path), "--name", "real"]
    # Synthetic scenes with ADE20K's classes (150 + "other"), so that the weights fit the ADE20K samples.
    train = subprocess.run([sys.executable, "-m", "cocosnet.train", *common, "--dataset_mode", "synthetic",
                            "--label_nc", "150", "--contain_dontcare_label",
                            "--crop_size", "64", "--load_size", "72", "--synthetic_size", "4", "--synthetic_mixes", "2",
                            "--batchSize", "1", "--nThreads", "0", "--vgg_random_init", "--ndf", "8",
                            "--max_steps", "2", "--display_freq", "2", "--no_tensorboard"],
                           capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert train.returncode == 0, train.stderr[-3000:]
    run = tmp_path / "real"
    assert (run / "latest_net_G.pth").is_file() and list((run / "state").glob("state_000000002.*.pt"))
    samples = ROOT / "data" / "cocosnet-samples" / "ade20k"
    infer = subprocess.run([sys.executable, "-m", "cocosnet.infer", *common, "--crop_size", "64", "--load_size", "64",
                            "--input", str(samples / "validation" / "ADE_val_00001232.png"),
                            "--exemplar", str(samples / "training" / "ADE_train_00004996.jpg"),
                            "--out", str(tmp_path / "out.png")], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert infer.returncode == 0, infer.stderr[-3000:]
    from PIL import Image
    assert Image.open(tmp_path / "out.png").size == (64, 64) == Image.open(tmp_path / "out_warp.png").size


@pytest.mark.parametrize("module,argv,message", [
    ("cocosnet.train", ["--crop_size", "-5"], "--crop_size must be a multiple of 32"),
    ("cocosnet.train", ["--dataroot", "/nonexistent", "--recipe", "ade20k", "--gpu_ids", "-1"], "dataroot '/nonexistent' has no"),
    ("cocosnet.infer", ["--input", "/nonexistent.png", "--exemplar", "/x.jpg", "--out", "/tmp/o.png"], "not found"),
    ("cocosnet.infer", ["--match_kernel", "2", "--input", "a", "--exemplar", "b", "--out", "c"], "--match_kernel must be an odd"),
])
def test_cli_errors_are_one_line_not_tracebacks(module, argv, message):
    result = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode != 0
    assert f"python -m {module}: error:" in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr
