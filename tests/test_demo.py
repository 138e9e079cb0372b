"""The demo runs end to end on the bundled samples and writes a readable PNG grid."""
import subprocess
import sys
from pathlib import Path

from PIL import Image

from cocos_kernels import demo

REPO = Path(__file__).resolve().parents[1]


def test_demo_writes_png_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    # The reference backend needs no C++ build and is quick at 64 px; the fused kernels have their
    # own tests, this one covers the data loading, features and drawing.
    assert demo.main(["--size", "64", "--pairs", "1", "--backend", "reference", "--out", str(out)]) == out
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        # Five 64 px tiles with 2 px gaps across; a 24 px title band and one row down.
        assert (img.format, img.mode, img.size) == ("PNG", "RGB", (5 * 66 + 2, 24 + 66 + 2))
    with Image.open(tmp_path / "grid_matches.png") as img:
        assert img.format == "PNG" and img.size[0] > 400
    printed = capsys.readouterr().out
    assert "backend: reference" in printed and f"wrote {out}" in printed


def test_help_documents_every_option():
    result = subprocess.run([sys.executable, "-m", "cocos_kernels.demo", "--help"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for option in ("--data", "--dataset", "--size", "--pairs", "--backend", "--out"):
        assert option in result.stdout


def test_plot_matches_marks_the_argmax_and_rejects_bad_points(tmp_path):
    import pytest
    import torch

    from cocos_kernels.visualize import plot_matches

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 8, 6, 7, generator=g), torch.randn(1, 8, 5, 4, generator=g)
    image = torch.rand(3, 24, 28, generator=g)
    fig = plot_matches(image, image[:, :20, :16], q, k, n_points=6, out=tmp_path / "m.png")
    assert len(fig.axes) == 2 + 6 and (tmp_path / "m.png").stat().st_size > 0
    with pytest.raises(ValueError, match=r"point \(6, 0\) lies outside the query grid \(6, 7\)"):
        plot_matches(image, image, q, k, points=[(6, 0)])
    with pytest.raises(ValueError, match="query_image must be a"):
        plot_matches(image[0], image, q, k)


def test_bad_arguments_name_the_option(tmp_path, capsys):
    import pytest

    for argv, message in ((["--size", "30"], "--size must be a multiple of 4"),
                          (["--pairs", "0"], "--pairs must be at least 1, got 0"),
                          (["--data", str(tmp_path)], f"--data {tmp_path}: no pairing list")):
        with pytest.raises(SystemExit):
            demo.parse_args(argv)
        assert message in capsys.readouterr().err  # argparse prints it on stderr before exiting
    result = subprocess.run([sys.executable, "-m", "cocos_kernels.demo", "--data", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no pairing list" in result.stderr
