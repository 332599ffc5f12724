"""Classical augmentation: presets from the real config, seeding, recorded-params replay, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from omegaconf import OmegaConf

from imgaug_gen.augment import Augmenter, build_augmenter
from imgaug_gen.errors import ConfigError

from conftest import ROOT, digits_images


def _preset(name: str):
    """The augment node exactly as generate.py composes it (`augment=<name>`)."""
    from imgaug_gen.config import compose_config

    cfg = compose_config("generate", ["run_dir=/tmp/run", "out_dir=/tmp/out", f"augment={name}"])
    return cfg.augment


def _image(size: int, channels: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, channels), dtype=np.uint8)


@pytest.fixture(scope="module")
def presets():
    return {name: _preset(name) for name in ("none", "light", "strong")}


def test_none_builds_nothing(presets):
    assert build_augmenter(presets["none"]) is None
    assert build_augmenter(None) is None


@pytest.mark.parametrize("name", ["light", "strong"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [8, 16, 64])
def test_presets_keep_shape_and_dtype(presets, name, channels, size):
    aug = build_augmenter(presets[name], image_shape=(size, size, channels))
    img = _image(size, channels)
    for seed in range(8):
        out, applied = aug.apply(img, seed)
        assert out.shape == img.shape and out.dtype == np.uint8
        json.dumps(applied)  # recordable in the manifest as is
    assert aug.apply_to == "synthetic" and aug.copies_per_image == 1


@pytest.mark.parametrize("name", ["light", "strong"])
def test_presets_have_no_horizontal_flip_and_change_images(presets, name):
    text = json.dumps(OmegaConf.to_container(presets[name]))
    assert "Flip" not in text  # a mirrored digit is another class
    aug = build_augmenter(presets[name])
    images, _ = digits_images(n_per_class=2, size=16, channels=1)
    changed = [not np.array_equal(aug.apply(im[..., None], s)[0], im[..., None]) for s, im in enumerate(images)]
    assert np.mean(changed) > 0.5


def test_same_seed_same_bytes_and_record(presets):
    aug = build_augmenter(presets["strong"])
    img = _image(16, 3)
    outs = {s: aug.apply(img, s) for s in range(20)}
    for s in range(20):
        again, rec = aug.apply(img, s)
        assert np.array_equal(again, outs[s][0]) and rec == outs[s][1]
        assert rec["seed"] == s
    # different seeds give different images (and the order of calls does not matter)
    assert len({outs[s][0].tobytes() for s in range(20)}) > 15


def test_replay_from_recorded_params_and_serialised_config(presets):
    aug = build_augmenter(presets["strong"])
    images, _ = digits_images(n_per_class=3, size=16, channels=3)
    seeds = [101, 7, 2**31 + 5, 0, 42, 9, 13, 77, 3]
    outs, records = aug.apply_batch(np.stack(images), seeds)
    # what generate.py stores: to_dict() in config.yaml, the record in each manifest line
    stored_cfg = json.loads(json.dumps(aug.to_dict()))
    stored_recs = json.loads(json.dumps(records))
    rebuilt = Augmenter.from_dict(stored_cfg)
    for img, out, rec in zip(images, outs, stored_recs):
        assert np.array_equal(rebuilt.replay(img, rec), out)
    names = {t["name"] for rec in records for t in rec["transforms"]}
    assert names and names <= {
        "Affine",
        "Perspective",
        "RandomBrightnessContrast",
        "GaussianBlur",
        "GaussNoise",
        "CoarseDropout",
    }
    assert stored_cfg["name"] == "strong" and stored_cfg["transform"]["__class_fullname__"] == "Compose"


def test_transforms_draw_independently():
    """albumentations' Compose(seed) gives every transform the same seed; ours must not."""
    aug = build_augmenter(
        {"name": "custom", "transforms": [{"name": "InvertImg", "p": 0.5}, {"name": "VerticalFlip", "p": 0.5}]}
    )
    img = _image(8, 1)
    fired = [[t["name"] for t in aug.apply(img, s)[1]["transforms"]] for s in range(400)]
    both = np.mean([len(f) == 2 for f in fired])
    one = np.mean([len(f) == 1 for f in fired])
    assert 0.15 < both < 0.35 and 0.35 < one < 0.65


