"""Pseudo-exemplar pairs with a known correspondence, and a short learning run (slow)."""
import random

import pytest
import torch

from cocosnet import correspondence_learning as cl

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_benchmark_reports_and_option_errors(tmp_path, capsys):
    from benchmarks import correspondence_learning as bench

    args = bench.parse_args(["--steps", "2", "--eval_every", "1"])
    metrics = [{"epe": 8.0 - s, "label_accuracy": 0.3 + s / 10, "retrieval_label_accuracy": 0.2} for s in range(3)]
    history = {"steps": [1, 2], "seconds": [1.0, 2.0], "losses": {"domain": [2.0, 1.0], "warp": [30.0, 20.0]},
               "evals": list(enumerate(metrics))}
    report = bench.learning_report(args, history, "2026-01-01 00:00")
    assert "| EPE (cells, lower is better) | 8.000 | 6.000 |" in report and report.count("\n| ") == 8
    bench.plot(history, tmp_path / "curve.png", "title")
    assert (tmp_path / "curve.png").stat().st_size > 0
    other = {**history, "losses": {"domain": [2.0, 1.5], "warp": [30.0, 20.0]}}
    assert "Largest relative difference: 5.0e-01" in bench.backends_report(args, {"reference": history, "cpu": other}, "now")
    assert bench.recorded(args)["data"] == "data/cocosnet-samples"
    for argv, message in ((["--size", "100"], "--size must be a multiple of 32"), (["--width", "12"], "multiple of 8"),
                          (["--synthetic_fraction", "2"], "--synthetic_fraction must lie in [0, 1]")):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        assert message in capsys.readouterr().err
