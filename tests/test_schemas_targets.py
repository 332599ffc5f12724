"""The `_target_` blocks of train.py (data, model, trainer, callbacks, logger) are checked against
their class's annotated constructor before anything is built."""

import pytest

from imgaug_gen.config import compose_config
from imgaug_gen.errors import ConfigError
from imgaug_gen.jobs.train import check_train_config
from imgaug_gen.schemas import check_targets, signature_schema

KEYS = ("data", "model", "trainer", "callbacks", "logger")


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            ["+model.zdim=3"],
            r"`model.zdim` is not an argument of imgaug_gen.generators.gan.CGANModule .*allowed here: "
            r"\[.*'z_dim'.*\]",
        ),
        (["model=ddpm", "+model.lrr=1"], r"`model.lrr` is not an argument of .*DDPMModule.*'lr'"),
        (["model.lr_g=fast"], r"`model.lr_g` = 'fast': input should be a valid number"),
        (["+trainer.max_stepz=3"], r"`trainer.max_stepz` is not an argument of pytorch_lightning.Trainer"),
        (
            ["+callbacks.samples.every_n_step=3"],
            r"`callbacks.samples.every_n_step` is not an argument of "
            r"imgaug_gen.callbacks.SampleGridCallback.*'every_n_steps'",
        ),
        (["data.channels=2"], r"`data.channels` = 2: input should be 1 or 3"),
        (["data=folder", "data.root=/tmp", "data.resize=stretch"], r"`data.resize` = 'stretch': input should be"),
        (["data.image_size=4"], r"`data.image_size` = 4: input should be greater than or equal to 8"),
    ],
)
def test_target_blocks_are_checked_before_any_build(overrides, match, tmp_path):
    cfg = compose_config("train", [f"run_dir={tmp_path}", *overrides])
    with pytest.raises(ConfigError, match=match):
        check_train_config(cfg)
    assert not any(tmp_path.iterdir())  # nothing was built or written


def test_shipped_configs_pass_their_schemas(tmp_path):
    for model in ("cgan", "ddpm", "sd_lora", "sdxl_lora"):
        for logger in ("csv", "tensorboard", "none"):
            cfg = compose_config("train", [f"run_dir={tmp_path}", f"model={model}", f"logger={logger}"])
            check_targets(cfg, KEYS, "train")


@pytest.mark.parametrize("experiment", ["folder_sd_lora", "folder_dafusion", "folder_datadream"])
def test_stable_diffusion_recipes_compose_and_pass_their_schemas(experiment, tmp_path):
    cfg = compose_config(
        "train",
        [f"run_dir={tmp_path}", f"experiment={experiment}", f"data.root={tmp_path}", f"model.pretrained={tmp_path}"],
    )
    check_targets(cfg, KEYS, "train")
    if experiment == "folder_dafusion":
        assert cfg.model.textual_inversion.enabled and not cfg.model.lora.enabled
    if experiment == "folder_datadream":
        assert cfg.model.lora.per_class and cfg.model.lora.text_encoder


def test_signature_schema_follows_kwargs_up_the_hierarchy():
    from imgaug_gen.data import LabeledFolderDataModule

    schema, open_ended = signature_schema(LabeledFolderDataModule)
    assert not open_ended
    assert {"root", "resize", "extensions", "image_size", "shots", "val_fraction"} <= set(schema.model_fields)
    assert schema.model_fields["image_size"].default == 32