def test_custom_example_and_nested_containers():
    cfg = OmegaConf.load(ROOT / "conf" / "augment" / "custom_example.yaml")
    aug = build_augmenter(cfg, image_shape=(32, 32, 3))
    assert aug.apply_to == "all" and aug.copies_per_image == 2
    out, rec = aug.apply(_image(32, 3), 3)
    assert out.shape == (32, 32, 3)
    json.dumps(rec)


@pytest.mark.parametrize(
    ("transforms", "match"),
    [
        (
            [{"name": "Affine", "p": 0.5}, {"name": "HorizonalFlip"}],
            r"`augment.transforms\[1\].name` = 'HorizonalFlip' is not an albumentations transform\. "
            r"Did you mean \['HorizontalFlip'",
        ),
        ([{"name": "Affine", "rotat": [-5, 5]}], r"`augment.transforms\[0\]` \(Affine\) has a bad argument: .*rotat"),
        ([{"name": "GaussNoise", "std_range": "big"}], r"`augment.transforms\[0\]` \(GaussNoise\) has a bad argument"),
        ([{"name": "Affine", "p": 1.5}], r"`augment.transforms\[0\]` \(Affine\) has a bad argument"),
        ([{"p": 0.5}], r"`augment.transforms\[0\]` = .* must be a mapping with a `name` key"),
        ([{"name": "Compose"}], r"`augment.transforms\[0\].name` = 'Compose' is not an albumentations transform"),
        (
            [{"name": "OneOf", "transforms": [{"name": "Blur"}, {"name": "Nope"}]}],
            r"`augment.transforms\[0\].transforms\[1\].name` = 'Nope'",
        ),
        ([{"name": "OneOf"}], r"`augment.transforms\[0\]` \(OneOf\) needs a non-empty `transforms` list"),
    ],
)
def test_bad_transforms_name_the_key(transforms, match):
    with pytest.raises(ConfigError, match=match):
        build_augmenter({"name": "custom", "transforms": transforms})


def test_bad_top_level_keys():
    with pytest.raises(ConfigError, match=r"`augment.apply_to` = 'real'; allowed: \['synthetic', 'all'\]"):
        build_augmenter({"name": "light", "apply_to": "real", "transforms": []})
    with pytest.raises(ConfigError, match=r"`augment.copies_per_image` = 0; give an int >= 1"):
        build_augmenter({"name": "light", "copies_per_image": 0, "transforms": [{"name": "Blur"}]})
    with pytest.raises(ConfigError, match=r"`augment` has unknown key\(s\) \['transform'\]"):
        build_augmenter({"name": "light", "transform": []})
    with pytest.raises(ConfigError, match=r"`augment.transforms` = .* must be a list"):
        build_augmenter({"name": "light", "transforms": "Affine"})


def test_shape_changing_transform_is_rejected():
    cfg = {"name": "custom", "transforms": [{"name": "Blur"}, {"name": "RandomCrop", "height": 8, "width": 8}]}
    with pytest.raises(
        ConfigError,
        match=r"`augment.transforms\[1\]` \(RandomCrop\) changes the image shape "
        r"from \(16, 16, 1\) to \(8, 8, 1\)",
    ):
        build_augmenter(cfg, image_shape=(16, 16, 1))
    aug = build_augmenter(cfg)  # without a shape the check happens at apply time
    with pytest.raises(ConfigError, match=r"changed the image shape from \(16, 16, 1\) to \(8, 8, 1\)"):
        for s in range(20):
            aug.apply(_image(16, 1), s)


def test_apply_checks_its_inputs():
    aug = build_augmenter({"name": "custom", "transforms": [{"name": "Blur"}]})
    with pytest.raises(ConfigError, match=r"`image` must be a uint8 array \[H, W, C\]"):
        aug.apply(np.zeros((8, 8, 3), np.float32), 0)
    with pytest.raises(ConfigError, match=r"`seed` must be an int"):
        aug.apply(_image(8, 3), 0.5)
