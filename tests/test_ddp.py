"""Lightning DDP on CPU (gloo, 2 processes) through the real train.py front end."""

from __future__ import annotations

import csv
import os
import sys

import fastcli
import numpy as np
import pytest

from conftest import ROOT, train_overrides


def _train(args, env, cwd):
    out = fastcli.run(
        [sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=900
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def _fid_rows(run):
    with open(run / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("val/fid")]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "IMGAUG_GEN_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}
    run = tmp / "run"
    # a 10-step feature network: the FID values only need to match between DDP and one process
    over = [o for o in train_overrides("cgan", run, "metrics.domain_steps=10") if not o.startswith("run_dir")]
    ddp = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", f"hydra.run.dir={run}"]
    out = _train([*over, *ddp], env, tmp)
    return tmp, run, over, ddp, env, out.stdout + out.stderr


def test_ddp_trains_writes_once_and_checkpoints(ddp_run):
    tmp, run, *_, log = ddp_run
    # rank 0 trains the feature network into the cache, the other rank loads it from there
    assert log.count("domain feature network trained") == 1, log[-3000:]
    # one run folder (no second Hydra output folder from the spawned rank), one generator, one log
    assert sorted(p.name for p in tmp.iterdir() if p.name != "cache") == ["run"]
    assert (run / "generator" / "config.json").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    rows = _fid_rows(run)
    assert [int(float(r["global_step"])) for r in rows] == [8]  # logged once (rank 0), not once per rank
    lines = (run / "metrics.csv").read_text().splitlines()
    headers = [i for i, line in enumerate(lines) if "step" in line.split(",") and "val/fid" in line.split(",")]
    assert headers == [0] and len(lines) > 1  # one header, first, then rows (rank 0 wrote the file alone)
    import torch

    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 8


def test_ddp_fid_equals_single_process_value(ddp_run):
    """FID/KID gathered over 2 processes = the one-process value for the same generator and data."""
    from imgaug_gen.config import compose_config
    from imgaug_gen.generators.base import load_generator, per_image_seeds
    from imgaug_gen.jobs.train import build_datamodule
    from imgaug_gen.metrics import FidelityEvaluator, build_feature_extractor

    tmp, run, over, _, env, _ = ddp_run
    os.environ["IMGAUG_GEN_CACHE"] = env["IMGAUG_GEN_CACHE"]
    cfg = compose_config("train", [*over, f"run_dir={run}"])
    dm = build_datamodule(cfg)
    dm.setup()
    images, labels = dm.reference_arrays()
    extractor = build_feature_extractor(cfg.metrics, images, labels, dm.num_classes)
    gen = load_generator(run / "generator")
    n = cfg.callbacks.fidelity.n_per_class
    y = np.repeat(np.arange(gen.num_classes), n)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the DDP ranks (OMP_NUM_THREADS=1): same kernels, same bits
    try:
        single = FidelityEvaluator(extractor, images).evaluate(
            gen.sample(y, per_image_seeds(cfg.callbacks.fidelity.seed, 0, len(y)))
        )
    finally:
        torch.set_num_threads(threads)
    row = _fid_rows(run)[-1]
    assert float(row["val/fid"]) == pytest.approx(single["fid"], rel=1e-4, abs=1e-4)
    assert float(row["val/kid"]) == pytest.approx(single["kid_mean"], rel=1e-4, abs=1e-5)


def test_ddp_resumes_from_checkpoint(ddp_run):
    import torch

    tmp, run, over, ddp, env, _ = ddp_run
    run2 = tmp / "run_resumed"
    over2 = [*over, "trainer.max_steps=12"]  # 8 in debug=tiny
    _train(
        [*over2, *[d.replace(str(run), str(run2)) for d in ddp], f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"],
        env,
        tmp,
    )
    ckpt = torch.load(run2 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 12
    from imgaug_gen.generators.base import read_run_config

    assert read_run_config(run2 / "generator")["trained_steps"] == 12
