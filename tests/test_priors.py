"""Start from a prior: a ddpm or cGAN fine-tuned on new classes from a run of this project or a diffusers
UNet2DModel / DDPMPipeline folder, in each fine-tuning mode; class selection; classifier transfer."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from imgaug_gen.errors import ConfigError
from imgaug_gen.generators.base import load_generator

from conftest import (
    ROOT,
    TINY_CALLBACKS,
    TINY_METRICS,
    digits_images,
    gen_cfg,
    train_killed_and_resumed,
    write_digit_folder,
)
from factories_ddpm import TINY_DDPM, TINY_UNET

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = ["data=digits", "data.image_size=16", "data.shots=6", "data.batch_size=16"]
QUIET = ["trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "logger=none", "callbacks.fidelity=null"]
BASE, NOVEL = "data.classes=[0,1,2,3,4]", "data.classes=[5,6,7]"


def _train(run_dir, *extra):
    from imgaug_gen.config import compose_config
    from imgaug_gen.jobs.train import train

    return train(
        compose_config(
            "train", [*TINY_DDPM, *DATA, *TINY_METRICS, *TINY_CALLBACKS, *QUIET, f"run_dir={run_dir}", *extra]
        )
    )


@pytest.fixture(scope="module")
def ddpm_base(tmp_path_factory):
    """A tiny ddpm run on digits 0-4: the prior of the novel-class tests."""
    run = tmp_path_factory.mktemp("ddpm_base")
    _train(run, BASE)
    return run


def _diffusers_unet(num_class_embeds=None):
    from diffusers import UNet2DModel

    from imgaug_gen.generators.ddpm import unet_config

    torch.manual_seed(0)
    cfg = unet_config(3, [1, 16, 16], TINY_UNET)
    cfg["num_class_embeds"] = num_class_embeds
    unet = UNet2DModel.from_config(cfg)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet


@pytest.fixture(scope="module")
def diffusers_pipeline(tmp_path_factory):
    """An unconditional DDPMPipeline folder (UNet + its own linear 10-step schedule), as save_pretrained writes it."""
    from diffusers import DDPMPipeline, DDPMScheduler

    path = tmp_path_factory.mktemp("pipe")
    DDPMPipeline(
        unet=_diffusers_unet(),
        scheduler=DDPMScheduler(num_train_timesteps=10, beta_schedule="linear", clip_sample=True),
    ).save_pretrained(path)
    return path


def test_a_ddpm_run_with_other_classes_is_a_prior(ddpm_base, tmp_path):
    """Digits 0-4 -> 5-7: the new classes start at the prior's null row, so before any step the model
    conditioned on a new class samples exactly what the prior samples unconditionally."""
    from imgaug_gen.config import compose_config
    from imgaug_gen.jobs.train import build_datamodule, build_module

    prior = load_generator(ddpm_base / "generator")
    cfg = compose_config(
        "train", [*TINY_DDPM, *DATA, *QUIET, NOVEL, f"run_dir={tmp_path}", f"model.pretrained={ddpm_base}"]
    )
    module = build_module(cfg, build_datamodule(cfg))
    gen = module.to_generator()
    assert gen.class_names == ["5", "6", "7"] and gen.config["prior"]["source"] == "imgaug_gen"
    ours = gen.sample([0, 1, 2], seeds=[3, 3, 3], guidance_scale=1.0)
    theirs = prior.sample([0, 0, 0], seeds=[3, 3, 3], guidance_scale=0.0)  # the prior's null class
    assert np.array_equal(ours, theirs)
    metrics, objects = _train(tmp_path / "run", NOVEL, f"model.pretrained={ddpm_base}")
    saved = json.loads((tmp_path / "run" / "generator" / "config.json").read_text())
    from imgaug_gen.io import tree_hash

    assert saved["prior"]["path"] == str((ddpm_base / "generator").resolve())
    assert saved["prior"]["sha256"] == tree_hash(ddpm_base / "generator")
    assert saved["data"]["args"]["classes"] == [5, 6, 7] and saved["class_names"] == ["5", "6", "7"]


@pytest.mark.parametrize("mode", ["full", "lora", "embeddings"])
def test_a_diffusers_pipeline_folder_fine_tunes_in_each_mode(diffusers_pipeline, tmp_path, mode):
    """The pipeline's own schedule is adopted; lora and embeddings leave the prior's weights bit-identical;
    the written generator is a plain UNet (LoRA merged) that loads without the prior."""
    from diffusers import UNet2DModel

    prior = UNet2DModel.from_pretrained(diffusers_pipeline / "unet")
    run = tmp_path / "run"
    metrics, objects = _train(
        run,
        NOVEL,
        f"model.pretrained={diffusers_pipeline}",
        f"model.finetune={mode}",
        "trainer.max_steps=4",
        "model.lr=0.05",
    )
    module = objects["module"]
    assert module.noise_scheduler.config.beta_schedule == "linear"  # the prior's, not the yaml's squaredcos
    assert module.noise_scheduler.config.num_train_timesteps == 10
    theirs = prior.state_dict()
    mine = {k.replace(".base_layer", ""): v for k, v in module.unet.state_dict().items() if "lora_" not in k}
    frozen = [k for k in theirs if k != "class_embedding.weight" and not k.startswith("class_embedding")]
    same = [k for k in frozen if torch.equal(mine[k], theirs[k])]
    if mode == "full":
        assert len(same) < len(frozen) // 2
    else:
        assert same == frozen  # every prior weight bit for bit
    assert not torch.equal(
        module.unet.class_embedding.weight[:3], torch.zeros_like(module.unet.class_embedding.weight[:3])
    )
    gen = load_generator(run / "generator")
    assert type(gen.unet) is UNet2DModel and not any("lora" in k for k in gen.unet.state_dict())
    if mode == "lora":  # the merged weights carry what the adapters learnt
        changed = [k for k in frozen if not torch.equal(gen.unet.state_dict()[k], theirs[k])]
        assert changed and all(("to_" in k or "conv" in k) for k in changed)
    assert gen.sample([0, 2], seeds=0).shape == (2, 16, 16, 1)


def test_a_diffusers_unet_folder_with_class_rows_is_a_prior(tmp_path):
    unet = _diffusers_unet(num_class_embeds=4)
    unet.save_pretrained(tmp_path / "unet")
    metrics, objects = _train(
        tmp_path / "run",
        NOVEL,
        f"model.pretrained={tmp_path / 'unet'}",
        "model.init_class_embeddings=class_mean",
        "trainer.max_steps=2",
    )
    rows = objects["module"].unet.class_embedding.weight.detach()
    mean = unet.class_embedding.weight.detach().mean(0)
    assert rows.shape[0] == 4  # 3 classes + null, each started at the mean
    gen = load_generator(tmp_path / "run" / "generator")
    assert (
        gen.config["prior"]["source"] == "diffusers_unet" and torch.isfinite(rows).all() and mean.shape == rows[0].shape
    )


@pytest.mark.parametrize(
    "extra, match",
    [
        (["data.image_size=32"], r"`data.image_size` = 32 .* was trained at 16x16. Set `data.image_size=16`"),
        (["data.channels=3"], r"`data.channels` = 3, but the prior .* makes 1-channel images. Set `data.channels=1`"),
        (
            ["model.train_scheduler.beta_schedule=scaled_linear"],
            r"`model.train_scheduler.beta_schedule` = 'scaled_linear', but the prior .* was trained with "
            r"beta_schedule = 'squaredcos_cap_v2'",
        ),
        (["model.train_scheduler.prediction_type=v_prediction"], r"prediction_type = 'epsilon'"),
        (
            ["model.unet.layers_per_block=2"],
            r"`model.unet.layers_per_block` = 2, but the prior .* has layers_per_block = 1",
        ),
        (["model.finetune=sideways"], r"`model.finetune` = 'sideways'"),
    ],
)
def test_a_mismatched_prior_is_refused_naming_both_values(ddpm_base, tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        _train(tmp_path / "run", NOVEL, f"model.pretrained={ddpm_base}", *extra)
    assert not (tmp_path / "run").exists()


def test_prior_modes_need_a_prior_and_a_ddpm_prior(trained_cgan, tmp_path):
    with pytest.raises(ConfigError, match=r"`model.finetune` = 'lora' adapts a prior"):
        _train(tmp_path / "a", "model.finetune=lora")
    with pytest.raises(ConfigError, match="holds a `cgan` generator; a ddpm starts from a ddpm prior"):
        _train(tmp_path / "b", f"model.pretrained={trained_cgan}")
    with pytest.raises(ConfigError, match="is not a folder"):
        _train(tmp_path / "c", f"model.pretrained={tmp_path / 'nowhere'}")


def test_a_prior_started_run_resumes_to_a_byte_identical_generator(ddpm_base, tmp_path):
    def cmd(run_dir, *extra):
        return [
            sys.executable,
            str(ROOT / "train.py"),
            *TINY_DDPM,
            *DATA,
            *TINY_METRICS,
            *TINY_CALLBACKS,
            *QUIET,
            NOVEL,
            f"model.pretrained={ddpm_base}",
            "model.finetune=lora",
            "trainer.max_steps=12",
            "callbacks.checkpoint.every_n_train_steps=4",
            "callbacks.samples=null",
            f"hydra.run.dir={run_dir}",
            *extra,
        ]

    full, killed = train_killed_and_resumed(cmd, tmp_path, first_step=4, max_steps=12)
    assert (full / "generator" / "model.safetensors").read_bytes() == (
        killed / "generator" / "model.safetensors"
    ).read_bytes()


def test_the_manifest_records_the_prior(ddpm_base, tmp_path):
    from imgaug_gen.export import read_manifest
    from imgaug_gen.jobs.generate import generate

    _train(tmp_path / "run", NOVEL, f"model.pretrained={ddpm_base}", "model.finetune=embeddings", "trainer.max_steps=2")
    generate(gen_cfg(tmp_path / "run", tmp_path / "out", "score=false", "n_per_class=1"))
    syn = [r for r in read_manifest(tmp_path / "out") if r["source"] == "synthetic"]
    assert len(syn) == 3 and all(
        r["generator"]["prior"]["path"] == str((ddpm_base / "generator").resolve()) for r in syn
    )
    assert {r["class_name"] for r in read_manifest(tmp_path / "out")} == {"5", "6", "7"}


# -- cGAN ------------------------------------------------------------------------------------------
CGAN = ["model=cgan", "model.g_width=8", "model.d_width=8", "model.z_dim=16", "trainer.max_steps=8"]


def _train_cgan(run_dir, *extra):
    from imgaug_gen.config import compose_config
    from imgaug_gen.jobs.train import train

    return train(
        compose_config("train", [*CGAN, *DATA, *TINY_METRICS, *TINY_CALLBACKS, *QUIET, f"run_dir={run_dir}", *extra])
    )


@pytest.fixture(scope="module")
def cgan_base(tmp_path_factory):
    run = tmp_path_factory.mktemp("cgan_base")
    _train_cgan(run, BASE)
    return run


def test_a_cgan_run_is_a_prior_with_new_class_rows_and_freeze_d(cgan_base, tmp_path):
    prior = load_generator(cgan_base / "generator").net
    d_prior = torch.load(cgan_base / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    _, objects = _train_cgan(
        tmp_path / "run", NOVEL, f"model.pretrained={cgan_base}", "model.freeze_d=1", "model.finetune=embeddings"
    )
    m = objects["module"]
    for name, p in m.generator.named_parameters():  # embeddings: only the conditional norms' rows moved
        theirs = prior.state_dict()[name]
        if name.endswith(("gain.weight", "bias.weight")):
            assert p.shape[0] == 3 and p.shape[1:] == theirs.shape[1:]
        else:
            assert torch.equal(p, theirs), name
    for name, p in m.discriminator.blocks[0].named_parameters():  # Freeze-D: the first block is the prior's
        assert torch.equal(p, d_prior[f"discriminator.blocks.0.{name}"]), name
    assert not torch.equal(m.discriminator.final.conv1.weight_orig, d_prior["discriminator.final.conv1.weight_orig"])
    gen = load_generator(tmp_path / "run" / "generator")
    assert gen.config["prior"]["freeze_d"] == 1 and gen.sample([0, 1, 2], seeds=0).shape == (3, 16, 16, 1)


def test_a_cgan_prior_of_other_sizes_is_refused(cgan_base, tmp_path):
    with pytest.raises(ConfigError, match=r"`model.g_width` = 16, but the prior .* has 8"):
        _train_cgan(tmp_path / "r", NOVEL, f"model.pretrained={cgan_base}", "model.g_width=16")
    with pytest.raises(ConfigError, match=r"`data.image_size` = 32"):
        _train_cgan(tmp_path / "r", NOVEL, f"model.pretrained={cgan_base}", "data.image_size=32")


def test_cgan_lora_merges_into_a_plain_generator(cgan_base, tmp_path):
    from imgaug_gen.nets.cgan import CGANGenerator

    _, objects = _train_cgan(tmp_path / "run", NOVEL, f"model.pretrained={cgan_base}", "model.finetune=lora")
    assert any("lora_" in k for k in objects["module"].generator.state_dict())
    gen = load_generator(tmp_path / "run" / "generator")
    assert type(gen.net) is CGANGenerator and not any("lora" in k for k in gen.net.state_dict())
    assert np.array_equal(gen.sample([0, 1], seeds=1), objects["module"].to_generator().sample([0, 1], seeds=1))


# -- data.classes ----------------------------------------------------------------------------------
def test_data_classes_picks_exactly_those_classes(tmp_path):
    from imgaug_gen.data import DigitsDataModule, LabeledFolderDataModule

    full = DigitsDataModule(image_size=8)
    full.setup()
    dm = DigitsDataModule(image_size=8, classes=[7, 5])
    dm.setup()
    assert dm.class_names == ["7", "5"] and sorted(set(dm.train_arrays()[1])) == [0, 1]
    x, y = full.test_arrays()
    assert len(dm.test_arrays()[1]) == int(np.isin(y, [5, 7]).sum())  # each class keeps its own test split
    ids = {r["id"] for r in dm.train_records()}
    assert ids == {r["id"] for r in full.train_records() if r["class_name"] in ("5", "7")}
    root = write_digit_folder(tmp_path / "img", ["cat", "dog", "fox"], n_per_class=4)
    f = LabeledFolderDataModule(root=str(root), image_size=16, classes=["fox", "cat"], test_fraction=0.0)
    f.setup()
    assert f.class_names == ["fox", "cat"] and len(f.train_arrays()[1]) == 8
    with pytest.raises(ConfigError, match=r"`data.classes\[1\]` = 'cow' is not a class of this data"):
        LabeledFolderDataModule(root=str(root), image_size=16, classes=["fox", "cow"]).setup()
    with pytest.raises(ConfigError, match="names class 'fox' twice"):
        LabeledFolderDataModule(root=str(root), image_size=16, classes=["fox", 2]).setup()


# -- classifier transfer ---------------------------------------------------------------------------
def test_classifier_init_reinitialises_only_the_head(tmp_path):
    from imgaug_gen.metrics.downstream import RECIPE, SmallCNN, load_features, save_classifier

    torch.manual_seed(1)
    base = SmallCNN(5, 1)
    path = save_classifier(base, tmp_path / "base.safetensors")
    torch.manual_seed(2)
    fresh = SmallCNN(3, 1)
    head = {k: v.clone() for k, v in fresh.head.state_dict().items()}
    load_features(fresh, path, RECIPE)
    assert all(torch.equal(v, base.features.state_dict()[k]) for k, v in fresh.features.state_dict().items())
    assert all(torch.equal(v, head[k]) for k, v in fresh.head.state_dict().items())  # the new head, untouched
    with pytest.raises(ConfigError, match=r"was trained with widths=.*this recipe has widths="):
        load_features(SmallCNN(3, 1, (8, 16)), path, {**RECIPE, "widths": (8, 16)})


def test_init_lr_scale_zero_freezes_the_transferred_features(tmp_path):
    """`init_lr_scale`: the transferred layers learn at lr x scale, the new head at lr; 0 leaves the features'
    weights bit-identical to the init's, 1 trains them; a value outside [0, 1] is refused by name."""
    from safetensors.torch import load_file

    from imgaug_gen.metrics.downstream import SmallCNN, save_classifier, train_and_test

    torch.manual_seed(1)
    path = save_classifier(SmallCNN(5, 1), tmp_path / "base.safetensors", input_size=16)
    base = load_file(str(path))
    images, labels = digits_images(8, classes=(5, 6, 7), size=16, channels=1)
    x, y = np.stack(images)[..., None], np.asarray(labels) - 5

    def features(scale):
        model = train_and_test(
            x,
            y,
            x,
            y,
            3,
            return_details=True,
            return_model=True,
            steps=5,
            input_size=16,
            init=str(path),
            init_lr_scale=scale,
        )["model"]
        state = model.features.state_dict()
        return {f"features.{k}": v for k, v in state.items() if "running" not in k and "num_batches" not in k}

    assert all(torch.equal(v, base[k]) for k, v in features(0.0).items())
    assert any(not torch.equal(v, base[k]) for k, v in features(1.0).items())
    with pytest.raises(ConfigError, match=r"`recipe.init_lr_scale` = 2"):
        features(2)


