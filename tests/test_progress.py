"""RUN/progress.png: losses and FID/KID over optimiser steps."""

from __future__ import annotations

import csv
import logging
from types import SimpleNamespace

import pytest
from PIL import Image

from imgaug_gen.errors import ConfigError


def test_training_writes_progress_png(trained_cgan):
    from imgaug_gen.visual import _optimiser_steps_per_batch

    png = trained_cgan / "progress.png"
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 250
    assert 5_000 < png.stat().st_size < 2_000_000
    assert not list(trained_cgan.glob(".progress.png*"))  # no temp file left behind
    # A GAN iteration is 2 optimiser steps: the plot's x axis is read back as optimiser steps.
    with open(trained_cgan / "metrics.csv", newline="") as f:
        assert _optimiser_steps_per_batch(list(csv.DictReader(f))) == 2


def test_progress_plot_from_sparse_csv_and_errors(tmp_path):
    from imgaug_gen.visual import progress_plot

    full = tmp_path / "metrics.csv"
    full.write_text(
        "epoch,global_step,step,train/loss,val/fid,val/kid\n0,,9,0.5,,\n0,,19,0.4,,\n"
        "0,40,19,,120.0,0.5\n0,,29,0.3,,\n0,80,39,,3.0,0.01\n"
    )
    out = progress_plot(full, tmp_path / "sub" / "progress.png")
    with Image.open(out) as im:
        assert im.format == "PNG"
    assert out == tmp_path / "sub" / "progress.png"
    assert not list((tmp_path / "sub").glob(".*tmp*"))

    # Missing columns are skipped: losses only, FID only, header only.
    for name, text in {
        "losses": "epoch,step,train/d_loss,train/g_loss\n0,9,1.0,2.0\n0,19,0.9,1.5\n",
        "fid": "global_step,step,val/fid\n8.0,3,423.2\n",
        "empty": "epoch,step\n",
    }.items():
        (tmp_path / f"{name}.csv").write_text(text)
        with Image.open(progress_plot(tmp_path / f"{name}.csv", tmp_path / f"{name}.png")) as im:
            assert im.format == "PNG"

    with pytest.raises(ConfigError, match="nope.csv"):
        progress_plot(tmp_path / "nope.csv", tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()


def test_progress_callback_without_csv_logger_logs_once(tmp_path, caplog):
    from imgaug_gen.callbacks import ProgressPlotCallback

    cb = ProgressPlotCallback(str(tmp_path / "progress.png"), every_n_steps=2)
    trainer = SimpleNamespace(global_step=2, is_global_zero=True, loggers=[], logger=None)
    with caplog.at_level(logging.INFO, logger="imgaug_gen.callbacks"):
        cb.on_train_batch_end(trainer, None)
        trainer.global_step = 4
        cb.on_train_batch_end(trainer, None)
        cb.on_train_end(trainer, None)
    assert not (tmp_path / "progress.png").exists()
    assert len([r for r in caplog.records if "No CSV logger" in r.getMessage()]) == 1

    # Not rank 0: nothing written, no logger touched.
    cb = ProgressPlotCallback(str(tmp_path / "progress.png"), every_n_steps=2)
    trainer = SimpleNamespace(global_step=2, is_global_zero=False, loggers=[object()], logger=object())
    assert cb.write(trainer) is None and not (tmp_path / "progress.png").exists()
