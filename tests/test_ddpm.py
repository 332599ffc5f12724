"""model=ddpm: training through the real config, sampling, img2img, guidance, samplers, exact resume,
config errors, and train.py -> generate.py (img2img) end to end."""

from __future__ import annotations

import json
import sys

import fastcli
import numpy as np
import pytest
import torch

from imgaug_gen.errors import ConfigError
from imgaug_gen.generators.base import load_generator, per_image_seeds

from conftest import ROOT, TINY_CALLBACKS, TINY_DATA, TINY_METRICS, class_counts, cli_env
from factories_ddpm import TINY_DDPM, TINY_UNET, make_generator

pytestmark = pytest.mark.usefixtures("one_thread")


def ddpm_overrides(run_dir, *extra: str) -> list[str]:
    return [
        *TINY_DDPM,
        *TINY_DATA,
        *TINY_METRICS,
        *TINY_CALLBACKS,
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        f"run_dir={run_dir}",
        *extra,
    ]


def _train(run_dir, *extra: str):
    from imgaug_gen.config import compose_config
    from imgaug_gen.jobs.train import train

    return train(compose_config("train", ddpm_overrides(run_dir, *extra)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny 8-step DDPM run: (run_dir, objects)."""
    run_dir = tmp_path_factory.mktemp("ddpm_run")
    metrics, objects = _train(run_dir)
    return run_dir, metrics, objects


@pytest.fixture(scope="module")
def gen(trained):
    return load_generator(trained[0] / "generator")


@pytest.fixture(scope="module")
def real(trained):
    dm = trained[2]["datamodule"]
    images, labels = dm.train_arrays()
    return images[:6], labels[:6]


def test_train_writes_run_and_loads(trained, gen):
    from imgaug_gen.generators.ddpm import DDPMGenerator

    run_dir, metrics, _ = trained
    assert metrics["global_step"] == 8 and np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["val/fid"])
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and list((run_dir / "samples").glob("step_*.png"))
    files = sorted(p.name for p in (run_dir / "generator").iterdir())
    assert files == ["config.json", "model.safetensors"]
    cfg = json.loads((run_dir / "generator" / "config.json").read_text())
    assert cfg["kind"] == "ddpm" and cfg["unet"]["num_class_embeds"] == 11
    assert cfg["train_scheduler"]["class_name"] == "DDPMScheduler"
    assert cfg["sample_scheduler"]["class_name"] == "DDIMScheduler"
    assert cfg["train_scheduler"]["config"]["num_train_timesteps"] == 10
    assert cfg["num_inference_steps"] == 4 and cfg["guidance_scale"] == 1.5
    assert isinstance(gen, DDPMGenerator) and gen.supports_edit
    out = gen.sample([0, 3, 9], seeds=0)
    assert out.dtype == np.uint8 and out.shape == (3, 16, 16, 1)


def test_sample_is_per_image_deterministic(gen):
    seeds = per_image_seeds(7, 0, 6)
    labels = [0, 1, 2, 3, 4, 5]
    a = gen.sample(labels, seeds=seeds, batch_size=6)
    b = gen.sample(labels, seeds=seeds, batch_size=2)
    assert np.array_equal(a, b) and np.array_equal(a[4], gen.sample([4], seeds=[seeds[4]])[0])
    # the stochastic DDPM sampler draws its step noise from the per-image generators too
    c = gen.sample(labels, seeds=seeds, batch_size=6, scheduler="ddpm")
    d = gen.sample(labels, seeds=seeds, batch_size=4, scheduler="ddpm")
    assert np.array_equal(c, d) and not np.array_equal(a, c)


def test_guidance_and_samplers_change_output(gen):
    labels, seeds = [1, 2, 3], [11, 12, 13]
    ddim = gen.sample(labels, seeds=seeds)
    assert not np.array_equal(ddim, gen.sample(labels, seeds=seeds, guidance_scale=1.0))
    assert not np.array_equal(ddim, gen.sample(labels, seeds=seeds, guidance_scale=4.0))
    dpm = gen.sample(labels, seeds=seeds, scheduler="dpmsolver++")
    assert gen._templates["dpmsolver++"].config.thresholding  # the DDIM's x0 clipping carried over
    assert dpm.shape == ddim.shape and not np.array_equal(dpm, ddim)
    assert np.array_equal(dpm, gen.sample(labels, seeds=seeds, scheduler="dpmsolver++", batch_size=1))
    assert not np.array_equal(ddim, gen.sample(labels, seeds=seeds, eta=1.0))
    assert gen.sample(labels, seeds=seeds, num_inference_steps=2).shape == (3, 16, 16, 1)


def test_dpmsolver_as_configured_sampler(tmp_path):
    from imgaug_gen.config import compose_config
    from imgaug_gen.jobs.train import build_datamodule, build_module

    cfg = compose_config(
        "train", ddpm_overrides(tmp_path, "model.sample_scheduler._target_=diffusers.DPMSolverMultistepScheduler")
    )
    module = build_module(cfg, build_datamodule(cfg))
    g = module.to_generator()
    assert type(g._templates[None]).__name__ == "DPMSolverMultistepScheduler"
    assert g._templates[None].config.algorithm_type == "dpmsolver++"
    assert g._templates[None].config.thresholding  # x0 kept in [-1, 1], as conf/model/ddpm.yaml sets
    g.save_pretrained(tmp_path / "g")
    loaded = load_generator(tmp_path / "g")
    assert type(loaded._templates[None]).__name__ == "DPMSolverMultistepScheduler"
    assert np.array_equal(loaded.sample([0, 9], seeds=1), g.sample([0, 9], seeds=1))


def test_edit_strengths(gen, real):
    images, labels = real
    diffs = {}
    for s in (1e-3, 0.25, 0.5, 1.0):
        out = gen.edit(images, labels, strength=s, seeds=5)
        assert out.dtype == np.uint8 and out.shape == images.shape
        diffs[s] = np.abs(out.astype(float) - images.astype(float)).mean()
    assert diffs[1e-3] == 0  # 0 of 4 steps: the image comes back unchanged
    assert diffs[0.25] < diffs[1.0] and diffs[0.5] < diffs[1.0] + 2.0
    # mixed strengths in one batch: each image as if edited alone
    strengths = [0.25, 1.0, 0.5, 0.25, 1.0, 0.5]
    seeds = per_image_seeds(3, 0, len(labels))
    mixed = gen.edit(images, labels, strength=strengths, seeds=seeds, batch_size=6)
    alone = np.concatenate(
        [
            gen.edit(images[i : i + 1], labels[i : i + 1], strength=strengths[i], seeds=[seeds[i]])
            for i in range(len(labels))
        ]
    )
    assert np.array_equal(mixed, alone)
    assert gen.edit(images, labels, strength=0.5, seeds=5, scheduler="dpmsolver++").shape == images.shape
    assert not np.array_equal(
        gen.edit(images, labels, strength=1.0, seeds=5, guidance_scale=1.0),
        gen.edit(images, labels, strength=1.0, seeds=5),
    )


def test_exact_resume(trained, tmp_path):
    """8 steps in one go == 4 steps + resume from last.ckpt for 4 more: identical EMA and weights."""
    _, _, full = trained
    _train(tmp_path / "a", "trainer.max_steps=4")
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    _, resumed = _train(tmp_path / "b", f"ckpt_path={ckpt}")
    assert resumed["trainer"].global_step == 8 and resumed["module"].ema_updates == 8
    for name in ("ema", "unet"):
        a = getattr(full["module"], name).state_dict()
        b = getattr(resumed["module"], name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_config_errors(tmp_path):
    from imgaug_gen.generators.ddpm import DDPMModule

    def build(**kw):
        args = {
            "unet": TINY_UNET,
            "train_scheduler": {"_target_": "diffusers.DDPMScheduler", "num_train_timesteps": 10},
            **kw,
        }
        return DDPMModule(3, ["a", "b", "c"], [1, 16, 16], **args)

    with pytest.raises(ConfigError, match=r"`model.unet.block_out_channels` = \[12, 16\] must all be divisible"):
        build(unet={**TINY_UNET, "block_out_channels": [12, 16]})
    with pytest.raises(ConfigError, match=r"`model.unet` sets \['sample_size'\].*remove them"):
        build(unet={**TINY_UNET, "sample_size": 32})
    with pytest.raises(ConfigError, match="`model.unet.down_block_types` has 2 entries"):
        build(unet={**TINY_UNET, "block_out_channels": [8, 16, 16]})
    with pytest.raises(ConfigError, match=r"image size 10x10 \(`data.image_size`\) must be divisible by 4"):
        DDPMModule(
            3,
            ["a", "b", "c"],
            [1, 10, 10],
            unet={
                **TINY_UNET,
                "block_out_channels": [8, 16, 16],
                "down_block_types": ["DownBlock2D"] * 3,
                "up_block_types": ["UpBlock2D"] * 3,
            },
        )
    with pytest.raises(
        ConfigError, match=r"`model.num_inference_steps` = 0: input should be greater than or equal to 1"
    ):
        build(num_inference_steps=0)
    with pytest.raises(ConfigError, match=r"`model.cond_drop_prob` = 1.5"):
        build(cond_drop_prob=1.5)
    with pytest.raises(ConfigError, match="`model.guidance_scale` = 3.0 needs `model.cond_drop_prob` > 0"):
        build(cond_drop_prob=0.0, guidance_scale=3.0)
    with pytest.raises(
        ConfigError,
        match=r"`model.sample_scheduler` uses a different noise schedule.*"
        r"num_train_timesteps: 10 vs 1000",
    ):
        build(sample_scheduler={"_target_": "diffusers.DDIMScheduler", "num_train_timesteps": 1000})
    with pytest.raises(
        ConfigError,
        match=r"`model.sample_scheduler` \(DPMSolverMultistepScheduler\) does not "
        r"keep its x0 predictions in \[-1, 1\].*"
        r"`model.sample_scheduler.thresholding=true`",
    ):
        build(sample_scheduler={"_target_": "diffusers.DPMSolverMultistepScheduler", "num_train_timesteps": 10})
    with pytest.raises(
        ConfigError, match="`model.train_scheduler.class_name` = 'Nope' is not a diffusers scheduler class"
    ):
        build(train_scheduler={"class_name": "Nope", "config": {}})
    gen = make_generator()
    with pytest.raises(ConfigError, match=r"`sample_kwargs` has unknown keys \['steps'\]"):
        gen.sample([0], steps=3)
    with pytest.raises(ConfigError, match=r"`sample_kwargs.num_inference_steps` = 0; give an integer in \[1, 10\]"):
        gen.sample([0], num_inference_steps=0)
    with pytest.raises(ConfigError, match=r"`sample_kwargs.guidance_scale` = -1"):
        gen.sample([0], guidance_scale=-1)
    with pytest.raises(ConfigError, match=r"`sample_kwargs.scheduler` = 'euler'; allowed: \['ddim'"):
        gen.edit(np.zeros((1, 16, 16, 1), np.uint8), [0], scheduler="euler")
    with pytest.raises(ConfigError, match=r"`images` are 8x8x1 \(HxWxC\); this generator edits 16x16x1"):
        gen.edit(np.zeros((1, 8, 8, 1), np.uint8), [0])


@pytest.mark.slow  # fast variant: test_folder_kinds.py::test_folder_train_sample_and_img2img[ddpm]
def test_train_then_generate_img2img_end_to_end(tmp_path):
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    env = cli_env()
    train_args = [a for a in ddpm_overrides(run_dir) if not a.startswith("callbacks.")]
    train_args += [
        "trainer.max_steps=4",
        "callbacks.fidelity=null",
        "callbacks.samples=null",
        "callbacks.checkpoint=null",
    ]
    fastcli.run(
        [sys.executable, "train.py", *train_args], cwd=ROOT, env=env, check=True, capture_output=True, text=True
    )
    assert (run_dir / "generator" / "model.safetensors").is_file()
    r = fastcli.run(
        [
            sys.executable,
            "generate.py",
            f"run_dir={run_dir}",
            f"out_dir={out_dir}",
            "mode=img2img",
            "img2img.edits_per_image=1",
            "img2img.strengths=[0.5,1.0]",
            "include_real=false",
            # `++`: works whether or not conf/generate.yaml declares these keys
            "++sample_kwargs.num_inference_steps=2",
            "++sample_kwargs.guidance_scale=1.5",
            *TINY_METRICS,
            "progress=false",
            "device=cpu",
            "batch_size=32",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    per_class = class_counts(out_dir)
    assert per_class == {str(c): 6 for c in range(10)}  # data.shots=6, one edit per real image
    records = [json.loads(line) for line in (out_dir / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 60 and len({r["source_id"] for r in records}) == 60
    for rec in records:
        assert rec["source"] == "synthetic" and rec["mode"] == "img2img" and rec["generator"]["kind"] == "ddpm"
        assert rec["strength"] in (0.5, 1.0) and isinstance(rec["seed"], int)
        assert rec["source_id"].startswith("digits_")
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["n_synthetic"] == 60 and np.isfinite(metrics["fid"]) and metrics["features"]


def test_group_elements_are_the_eight_symmetries_of_a_square():
    from imgaug_gen.generators.ddpm import apply_group_element

    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    images = [apply_group_element(x, k) for k in range(8)]
    assert len({tuple(im.flatten().tolist()) for im in images}) == 8
    assert torch.equal(images[3], torch.rot90(x, 2, (-2, -1)))
    for k in range(4):  # the flips are their own inverses
        assert torch.equal(apply_group_element(images[k], k), x)


def test_nonleaking_augmentation_trains_and_samples_with_the_identity(tmp_path):
    from imgaug_gen.generators.ddpm import DDPMModule

    run_dir = tmp_path / "run"
    _, out = _train(run_dir, "trainer.max_steps=3", "model.augment.p=0.5", "model.augment.ops=dihedral")
    module = out["module"]
    assert module.unet.config.num_class_embeds == 11 * 8  # 10 classes + null, under 8 transforms
    gen = load_generator(run_dir / "generator")
    assert gen.unet.config.num_class_embeds == 88
    a = gen.sample([0, 9], seeds=[1, 2], num_inference_steps=2)
    assert a.shape == (2, 16, 16, 1) and np.array_equal(a, gen.sample([0, 9], seeds=[1, 2], num_inference_steps=2))
    # p=1: every training image is transformed and its class entry says by which transform
    x = torch.rand(8, 1, 16, 16) * 2 - 1
    y = torch.arange(8) % 3
    build = lambda **kw: DDPMModule(
        3,
        ["a", "b", "c"],
        [1, 16, 16],
        unet=TINY_UNET,
        noise_seed=0,  # noqa: E731
        cond_drop_prob=0.0,
        guidance_scale=1.0,
        **kw,
    )
    plain, aug = build(), build(augment={"p": 1.0, "ops": "flips"})
    assert aug.unet.config.num_class_embeds == 4 * 4 and plain.unet.config.num_class_embeds == 4
    seen = []
    aug.unet.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["class_labels"].clone()), with_kwargs=True)
    assert torch.isfinite(aug.training_step((x, y), 0))
    k, label = seen[0] // 4, seen[0] % 4
    assert torch.equal(label, y) and ((k >= 1) & (k <= 3)).all()
    with pytest.raises(
        ConfigError, match=r"`model.augment.ops` = 'spin': input should be 'none', 'flips' or 'dihedral'"
    ):
        build(augment={"p": 0.5, "ops": "spin"})
    with pytest.raises(ConfigError, match=r"`model.augment.p` = 2: input should be less than or equal to 1"):
        build(augment={"p": 2, "ops": "flips"})
    with pytest.raises(ConfigError, match="needs square images"):
        DDPMModule(3, ["a", "b", "c"], [1, 16, 32], unet=TINY_UNET, augment={"p": 0.5, "ops": "dihedral"})


def test_loss_logged_as_interval_mean(tmp_path):
    """train/loss is the mean of the steps since the previous write: metrics.csv holds it at Lightning's
    logging steps, and the last step's interval reaches the returned metrics."""
    import csv

    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    from imgaug_gen.config import compose_config
    from imgaug_gen.jobs.train import build_datamodule, build_module

    cfg = compose_config("train", ddpm_overrides(tmp_path / "run"))
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm)

    class Losses(pl.Callback):
        def __init__(self):
            self.values: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.values.append(float(outputs["loss"]))

    losses = Losses()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=7,
        log_every_n_steps=3,
        callbacks=[losses],
        logger=CSVLogger(tmp_path, name="log"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=dm)
    l = losses.values
    assert len(l) == 7
    rows = [r for r in csv.DictReader(open(next(tmp_path.glob("log/*/metrics.csv")))) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == [2, 5]
    assert [float(r["train/loss"]) for r in rows] == pytest.approx([np.mean(l[0:3]), np.mean(l[3:6])], rel=1e-5)
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(l[6], rel=1e-5)  # the last interval
