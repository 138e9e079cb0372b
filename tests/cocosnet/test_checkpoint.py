"""Crash-safe training state: atomic files, checksums, keep-K, and a training that is killed
(SIGKILL at random points and mid-save, SIGTERM) and resumed ending bit-identical to one that never
stopped."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cocosnet.checkpoint import CheckpointManager, save_atomic
from cocosnet.options import parse

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from test_train import TinyModel, tiny_args  # noqa: E402


def test_save_keeps_newest_k_and_cleans_temporaries(tmp_path):
    m = CheckpointManager(tmp_path, keep=2)
    (tmp_path / ".tmp-state_000000009.abc.pt.123").write_bytes(b"half a file")  # a crash's leftover
    for step in (1, 2, 3):
        m.save({"step": step, "w": torch.full((3,), float(step))}, step)
    assert [int(p.name.split("_")[1].split(".")[0]) for p in m.paths()] == [2, 3]
    assert not list(tmp_path.glob(".tmp-*"))
    state, path = m.latest()
    assert state["step"] == 3 and torch.equal(state["w"], torch.full((3,), 3.0))


def test_damaged_newest_falls_back_to_previous(tmp_path, caplog):
    m = CheckpointManager(tmp_path, keep=3)
    m.save({"step": 1}, 1)
    newest = m.save({"step": 2}, 2)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # bit rot
    newest.write_bytes(bytes(data))
    state, path = m.latest()
    assert state["step"] == 1
    assert "damaged" in caplog.text and newest.name in caplog.text


def test_no_checkpoint_and_bad_keep(tmp_path):
    assert CheckpointManager(tmp_path / "none").latest() is None
    with pytest.raises(ValueError, match="keep must be an integer >= 1, got 0"):
        CheckpointManager(tmp_path, keep=0)


def test_save_atomic_replaces_whole_file(tmp_path):
    p = tmp_path / "1_net_G.pth"
    save_atomic({"a": torch.ones(2)}, p)
    save_atomic({"a": torch.zeros(2)}, p)
    assert torch.equal(torch.load(p, weights_only=True)["a"], torch.zeros(2)) and not list(tmp_path.glob(".tmp-*"))


# A training process the test can kill. FAULT=<n>:half|full makes the process's n-th atomic write of
# a training state write half (or all) of its temporary file and then SIGKILL itself before the rename.
DRIVER = """
import os, signal, sys
sys.path.insert(0, {here!r})
import cocosnet.checkpoint as cp
fault = os.environ.get("FAULT")
if fault:
    n, how = fault.split(":")
    real, calls = cp.write_atomic, [0]
    def faulty(path, data):
        calls[0] += path.name.startswith("state_")
        if calls[0] == int(n):
            with open(path.with_name(".tmp-" + path.name + "." + str(os.getpid())), "wb") as f:
                f.write(data if how == "full" else data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, data)
    cp.write_atomic = faulty
