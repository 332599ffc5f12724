"""RUN/progress.png: losses and FID/KID over steps."""

from __future__ import annotations

import pytest
from PIL import Image

from imgaug_gen.errors import ConfigError


def test_training_writes_progress_png(trained_cgan):
    with Image.open(trained_cgan / "progress.png") as im:
        assert im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 250


def test_progress_plot_from_sparse_csv_and_errors(tmp_path):
    from imgaug_gen.visual import progress_plot

    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,global_step,step,train/loss,val/fid,val/kid\n0,,9,0.5,,\n0,,19,0.4,,\n"
                   "0,40,19,,120.0,0.5\n0,,29,0.3,,\n0,80,39,,3.0,0.01\n")
    out = progress_plot(csv, tmp_path / "sub" / "progress.png")
    with Image.open(out) as im:
        assert im.format == "PNG"
    assert not list((tmp_path / "sub").glob(".*tmp*"))
    with pytest.raises(ConfigError, match="nope.csv"):
        progress_plot(tmp_path / "nope.csv", tmp_path / "p.png")
