"""README "Add a generator kind", followed to the letter: a toy kind in its own (temporary) package,
declared through the entry-point group, configured by its own YAML, trained by train() and written
to a folder by generate() in a process that never imported it by hand."""

from __future__ import annotations

import importlib
import json
import sys

import pytest

from imgaug_gen.config import compose_config
from imgaug_gen.errors import ConfigError

from conftest import TINY_CALLBACKS, TINY_DATA, TINY_METRICS, class_counts

TOY = '''
import torch
import torch.nn.functional as F

from imgaug_gen.generators import ConditionalGenerator, GeneratorModule, register_generator
from imgaug_gen.generators.base import to_uint8_nhwc


@register_generator("toy")
class ToyGenerator(ConditionalGenerator):
    """Each class is a learnt grey level plus seeded noise."""

    def __init__(self, config):
        super().__init__(config)
        self.level = torch.nn.Parameter(torch.zeros(self.num_classes))

    def _sample_batch(self, labels, seeds, **kwargs):
        c, h, w = self.image_shape
        noise = torch.stack([torch.randn(c, h, w, generator=torch.Generator().manual_seed(s)) for s in seeds])
        return to_uint8_nhwc((self.level[labels].view(-1, 1, 1, 1) + 0.05 * noise).clamp(-1, 1))


class ToyModule(GeneratorModule):
    def __init__(self, num_classes, class_names, image_shape, lr=0.1):
        super().__init__()
        self.save_hyperparameters()
        self.gen = ToyGenerator({"num_classes": num_classes, "class_names": list(class_names),
                                 "image_shape": list(image_shape)})

    def to_generator(self):
        return self.gen

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.gen.level[y], x.mean(dim=(1, 2, 3)))
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
'''


@pytest.fixture
def toy_package(tmp_path, monkeypatch):
    from imgaug_gen.generators import base

    pkg = tmp_path / "site"
    (pkg / "toykind").mkdir(parents=True)
    (pkg / "toykind" / "__init__.py").write_text(TOY)
    dist = pkg / "toykind-0.1.dist-info"  # what `pip install` of a package declaring the entry point leaves
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toykind\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[imgaug_gen.generators]\ntoy = toykind:ToyGenerator\n")
    conf = tmp_path / "conf" / "model"
    conf.mkdir(parents=True)
    (conf / "toy.yaml").write_text("_target_: toykind.ToyModule\nlr: 0.5\n")
    monkeypatch.syspath_prepend(str(pkg))
    importlib.invalidate_caches()
    yield tmp_path
    base.KINDS.classes.pop("toy", None)
    sys.modules.pop("toykind", None)


def test_a_plugin_kind_trains_loads_and_generates(toy_package, tmp_path):
    from imgaug_gen.generators import base
    from imgaug_gen.jobs.generate import generate
    from imgaug_gen.jobs.train import train

    run, out = tmp_path / "run", tmp_path / "out"
    searchpath = f"hydra.searchpath=[file://{toy_package / 'conf'}]"
    cfg = compose_config(
        "train",
        [
            "model=toy",
            searchpath,
            *TINY_DATA,
            *TINY_METRICS,
            *TINY_CALLBACKS,
            "trainer.max_steps=6",
            "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false",
            "callbacks.fidelity=null",
            f"run_dir={run}",
        ],
    )
    train(cfg)
    assert json.loads((run / "generator" / "config.json").read_text())["kind"] == "toy"
    # a fresh process would not have imported it: forget it, and let the entry point find it
    base.KINDS.classes.pop("toy", None)
    sys.modules.pop("toykind", None)
    metrics = generate(
        compose_config(
            "generate",
            [
                f"run_dir={run}",
                f"out_dir={out}",
                "n_per_class=3",
                "include_real=false",
                "score=false",
                "progress=false",
            ],
        )
    )
    per_class = class_counts(out)
    assert per_class == {str(c): 3 for c in range(10)} and metrics["n_synthetic"] == 30
    with pytest.raises(ConfigError, match=r"`sample_kwargs` has unknown keys \['eta'\] for a `toy` generator"):
        base.load_generator(run / "generator").sample([0], eta=0.5)


def test_unknown_kind_and_wrong_module_class_are_clear(tmp_path):
    from imgaug_gen.generators.base import generator_class
    from imgaug_gen.jobs.train import build_module

    with pytest.raises(ConfigError, match=r"Unknown generator kind `nope`; known kinds: \[.*'cgan'.*'ddpm'.*'sd_lora'"):
        generator_class("nope")
    cfg = compose_config("train", ["model=cgan", "model._target_=torch.nn.Identity", f"run_dir={tmp_path}", *TINY_DATA])

    class DM:
        num_classes, class_names, image_shape = 3, ["a", "b", "c"], (1, 16, 16)

    with pytest.raises(
        ConfigError,
        match=r"`model._target_` = 'torch.nn.Identity' builds a Identity, not an "
        r"imgaug_gen.generators.GeneratorModule",
    ):
        build_module(cfg, DM())
