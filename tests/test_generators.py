"""The generator contract, run against every generator kind."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from imgaug_gen.errors import ConfigError
from imgaug_gen.generators.base import load_generator, per_image_seeds


@pytest.mark.parametrize("seed", [0, 7, 2**32 - 1, 2**32 + 5, 2**64 + 3, 2**96 + 1])
@pytest.mark.parametrize("start", [0, 977, 2**32 - 3])
def test_per_image_seeds_are_numpys_seed_sequence(seed, start):
    """The batched seeds equal numpy's SeedSequence([seed, i]) image by image (existing folders keep their
    seeds), for seeds of 1 to 4 words and ids near the 32-bit edge; a negative seed is numpy's error."""
    expected = [
        int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint32)[0]) for i in range(start, start + 40)
    ]
    assert per_image_seeds(seed, start, 40) == expected
    assert per_image_seeds(seed, start, 0) == []


def test_per_image_seeds_refuse_a_negative_seed():
    with pytest.raises(ValueError):
        per_image_seeds(-1, 0, 3)


def make_cgan():
    from imgaug_gen.generators.gan import CGANModule

    torch.manual_seed(0)
    module = CGANModule(
        num_classes=3, class_names=["a", "b", "c"], image_shape=[1, 16, 16], z_dim=16, g_width=8, d_width=8
    )
    # move weights and BN statistics off their init values (class gains start equal)
    with torch.no_grad():
        for name, p in module.ema.named_parameters():
            if "gain" in name or "bias" in name:
                p.add_(0.5 * torch.randn_like(p))
        module.ema.train()
        module.ema(torch.randn(8, 16), torch.randint(0, 3, (8,)))
    return module.to_generator()


from factories_ddpm import make_generator as make_ddpm  # noqa: E402
from tiny_sd import make_generator as make_sd_lora  # noqa: E402

FACTORIES = {"cgan": make_cgan, "ddpm": make_ddpm, "sd_lora": make_sd_lora}


@pytest.fixture(params=sorted(FACTORIES))
def generator(request):
    return FACTORIES[request.param]()


class TestGeneratorContract:
    def test_shapes_and_dtype(self, generator):
        c, h, w = generator.image_shape
        out = generator.sample([0, 1, 2, 1], seeds=0)
        assert out.dtype == np.uint8 and out.shape == (4, h, w, c)

    def test_same_seed_same_image_independent_of_batch(self, generator):
        seeds = per_image_seeds(7, 0, 6)
        a = generator.sample([0, 1, 2, 0, 1, 2], seeds=seeds, batch_size=6)
        b = generator.sample([0, 1, 2, 0, 1, 2], seeds=seeds, batch_size=2)
        single = generator.sample([2], seeds=[seeds[5]])
        assert np.array_equal(a, b)
        assert np.array_equal(a[5], single[0])

    def test_seed_and_label_change_output(self, generator):
        a = generator.sample([0, 0], seeds=[1, 2])
        assert not np.array_equal(a[0], a[1])
        b = generator.sample([0, 1], seeds=[1, 1])
        assert not np.array_equal(b[0], b[1])

    def test_save_load_round_trip(self, generator, tmp_path):
        generator.save_pretrained(tmp_path / "gen")
        files = sorted(p.name for p in (tmp_path / "gen").iterdir())
        assert "config.json" in files and any(f.endswith(".safetensors") for f in files)
        assert not any(f.endswith((".pt", ".pth", ".ckpt", ".bin", ".pkl")) for f in files)
        loaded = load_generator(tmp_path / "gen")
        assert type(loaded) is type(generator)
        assert np.array_equal(loaded.sample([0, 1, 2], seeds=3), generator.sample([0, 1, 2], seeds=3))

    def test_bad_labels_rejected(self, generator):
        with pytest.raises(ConfigError, match=r"`labels` must lie in \[0, 2\]"):
            generator.sample([0, 3])
        with pytest.raises(ConfigError, match="`seeds` has 1 entries for 2 labels"):
            generator.sample([0, 1], seeds=[5])

    def test_one_rule_for_unknown_sample_kwargs_and_modes_restored(self, generator):
        allowed = list(generator.sample_kwargs)
        with pytest.raises(
            ConfigError,
            match=rf"`sample_kwargs` has unknown keys \['bogus'\] for a `{generator.kind}` "
            rf"generator; allowed: {re.escape(str(allowed))}",
        ):
            generator.sample([0], bogus=1)
        c, h, w = generator.image_shape
        for training in (True, False):
            generator.train(training)
            generator.sample([0], seeds=1)
            if generator.supports_edit:
                with pytest.raises(ConfigError, match="unknown keys"):
                    generator.edit(np.zeros((1, h, w, c), np.uint8), [0], bogus=1)
                generator.edit(np.zeros((1, h, w, c), np.uint8), [0], strength=0.5, seeds=1)
            assert generator.training is training and all(m.training is training for m in generator.modules())


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="holds no saved generator"):
        load_generator(tmp_path)
    gen = make_cgan()
    gen.save_pretrained(tmp_path / "g")
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    (tmp_path / "g" / "config.json").write_text(json.dumps({**cfg, "format_version": 99}))
    with pytest.raises(ConfigError, match="format_version=99.*Upgrade imgaug_gen"):
        load_generator(tmp_path / "g")
    (tmp_path / "g" / "config.json").write_text(json.dumps({**cfg, "kind": "nope"}))
    with pytest.raises(ConfigError, match="Unknown generator kind `nope`"):
        load_generator(tmp_path / "g")
    (tmp_path / "g" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="holds a `cgan` generator, not `ddpm`"):
        load_generator(tmp_path / "g", expect_kind="ddpm")


def test_gan_cannot_edit():
    gen = make_cgan()
    with pytest.raises(ConfigError, match="`mode=img2img` needs a generator that can edit"):
        gen.edit(np.zeros((1, 16, 16, 1), np.uint8), [0])
