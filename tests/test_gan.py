"""cGAN training: exact resume, learning signal, the two front ends end to end."""

from __future__ import annotations

import json
import os
import sys

import fastcli
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from imgaug_gen.config import compose_config
from imgaug_gen.errors import ConfigError
from imgaug_gen.jobs.train import train

from conftest import ROOT, cli_env, train_overrides


def _weights(run_dir):
    return load_file(str(run_dir / "generator" / "model.safetensors"))


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_while_training_only(tmp_path, channels_last):
    """model.channels_last: the networks train in NHWC, the saved generator is contiguous and samples
    the same as the in-memory EMA network it was saved from."""
    from imgaug_gen.generators.base import load_generator

    cfg = compose_config(
        "train",
        train_overrides(
            "cgan", tmp_path / "run", "trainer.max_steps=2", f"model.channels_last={str(channels_last).lower()}"
        ),
    )
    _, objects = train(cfg)
    weights = [p for p in objects["module"].parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[2] > 1]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) == channels_last for p in weights)
    assert all(p.is_contiguous() != channels_last for p in weights)
    saved = load_generator(tmp_path / "run" / "generator")
    assert all(t.is_contiguous() for t in _weights(tmp_path / "run").values())
    live = objects["module"].to_generator()
    assert np.array_equal(saved.sample([0, 1, 2], seeds=3), live.sample([0, 1, 2], seeds=3))


def test_exact_resume_matches_uninterrupted_run(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(
        compose_config("train", train_overrides("cgan", straight, "trainer.max_steps=8", "trainer.log_every_n_steps=1"))
    )
    train(
        compose_config("train", train_overrides("cgan", resumed, "trainer.max_steps=4", "trainer.log_every_n_steps=1"))
    )
    ckpt = resumed / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # loadable without unpickling code
    assert state["global_step"] == 4 and state["gan_iteration"] == 2
    metrics, _ = train(
        compose_config(
            "train",
            train_overrides("cgan", resumed, "trainer.max_steps=8", "trainer.log_every_n_steps=1", f"ckpt_path={ckpt}"),
        )
    )
    assert metrics["global_step"] == 8
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the interrupted run's log rows are kept, the resumed ones appended: the same rows as the straight run
    assert _csv_rows(resumed) == _csv_rows(straight) and len(_csv_rows(straight)) >= 4


def _csv_rows(run_dir) -> list[dict]:
    import csv

    with open(run_dir / "metrics.csv", newline="") as f:
        return sorted((dict(r) for r in csv.DictReader(f)), key=lambda r: (float(r["step"]), sorted(r.items())))


def test_resume_drops_log_rows_written_after_the_checkpoint(tmp_path):
    """Killed at step 6 with its last checkpoint at 4: the resumed run's metrics.csv has each step once."""
    import shutil

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    log_all = "trainer.log_every_n_steps=1"
    train(compose_config("train", train_overrides("cgan", straight, "trainer.max_steps=8", log_all)))
    train(compose_config("train", train_overrides("cgan", killed, "trainer.max_steps=4", log_all)))
    ckpt = shutil.copy(killed / "checkpoints" / "last.ckpt", tmp_path / "step4.ckpt")
    train(
        compose_config("train", train_overrides("cgan", killed, "trainer.max_steps=6", log_all, f"ckpt_path={ckpt}"))
    )  # ... logged up to 6, then "killed"
    assert max(float(r["step"]) for r in _csv_rows(killed)) == 2  # GAN iterations 0..2 (optimiser steps 2..6)
    train(compose_config("train", train_overrides("cgan", killed, "trainer.max_steps=8", log_all, f"ckpt_path={ckpt}")))
    steps = [float(r["step"]) for r in _csv_rows(killed) if r.get("train/d_loss")]
    assert steps == [0, 1, 2, 3]
    assert _csv_rows(killed) == _csv_rows(straight)


def test_training_lowers_fid(tmp_path):
    """A short run on digits already beats the untrained generator on domain-feature FID."""
    run = tmp_path / "run"
    over = train_overrides(
        "cgan",
        run,
        "trainer.max_steps=160",
        "model.g_width=16",
        "model.d_width=16",
        "data.shots=20",
        "data.batch_size=32",
        "callbacks.fidelity.every_n_steps=0",
        "callbacks.fidelity.n_per_class=20",
        "callbacks.samples.every_n_steps=0",
        "callbacks.checkpoint.every_n_train_steps=0",
    )
    untrained = train(compose_config("train", over + ["trainer.max_steps=2"]))[0]["val/fid"]
    trained = train(compose_config("train", over + [f"run_dir={tmp_path / 'run2'}"]))[0]["val/fid"]
    assert trained < 0.7 * untrained, (trained, untrained)


def test_data_errors_stop_before_training(tmp_path):
    with pytest.raises(ConfigError, match="data.root"):
        train(
            compose_config(
                "train", train_overrides("cgan", tmp_path / "run", "data=folder", f"data.root={tmp_path / 'nope'}")
            )
        )
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(ConfigError, match="`ckpt_path`"):
        train(compose_config("train", train_overrides("cgan", tmp_path / "run", "ckpt_path=/nonexistent.ckpt")))


def _run(args, env, cwd):
    out = fastcli.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def test_front_ends_end_to_end_on_a_user_folder(tiny_folder, tmp_path):
    """train.py then generate.py as a user runs them, on an RGB folder with odd class names."""
    env = cli_env()
    run, out = tmp_path / "run", tmp_path / "out"
    over = [o for o in train_overrides("cgan", run) if not o.startswith(("data", "run_dir"))]
    _run(
        [
            "train.py",
            *over,
            "data=folder",
            f"data.root={tiny_folder}",
            "data.image_size=16",
            "data.channels=3",
            "data.shots=5",
            "data.batch_size=8",
            f"hydra.run.dir={run}",
        ],
        env,
        ROOT,
    )
    assert (run / "generator" / "config.json").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "samples").glob("step_*.png"))
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert "val/fid" in header and "val/kid" in header
    res = _run(
        [
            "generate.py",
            f"run_dir={run}",
            f"out_dir={out}",
            "n_per_class=3",
            "seed=0",
            "include_real=true",
            "metrics.domain_steps=60",
        ],
        env,
        ROOT,
    )
    assert "FID=" in res.stdout and str(out / "train") in res.stdout
    classes = sorted(p.name for p in (out / "train").iterdir() if p.is_dir())
    assert classes == ["one one", "zero", "zwei_ü"]
    for c in classes:
        assert len(list((out / "train" / c).glob("*.png"))) == 3 + 5
    from PIL import Image

    img = Image.open(next((out / "train" / "zero").glob("syn_*.png")))
    assert img.size == (16, 16) and img.mode == "RGB"
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_synthetic"] == 9 and m["n_real"] == 15 and np.isfinite(m["fid"])