def test_evaluate_transfer_and_the_chosen_baseline(tmp_path):
    """classifier.init={classes: [...]}: the init is trained once on the other classes; transfer methods and the
    generative ones start from it; every gain is against the best non-generative recipe on validation."""
    from imgaug_gen.config import compose_config
    from imgaug_gen.jobs.evaluate import evaluate

    over = [
        f"out_dir={tmp_path / 'ev'}",
        "shots=[2]",
        "seeds=[0,1]",
        "classifier.steps=30",
        "data.classes=[5,6,7]",
        "classifier.init={classes:[0,1,2,3,4]}",
        "cas_seeds=0",
        "policies={replace:{name:replace,p:0.5}}",
        'generators.cgan.train=["experiment=digits_cgan","logger=none","trainer.max_steps=4","model.g_width=8",'
        '"model.d_width=8"]',
        'generators.cgan.generate=["n_per_class=4","score=false"]',
        "metrics.domain_steps=30",
    ]
    ev = evaluate(compose_config("evaluate", over))
    r = ev["results"]["2"]
    assert list(r)[:4] == ["real", "real+classical", "transfer", "transfer+classical"]
    chosen = ev["baselines"]["2"]
    assert chosen["method"] == max(chosen["val_means"], key=chosen["val_means"].get)
    assert "gain" not in r[chosen["method"]]
    for m in r:
        if m != chosen["method"]:
            assert r[m]["gain"]["mean"] == pytest.approx(
                np.mean(np.asarray(r[m]["accs"]) - r[chosen["method"]]["accs"])
            )
    assert (
        ev["classifier_init"].endswith(".safetensors")
        and f"`{chosen['method']}`" in (tmp_path / "ev" / "results.md").read_text()
    )
    with pytest.raises(ConfigError, match="the init must learn from other classes"):
        evaluate(compose_config("evaluate", [*over, "data.classes=[3,4,5]"]))


