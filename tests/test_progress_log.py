"""Progress a person can follow: plain lines in a log file, a step-counted bar on a terminal, no adverts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from types import SimpleNamespace

import fastcli
import pytest
import torch

from imgaug_gen.errors import ConfigError

from conftest import ROOT, cli_env, train_overrides

LINE = re.compile(r"^step (\d+)/8 \(\d+%\)  train/d_loss=\S+  train/g_loss=\S+  (\S+) it/s  ETA \S+  elapsed \S+$")


def _train_cmd(run, *extra):
    over = [
        o
        for o in train_overrides("cgan", run, "callbacks.fidelity.every_n_steps=0")
        if not o.startswith(("run_dir", "trainer.enable_progress_bar"))
    ]  # the bar as configured by default (debug=tiny turns it off)
    return [
        sys.executable,
        str(ROOT / "train.py"),
        *over,
        "trainer.enable_progress_bar=true",
        f"hydra.run.dir={run}",
        *extra,
    ]


def test_log_file_gets_plain_progress_lines(tmp_path):
    log = tmp_path / "train.out"
    with open(log, "w") as f:  # stdout is a file, as under SLURM / CI / tee
        done = fastcli.run(
            _train_cmd(tmp_path / "run", "callbacks.progress_log.every_n_steps=2"),
            cwd=tmp_path,
            env=cli_env(),
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=600,
        )
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    lines = [m for m in (LINE.match(s) for s in text.splitlines()) if m]
    assert [int(m.group(1)) for m in lines] == [2, 4, 6, 8], text[-3000:]
    assert all(float(m.group(2)) > 0 for m in lines)
    assert "Tip:" not in text and "litlogger" not in text and "litmodels" not in text
    assert "/-2" not in text and "Epoch 0" not in text and "\r" not in text  # no progress bar redraws in a file


def test_every_n_steps_0_and_enabled_false_print_nothing(tmp_path):
    for i, extra in enumerate(("callbacks.progress_log.every_n_steps=0", "callbacks.progress_log.enabled=false")):
        done = fastcli.run(
            _train_cmd(tmp_path / f"run{i}", extra, "trainer.enable_progress_bar=false"),
            cwd=tmp_path,
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert not re.search(r"^step \d+/8", done.stdout, re.M), done.stdout[-2000:]
        assert "Tip:" not in done.stdout + done.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pty")
def test_terminal_gets_the_step_counted_bar(tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = fastcli.Popen(
        _train_cmd(tmp_path / "run", "callbacks.progress_log.every_n_steps=2"),
        cwd=tmp_path,
        env=cli_env(),
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(timeout=600) == 0
    text = out.decode(errors="replace")
    assert "step 8/8" in text and "100%" in text and "step/s" in text, text[-3000:]
    assert "/-2" not in text and "Tip:" not in text
    assert not LINE.search(text.replace("\r", "\n"))  # on a terminal (auto) the bar, not the plain lines


def _trainer(step, max_steps=8, rank0=True, **metrics):
    return SimpleNamespace(
        global_step=step,
        max_steps=max_steps,
        current_epoch=0,
        is_global_zero=rank0,
        callback_metrics={k: torch.tensor(v) for k, v in metrics.items()},
    )


def test_progress_log_callback_lines(capsys, monkeypatch):
    from imgaug_gen import callbacks
    from imgaug_gen.callbacks import ProgressLogCallback

    monkeypatch.setattr(callbacks, "_stdout_is_terminal", lambda: True)
    assert not ProgressLogCallback(every_n_steps=2).active  # auto on a terminal: the bar
    assert ProgressLogCallback(every_n_steps=2, enabled=True).active
    assert not ProgressLogCallback(every_n_steps=2, enabled=True).replaces_progress_bar
    monkeypatch.setattr(callbacks, "_stdout_is_terminal", lambda: False)
    cb = ProgressLogCallback(every_n_steps=2)
    assert cb.active and cb.replaces_progress_bar
    assert not ProgressLogCallback(every_n_steps=0).active and not ProgressLogCallback(2, enabled=False).active
    with pytest.raises(ConfigError, match="progress_log.enabled"):
        ProgressLogCallback(enabled="sometimes")

    cb.on_train_start(_trainer(0), None)
    for step in (1, 2, 3, 4):
        cb.on_train_batch_end(_trainer(step, loss=0.5), None)
    cb.on_train_end(_trainer(4, loss=0.25), None)  # already printed at 4: not again
    cb.on_train_batch_end(_trainer(6, rank0=False, loss=0.1), None)  # not rank 0: silent
    out = capsys.readouterr().out.splitlines()
    assert [s.split("  ")[0] for s in out] == ["step 2/8 (25%)", "step 4/8 (50%)"]
    assert "loss=0.5" in out[0] and "it/s" in out[0] and "ETA" in out[0]
    # an epoch-budgeted run (max_steps=-1): no fraction, no ETA
    line = ProgressLogCallback(every_n_steps=2, enabled=True).line(_trainer(5, max_steps=-1))
    assert line.startswith("step 5 (epoch 0)") and "ETA" not in line and "/-" not in line


def test_progress_log_config_is_checked(tmp_path):
    from imgaug_gen.config import compose_config
    from imgaug_gen.jobs.train import check_train_config

    with pytest.raises(ConfigError, match=r"callbacks.progress_log.every_n_steps` = -1"):
        check_train_config(compose_config("train", [f"run_dir={tmp_path}", "callbacks.progress_log.every_n_steps=-1"]))
    with pytest.raises(ConfigError, match=r"callbacks.progress_log.every_n_step` is not an argument"):
        check_train_config(compose_config("train", [f"run_dir={tmp_path}", "+callbacks.progress_log.every_n_step=5"]))


def test_lightning_tips_are_filtered():
    import logging

    from imgaug_gen.jobs.train import quiet_lightning_tips

    quiet_lightning_tips()
    quiet_lightning_tips()  # idempotent
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    assert len(logger.filters) == len({type(f) for f in logger.filters})
    tip = logger.makeRecord(logger.name, logging.INFO, "x", 1, "💡 Tip: For seamless cloud ...", (), None)
    other = logger.makeRecord(logger.name, logging.INFO, "x", 1, "GPU available: False", (), None)
    assert not logger.filter(tip) and logger.filter(other)
