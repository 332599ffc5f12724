"""Front-end conventions: --help, --cfg job, strict keys, experiment configs."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import ROOT


def _run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script, group", [("train.py", "model"), ("generate.py", "augment"),
                                           ("evaluate.py", "augment")])
def test_help_lists_groups(script, group):
    out = _run(script, "--help")
    assert out.returncode == 0, out.stderr
    assert "== Configuration groups ==" in out.stdout and group in out.stdout


def test_cfg_job_prints_the_composed_config_without_running(tmp_path):
    out = _run("train.py", "experiment=digits_ddpm", f"hydra.run.dir={tmp_path / 'r'}", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["model"]["_target_"].endswith("DDPMModule") and cfg["trainer"]["max_steps"] == 800
    assert not (tmp_path / "r").exists()  # nothing ran


@pytest.mark.parametrize("experiment, target", [("digits_cgan", "CGANModule"), ("digits_ddpm", "DDPMModule"),
                                                ("folder_sd_lora", "SDLoRAModule")])
def test_experiment_recipes_compose(experiment, target):
    from imgaug_gen.config import compose_config

    cfg = compose_config("train", [f"experiment={experiment}", "run_dir=/tmp/x"])
    assert cfg.model._target_.endswith(target)