from test_train import TinyModel
from cocosnet.train import main
main(sys.argv[1:], model_factory=TinyModel)
"""


def _state_equal(a, b, where="state") -> list[str]:
    if isinstance(a, torch.Tensor):
        return [] if isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b) else [where]
    if isinstance(a, np.ndarray):
        return [] if isinstance(b, np.ndarray) and np.array_equal(a, b) else [where]
    if isinstance(a, dict):
        if set(a) != set(b):
            return [f"{where}: keys differ"]
        return [d for k in a for d in _state_equal(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _state_equal(x, y, f"{where}[{i}]")]
    return [] if a == b else [where]


def test_killed_and_resumed_training_is_bit_identical(tmp_path):
    # save_latest_freq 1: a save after every iteration, so a kill lands near (or inside) one.
    common = ["--save_latest_freq", "1", "--no_tensorboard", "--display_freq", "1000", "--keep_checkpoints", "2"]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from cocosnet.trainer import Trainer
        ref = Trainer(parse(tiny_args(tmp_path / "ref", *common), mode="train"), TinyModel)
        ref.train()
        expected = ref.state_dict()
    finally:
        torch.set_num_threads(threads)

    run_dir = tmp_path / "crash"
    args = tiny_args(run_dir, *common)
    state_dir = run_dir / "tiny" / "state"
    (tmp_path / "driver.py").write_text(DRIVER.format(here=str(HERE)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    log = [f"seed {seed}"]

    def launch(fault=None, resume=True):
        e = dict(env, FAULT=fault) if fault else env
        return subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), *args,
                                 *(["--continue_train"] if resume else [])],
                                cwd=tmp_path, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_for_new_state(proc, before):
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if {p.name for p in state_dir.glob("state_*")} - before:
                return True
            time.sleep(0.02)
        return False

    # 1. killed inside the 4th save, half its temporary file written
    p = launch("4:half", resume=False)
    assert p.wait(60) == -signal.SIGKILL, p.stderr.read().decode()[-2000:]
    log.append(f"mid-save kill (half) -> {[q.name[:15] for q in state_dir.glob('*')]}")
    # 2. resumed, killed after writing a whole temporary file but before its rename
    p = launch("3:full")
    assert p.wait(60) == -signal.SIGKILL, p.stderr.read().decode()[-2000:]
    # 3. resumed, SIGKILL at a random moment of training
    before = {q.name for q in state_dir.glob("state_*")}
    p = launch()
    assert wait_for_new_state(p, before) or p.wait(60) == 0, p.stderr.read().decode()[-2000:]
    delay = rng.uniform(0.0, 0.4)
    time.sleep(delay)
    p.kill()
    p.wait(60)
    log.append(f"random kill {delay:.3f} s after a save")
    # 4. resumed, SIGTERM: saves and exits with 128 + 15
    before = {q.name for q in state_dir.glob("state_*")}
    p = launch()
    assert wait_for_new_state(p, before) or p.wait(60) == 0, p.stderr.read().decode()[-2000:]
    time.sleep(rng.uniform(0.0, 0.2))
    p.send_signal(signal.SIGTERM)
    rc = p.wait(60)
    err = p.stderr.read().decode()
    # The run finished before the signal arrived (exit 0), or while the process was exiting after its
    # last save, with the handler already restored (killed by the default action): nothing to check.
    if rc == 0 or (rc == -signal.SIGTERM and CheckpointManager(state_dir).latest()[0]["step"] == 24):
        log.append("SIGTERM arrived after the run finished")
    else:
        assert rc == 128 + signal.SIGTERM, err[-2000:]
        assert "(signal SIGTERM)" in err, err[-2000:]
    # 5. resumed to the end
    p = launch()
    assert p.wait(120) == 0, p.stderr.read().decode()[-2000:]

    final, path = CheckpointManager(state_dir).latest()
    assert final["step"] == expected["step"] == 24
    diffs = [d for key in ("nets", "optimizer_G", "optimizer_D", "scheduler_G", "scheduler_D", "rng")
             for d in _state_equal(expected[key], final[key], key)]
    assert not diffs, f"{'; '.join(log)}: differs from the uninterrupted run in {diffs[:10]}"
    assert not list(state_dir.glob(".tmp-*"))


class _Payload:
    """Unpickling this creates `marker`: what a malicious file's code would do instead."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _malicious(path: Path, marker: Path) -> Path:
    torch.save({"step": 1, "w": torch.ones(2), "payload": _Payload(marker)}, path)
    return path


def test_malicious_training_state_is_refused_and_runs_nothing(tmp_path):
    import hashlib

    marker = tmp_path / "pwned"
    data = _malicious(tmp_path / "evil.pt", marker).read_bytes()
    (tmp_path / f"state_000000007.{hashlib.sha256(data).hexdigest()}.pt").write_bytes(data)  # a valid name
    with pytest.raises(ValueError, match=r"training state .*state_000000007.* refusing to unpickle"):
        CheckpointManager(tmp_path).latest()
    assert not marker.exists()


def test_malicious_reference_checkpoint_and_vgg_weights_are_refused(tmp_path):
    from argparse import Namespace

    from torch import nn

    from cocosnet.convert import load_reference_checkpoints
    from cocosnet.models.vgg import build_vgg

    marker = tmp_path / "pwned"
    _malicious(tmp_path / "latest_net_G.pth", marker)
    with pytest.raises(ValueError, match=r"reference checkpoint .*latest_net_G.pth.* refusing to unpickle"):
        load_reference_checkpoints(nn.ModuleDict({"netG": nn.Linear(1, 1)}), str(tmp_path))
    opt = Namespace(vgg_random_init=False, vgg_path=str(_malicious(tmp_path / "vgg19_conv.pth", marker)),
                    vgg_convention="auto", vgg_normal_correct=True)
    with pytest.raises(ValueError, match=r"VGG-19 weights --vgg_path .*vgg19_conv.pth.* refusing to unpickle"):
        build_vgg(opt)
    assert not marker.exists()