def test_the_ddpm_defaults_a_prior_overrides_are_the_yaml_defaults():
    """With a prior, a `model.unet` / `model.train_scheduler` value left at its default gives way to the prior's:
    the code's idea of "default" must be conf/model/ddpm.yaml's."""
    from omegaconf import OmegaConf

    from imgaug_gen.generators.ddpm import DEFAULT_TRAIN_SCHEDULER, DEFAULT_UNET

    yaml = OmegaConf.load(ROOT / "conf" / "model" / "ddpm.yaml")
    assert OmegaConf.to_container(yaml.unet) == DEFAULT_UNET
    sched = OmegaConf.to_container(yaml.train_scheduler)
    assert {k: sched[k] for k in DEFAULT_TRAIN_SCHEDULER} == DEFAULT_TRAIN_SCHEDULER


def test_a_cgan_prior_discriminator_loads_with_or_without_an_unconditional_head():
    from imgaug_gen.generators.gan import load_grown
    from imgaug_gen.nets.cgan import ProjectionDiscriminator

    torch.manual_seed(0)
    plain = ProjectionDiscriminator(5, image_size=16, channels=1, width=8)
    headed = ProjectionDiscriminator(3, image_size=16, channels=1, width=8, unconditional_head=True)
    own_head = headed.uncond.weight_orig.detach().clone()
    load_grown(headed, plain.state_dict(), 3, "class_mean")  # the head is the run's own, the trunk the prior's
    assert torch.equal(headed.uncond.weight_orig, own_head)
    assert torch.equal(headed.final.conv1.weight_orig, plain.final.conv1.weight_orig)
    back = ProjectionDiscriminator(2, image_size=16, channels=1, width=8)
    load_grown(back, headed.state_dict(), 2, "class_mean")  # a prior's head is dropped
    assert torch.equal(back.linear.weight_orig, headed.linear.weight_orig)
