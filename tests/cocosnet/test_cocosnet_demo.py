"""`python -m cocosnet.demo`: a tiny CoCosNet (a step of correspondence learning, a step on synthetic
data), then run on a real ADE20K pair, written as one PNG grid; its options and their errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cocosnet import demo

ROOT = Path(__file__).resolve().parents[2]
OPTIONS = ("--steps", "--corr_steps", "--corr_checkpoint", "--size", "--width", "--pairs", "--backend", "--seed",
           "--threads", "--data", "--work_dir", "--out")


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        demo.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in OPTIONS:
        assert option in text
    for backend in demo.ck.backend_names():
        assert backend in text
    actions = [a for a in demo.build_parser()._actions if a.option_strings and a.dest != "help"]
    assert sorted(a.option_strings[0] for a in actions) == sorted(OPTIONS)  # nothing undocumented here
    assert all(a.help for a in actions)


@pytest.mark.parametrize("argv, message", [
    (["--size", "100"], "--size must be a multiple of 32 from 64 to 512 (the generator starts at size/32), got 100"),
    (["--size", "32"], "--size must be a multiple of 32 from 64 to 512"),
    (["--size", "big"], "argument --size: invalid int value: 'big'"),
    (["--steps", "0"], "argument --steps: --steps must be >= 1, got 0"),
    (["--steps", "x"], "argument --steps: --steps must be an integer, got 'x'"),
    (["--corr_steps", "0"], "argument --corr_steps: --corr_steps must be >= 1, got 0"),
    (["--corr_checkpoint", "/nonexistent.pt"], "--corr_checkpoint '/nonexistent.pt': no such file"),
    (["--pairs", "99"], "--pairs must be at most 6 (the pairs in"),
    (["--width", "12"], "--width must be a multiple of 8"),
    (["--backend", "nope"], "argument --backend: invalid choice: 'nope' (choose from"),
    (["--out", "grid.jpg"], "--out must be a .png file, got 'grid.jpg'"),
    (["--data", "/nonexistent"], "--data '/nonexistent': no pairing list"),
])
def test_bad_arguments_name_the_option_and_value(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        demo.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_unusable_backend_is_refused(capsys):
    # cuda (and triton without the interpreter) cannot take CPU tensors: refused before any work.
    with pytest.raises(SystemExit) as e:
        demo.parse_args(["--backend", "cuda"])
    assert e.value.code == 2
    assert "--backend cuda cannot run on the CPU here" in capsys.readouterr().err


def test_demo_trains_infers_and_writes_the_grid(tmp_path):
    """The smallest run (1 + 1 steps, 64 px), through the command line: ~30-60 s on 2 loaded cores."""
    size, out, work = 64, tmp_path / "grid.png", tmp_path / "work"
    run = subprocess.run([sys.executable, "-m", "cocosnet.demo", "--corr_steps", "1", "--steps", "1", "--size", str(size),
                          "--width", "8", "--pairs", "1", "--backend", "cpu", "--work_dir", str(work), "--out", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "after 1 step(s) of correspondence learning (held-out end-point error" in run.stdout
    assert "untrained" in run.stdout.lower() and "not a photo" in run.stdout
    assert "backend cpu" in run.stdout and "train " in run.stdout and "inference " in run.stdout
    assert (work / demo.RUN_NAME / "latest_net_G.pth").is_file()

    # draw_grid's layout: a header of titles, one row of 5 tiles, then the footer note.
    pad, header = max(2, size // 64), 3 * max(8, size // 16)
    sheet = np.array(Image.open(out).convert("RGB"))
    assert sheet.shape[1] == 5 * (size + pad) + pad
    assert sheet.shape[0] > header + size + 2 * pad
    tiles = [sheet[header:header + size, pad + c * (size + pad):pad + c * (size + pad) + size] for c in range(5)]

    label_path, exemplar_path = demo.read_pairs(demo.DEFAULT_DATA)[0]
    expected = demo.row(demo.parse_args(["--size", str(size), "--steps", "1"]), label_path, exemplar_path,
                        work / "pairs" / f"{label_path.stem}.png", work / "pairs" / f"{label_path.stem}_warp.png")
    names = ("label map", "exemplar", "warp", "output", "ground truth")
    for name, tile, want in zip(names, tiles, expected):
        assert np.array_equal(tile, np.array(want)), f"the {name} tile is not where the layout puts it"
    warp = np.array(Image.open(work / "pairs" / f"{label_path.stem}_warp.png"))
    assert warp.shape == (size, size, 3) and warp.std() > 1  # the warp carries exemplar colours, not a flat fill
