"""Pseudo-exemplar pairs with a known correspondence, and a short learning run (slow)."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cocosnet import correspondence_learning as cl

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]


def _scene(side: int) -> cl.Scene:
    """Every pixel's colour encodes where it is: red = column, green = row."""
    y, x = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32), indexing="ij")
    photo = torch.stack([x / side * 2 - 1, y / side * 2 - 1, torch.zeros_like(x)])
    return cl.Scene(label=torch.ones(1, side, side), photo=photo)


def test_pairs_know_where_each_input_cell_lies_in_the_exemplar():
    size, down, side = 64, 4, 80
    rng = random.Random(0)
    views = [cl.draw_views(rng, size, side) for _ in range(6)]
    views.append((views[0][0], views[0][0]))  # the exemplar is the input: each cell is where it was
    pair = cl.make_pair([_scene(side)] * len(views), views, size, down)
    h = size // down
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(h, dtype=torch.float64), indexing="ij")
    torch.testing.assert_close(pair.target[-1], torch.stack([rows, cols], -1), rtol=0, atol=1e-9)
    # The exemplar's pooled colour at a cell's target (bilinear) is the input cell's pooled colour.
    pooled_in = torch.nn.functional.avg_pool2d(pair.image, down)
    pooled_ex = torch.nn.functional.avg_pool2d(pair.ref, down)
    xy = torch.stack([(pair.target[..., 1] + 0.5) * 2 / h - 1, (pair.target[..., 0] + 0.5) * 2 / h - 1], -1)
    at_target = torch.nn.functional.grid_sample(pooled_ex, xy.float(), align_corners=False)
    inside = ((pair.target > 0.5) & (pair.target < h - 1.5)).all(-1)  # away from the border's padding
    assert inside.float().mean() > 0.5
    error = (at_target - pooled_in)[:, :2].abs().amax(1)[inside]
    # colours change by 2/80 per pixel: within a pixel (the rest: cells at the scene's edge, half padding)
    assert error.quantile(0.95) < 0.03 and error.median() < 0.005, (error.quantile(0.95), error.median())


def test_labels_stay_whole_and_outside_is_other():
    side = 80
    scene = _scene(side)
    scene.label = torch.randint(1, 5, (1, side, side)).float()
    input_view, _ = cl.draw_views(random.Random(1), 64, side)
    far = input_view.clone()
    far[:, 2] += 3.0  # the exemplar view entirely off the scene
    pair = cl.make_pair([scene], [(input_view, far)], 64, 4)
    assert pair.label.dtype == torch.int64 and set(pair.label.unique().tolist()) <= {1, 2, 3, 4}
    assert (pair.label_ref == cl.OTHER).all()


@pytest.mark.slow
def test_a_short_run_learns_the_correspondence():
    """25 steps improve both held-out metrics clearly over the untrained network (the measured run, 150 steps:
    EPE 8.7 -> 4.1 cells and label accuracy 0.29 -> 0.81 by step 25)."""
    opt = cl.build_options(size=64, width=8)
    torch.manual_seed(0)
    net = cl.build_network(opt)
    data = cl.load_data(opt, synthetic=16)
    history = cl.train(net, data, steps=25, eval_every=0)
    (_, before), (_, after) = history["evals"]
    assert after["epe"] < 0.7 * before["epe"], (before, after)
    assert after["label_accuracy"] > before["label_accuracy"] + 0.2, (before, after)


def _benchmark(*argv: str) -> subprocess.CompletedProcess:
    """`python -m benchmarks.correspondence_learning ARGV` from the repository root, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "benchmarks.correspondence_learning", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_benchmark_writes_its_reports(tmp_path):
    small = ("--size", "64", "--width", "8", "--batch", "2", "--synthetic", "4", "--threads", "1",
             "--out_dir", str(tmp_path))
    proc = _benchmark(*small, "--steps", "2", "--eval_every", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "correspondence_learning-64px.md").read_text()
    assert "| EPE (cells, lower is better) |" in report and "| step |" in report
    # the data folder as the repository names it, not this machine's path
    assert json.loads((tmp_path / "correspondence_learning-64px.json").read_text())["args"]["data"] == "data/cocosnet-samples"
    assert (tmp_path / "correspondence_learning-64px.png").stat().st_size > 0
    proc = _benchmark(*small, "--steps", "1", "--compare_backends", "--backend", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Largest relative difference:" in (tmp_path / "correspondence_learning-backends-64px.md").read_text()


@pytest.mark.parametrize("argv, message", [(("--size", "100"), "--size must be a multiple of 32"),
                                           (("--width", "12"), "multiple of 8"),
                                           (("--synthetic_fraction", "2"), "--synthetic_fraction must lie in [0, 1]")])
def test_benchmark_option_errors(argv, message):
    proc = _benchmark(*argv)
    assert proc.returncode == 2 and message in proc.stderr