def test_cli_errors_are_clean(tmp_path):
    env = dict(os.environ)
    out = fastcli.run(
        [
            sys.executable,
            "train.py",
            "data=folder",
            f"data.root={tmp_path / 'missing'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert out.returncode == 2 and "error:" in out.stderr and "data.root" in out.stderr
    assert "Traceback" not in out.stderr
    typo = fastcli.run(
        [sys.executable, "train.py", "trainer.max_stepz=3", f"hydra.run.dir={tmp_path / 'r'}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert typo.returncode != 0 and "max_stepz" in typo.stderr


class _Payload:
    """Unpickling this would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_checkpoint_is_not_executed(tmp_path):
    """Checkpoints are read with weights_only=True: a pickle payload in a .ckpt never runs."""
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Payload(marker)}, ckpt)
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        train(compose_config("train", train_overrides("cgan", tmp_path / "run", f"ckpt_path={ckpt}")))
    assert not marker.exists()


def test_lecam_and_ada_train_resume_and_refuse_bad_values(tmp_path):
    import torch

    from imgaug_gen.config import compose_config
    from imgaug_gen.jobs.train import train

    extra = ["model.lecam_lambda=0.3", "model.ada_target=0.1", "model.ada_interval=1", "model.ada_kimg=0.05"]
    train(compose_config("train", train_overrides("cgan", tmp_path / "run", *extra)))
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    # LeCam's moving averages were updated; ADA raised p above 0 (a low target: the tiny D soon exceeds it)
    assert float(ckpt["state_dict"]["lecam_ema_real"]) != 0.0 and float(ckpt["state_dict"]["lecam_ema_fake"]) != 0.0
    assert 0.0 < ckpt["ada"]["p"] <= 1.0
    for bad, match in [
        ("model.lecam_lambda=-1", "model.lecam_lambda"),
        ("model.ada_target=1.5", "model.ada_target"),
        ("model.ada_kimg=0", "model.ada_kimg"),
    ]:
        with pytest.raises(ConfigError, match=match):
            train(compose_config("train", train_overrides("cgan", tmp_path / "bad", bad)))


def test_ada_probability_follows_the_overfitting_heuristic():
    import torch

    from imgaug_gen.nets.diffaug import AdaptiveAugmentProbability, diff_augment

    ada = AdaptiveAugmentProbability(target=0.6, interval=2, speed_images=100)
    for _ in range(4):
        ada.update(torch.ones(10))  # D is sure of every real image: r_t = 1 > 0.6
    assert ada.p == pytest.approx(0.4)
    for _ in range(2):
        ada.update(-torch.ones(10))
    assert ada.p == pytest.approx(0.2)
    x = torch.randn(64, 1, 16, 16)
    assert torch.equal(diff_augment(x, ["cutout"], p=0.0), x)
    g = torch.Generator().manual_seed(0)
    partial = diff_augment(x, ["cutout"], generator=g, p=0.5)
    changed = (partial != x).flatten(1).any(1).float().mean()
    assert 0.3 < changed < 0.7


def test_end_of_training_fid_only_when_asked_or_the_run_is_long_enough(tmp_path, caplog):
    over = train_overrides("cgan", tmp_path / "a", "trainer.max_steps=4")  # fidelity every 8 steps
    with caplog.at_level("INFO", logger="imgaug_gen.callbacks"):
        short = train(compose_config("train", over))[0]
    assert "val/fid" not in short and "shorter than callbacks.fidelity.every_n_steps=8" in caplog.text
    with caplog.at_level("INFO", logger="imgaug_gen.callbacks"):
        asked = train(
            compose_config(
                "train",
                train_overrides("cgan", tmp_path / "b", "trainer.max_steps=4", "callbacks.fidelity.at_end=true"),
            )
        )[0]
    assert np.isfinite(asked["val/fid"]) and "50 samples in" in caplog.text
    with pytest.raises(ConfigError, match="`callbacks.fidelity.at_end` = 'sometimes'"):
        train(compose_config("train", train_overrides("cgan", tmp_path / "c", "callbacks.fidelity.at_end=sometimes")))
