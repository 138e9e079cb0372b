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
    printed = capsys.readouterr().out
    assert "backend: reference" in printed and f"wrote {out}" in printed


def test_help_documents_every_option():
    result = subprocess.run([sys.executable, "-m", "cocos_kernels.demo", "--help"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for option in ("--data", "--dataset", "--size", "--pairs", "--backend", "--out"):
        assert option in result.stdout
