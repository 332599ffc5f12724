"""Tests of imgaug_gen.metrics: feature extractors, their cache, FID/KID."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from sklearn.datasets import load_digits

from imgaug_gen.errors import ConfigError
from imgaug_gen.metrics import (
    DomainFeatures,
    FidelityEvaluator,
    InceptionFeatures,
    build_feature_extractor,
    clear_real_stats_cache,
    compute_fidelity,
    fit_domain_features,
    images_to_tensor,
)
from imgaug_gen.metrics import features as features_mod

CONF_METRICS = Path(__file__).resolve().parents[1] / "conf" / "metrics" / "default.yaml"


def digits_uint8(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits as uint8 [N, size, size, 1] (bilinear upsampling) and int64 labels."""
    d = load_digits()
    small = (d.images / 16.0 * 255.0).round().clip(0, 255).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in small])
    return big[..., None], d.target.astype(np.int64)


def noise_images(n: int, size: int = 32, channels: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(128, 64, size=(n, size, size, channels)).round().clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def digits():
    x, y = digits_uint8()
    perm = np.random.default_rng(0).permutation(len(x))
    train, test = perm[:1200], perm[1200:]
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("metrics_cache")


@pytest.fixture(scope="module")
def domain(digits, cache_dir) -> DomainFeatures:
    return fit_domain_features(digits["x_train"], digits["y_train"], 10, cache_dir, seed=0)


@pytest.fixture(autouse=True)
def _fresh_memory_cache():
    clear_real_stats_cache()
    yield
    clear_real_stats_cache()


# --------------------------------------------------------------------------- #
# Domain features
# --------------------------------------------------------------------------- #
def test_domain_classifier_is_accurate_on_held_out_digits(domain, digits):
    assert not domain.loaded_from_cache
    proba = domain.predict_proba(digits["x_test"])
    assert proba.shape == (len(digits["x_test"]), 10)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
    acc = float((proba.argmax(1) == digits["y_test"]).mean())
    assert acc > 0.90, acc
    assert domain.num_features == 128 and domain.name == "domain-cnn-128"


def test_domain_cache_entry_is_written_atomically(domain, cache_dir):
    folder = Path(cache_dir) / "domain_features"
    assert (folder / f"{domain.cache_key}.safetensors").is_file()
    meta = json.loads((folder / f"{domain.cache_key}.json").read_text())
    assert meta["key"] == domain.cache_key
    assert meta["config"]["feature_dim"] == 128 and meta["config"]["in_channels"] == 1
    assert meta["recipe"]["steps"] == features_mod.DEFAULT_DOMAIN_STEPS
    assert 0.9 < meta["train_accuracy"] <= 1.0
    assert not list(folder.glob("*.tmp")), "temporary files left behind"


def test_domain_cache_hit_loads_without_training(domain, digits, cache_dir, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("cache hit must not train")

    monkeypatch.setattr(features_mod, "_train_domain_classifier", boom)
    again = fit_domain_features(digits["x_train"], digits["y_train"], 10, cache_dir, seed=0)
    assert again.loaded_from_cache and again.cache_key == domain.cache_key
    assert again.train_accuracy == pytest.approx(domain.train_accuracy)
    x = digits["x_test"][:64]
    assert torch.equal(again.features(x), domain.features(x))


def test_domain_cache_key_depends_on_data_labels_and_recipe(digits, tmp_path):
    x, y = digits["x_train"][:60], digits["y_train"][:60]
    base = fit_domain_features(x, y, 10, tmp_path, steps=2)
    other_images = fit_domain_features(digits["x_train"][1:61], y, 10, tmp_path, steps=2)
    other_labels = fit_domain_features(x, (y + 1) % 10, 10, tmp_path, steps=2)
    other_steps = fit_domain_features(x, y, 10, tmp_path, steps=3)
    other_seed = fit_domain_features(x, y, 10, tmp_path, steps=2, seed=1)
    keys = {m.cache_key for m in (base, other_images, other_labels, other_steps, other_seed)}
    assert len(keys) == 5
    assert not any(m.loaded_from_cache for m in (base, other_images, other_labels, other_steps, other_seed))
    assert len(list((tmp_path / "domain_features").glob("*.safetensors"))) == 5


def test_domain_training_and_features_are_deterministic(digits):
    x, y = digits["x_train"][:80], digits["y_train"][:80]
    rng_before = torch.get_rng_state()
    a = fit_domain_features(x, y, 10, None, steps=5)
    b = fit_domain_features(x, y, 10, None, steps=5)
    assert torch.equal(torch.get_rng_state(), rng_before), "training must not consume the global RNG"
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    q = digits["x_test"][:32]
    assert torch.equal(a.features(q), a.features(q))
    assert torch.equal(a.features(q), b.features(q))
    # batching changes BLAS blocking, so only round-off may differ
    torch.testing.assert_close(a.features(q, batch_size=7), a.features(q))


def test_domain_features_accept_gray_rgb_and_any_size(domain, digits):
    gray = digits["x_test"][:16]
    rgb = np.repeat(gray, 3, axis=-1)
    f_gray, f_rgb = domain.features(gray), domain.features(rgb)
    assert f_gray.shape == (16, 128) and f_gray.dtype == torch.float32
    torch.testing.assert_close(f_rgb, f_gray, atol=1e-4, rtol=1e-4)  # luminance of replicated gray == gray
    big = np.stack([np.asarray(Image.fromarray(im[..., 0]).resize((48, 48))) for im in gray])[..., None]
    assert domain.features(big).shape == (16, 128)
    # the extractor stays frozen even if a parent switches to training mode
    domain.train()
    assert not domain.training and not any(m.training for m in domain.modules())
    assert not any(p.requires_grad for p in domain.parameters())


def test_domain_features_reject_bad_images(domain):
    with pytest.raises(ConfigError, match=r"`images` must have dtype uint8"):
        domain.features(np.zeros((2, 32, 32, 1), dtype=np.float32))
    with pytest.raises(ConfigError, match=r"C = 1 or 3, got shape \(2, 32, 32, 4\)"):
        domain.features(np.zeros((2, 32, 32, 4), dtype=np.uint8))
    with pytest.raises(ConfigError, match=r"uint8 images \[N, C, H, W\]"):
        domain(torch.zeros(2, 1, 32, 32))


def test_fit_domain_features_rejects_bad_labels(digits):
    x = digits["x_train"][:10]
    with pytest.raises(ConfigError, match=r"`labels` must lie in \[0, 9\].*got values in \[1, 10\]"):
        fit_domain_features(x, np.arange(10) + 1, 10, None, steps=1)
    with pytest.raises(ConfigError, match=r"`labels` must be an integer array of shape \[10\]"):
        fit_domain_features(x, np.zeros(9, dtype=np.int64), 10, None, steps=1)


# --------------------------------------------------------------------------- #
# FID / KID
# --------------------------------------------------------------------------- #
def test_fid_kid_of_a_set_with_itself_is_zero_and_noise_is_far(domain, digits):
    real_a, real_b = digits["x_test"][:250], digits["x_test"][250:500]
    same = compute_fidelity(real_a, real_a, domain)
    disjoint = compute_fidelity(real_a, real_b, domain)
    noise = compute_fidelity(real_a, noise_images(250), domain)

    assert set(same) == {"fid", "kid_mean", "kid_std", "n_real", "n_fake", "features", "num_features"}
    assert same["features"] == "domain-cnn-128" and same["num_features"] == 128
    assert same["n_real"] == same["n_fake"] == 250
    scale = noise["fid"]
    assert abs(same["fid"]) < 1e-2 * max(disjoint["fid"], 1e-3)
    assert abs(same["fid"]) < 1e-6 * scale
    assert abs(same["kid_mean"]) < 1e-2 * noise["kid_mean"]
    assert noise["fid"] > 20 * disjoint["fid"] > 0
    assert noise["kid_mean"] > 20 * abs(disjoint["kid_mean"])


def test_small_sets_give_finite_scores_and_clip_kid_subsets(domain, digits):
    real, fake = digits["x_test"][:30], digits["x_train"][:30]
    out = compute_fidelity(real, fake, domain, kid_subset_size=100, kid_subsets=10)
    assert out["n_real"] == out["n_fake"] == 30
    assert all(math.isfinite(out[k]) for k in ("fid", "kid_mean", "kid_std"))
    assert out["fid"] > 0
    # fewer real than fake: subset size clipped to 20
    out = compute_fidelity(real[:20], fake, domain, kid_subsets=5)
    assert math.isfinite(out["fid"]) and math.isfinite(out["kid_mean"])


def test_kid_is_seeded_and_leaves_global_rng_alone(domain, digits):
    real, fake = digits["x_test"][:120], digits["x_train"][:120]
    before = torch.get_rng_state()
    a = compute_fidelity(real, fake, domain, kid_subset_size=50, kid_subsets=10, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    b = compute_fidelity(real, fake, domain, kid_subset_size=50, kid_subsets=10, seed=3)
    c = compute_fidelity(real, fake, domain, kid_subset_size=50, kid_subsets=10, seed=4)
    assert a == b
    assert a["kid_mean"] != c["kid_mean"] and a["fid"] == c["fid"]


def test_evaluator_matches_compute_fidelity_and_extracts_reals_once(domain, digits, monkeypatch):
    real, fake1, fake2 = digits["x_test"][:200], digits["x_train"][:100], noise_images(100)
    expected1 = compute_fidelity(real, fake1, domain, seed=1)
    expected2 = compute_fidelity(real, fake2, domain, seed=1)
    clear_real_stats_cache()

    calls: list[int] = []
    original = type(domain).features

    def counting(self, images, batch_size=256):
        calls.append(len(images))
        return original(self, images, batch_size=batch_size)

    monkeypatch.setattr(type(domain), "features", counting)
    ev = FidelityEvaluator(domain, real, seed=1)
    got1, got2 = ev.evaluate(fake1), ev.evaluate(fake2)
    assert got1 == pytest.approx(expected1) and got2 == pytest.approx(expected2)
    assert calls == [200, 100, 100]  # reals once, then each fake set
    compute_fidelity(real, fake1, domain, seed=1)  # in-memory cache shared with the function
    assert calls == [200, 100, 100, 100]


def test_real_stats_disk_cache(domain, digits, tmp_path, monkeypatch):
    real, fake = digits["x_test"][:100], digits["x_train"][:50]
    first = compute_fidelity(real, fake, domain, cache_dir=tmp_path)
    files = list((tmp_path / "real_stats").glob("*.safetensors"))
    assert len(files) == 1 and not list((tmp_path / "real_stats").glob("*.tmp"))
    clear_real_stats_cache()

    calls: list[int] = []
    original = type(domain).features
    monkeypatch.setattr(
        type(domain), "features", lambda self, im, batch_size=256: calls.append(len(im)) or original(self, im, batch_size)
    )
    second = compute_fidelity(real, fake, domain, cache_dir=tmp_path)
    assert calls == [50]  # reals came from disk
    assert second == pytest.approx(first)


def test_extractor_plugs_into_torchmetrics_directly(domain, digits):
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = digits["x_test"][:100], digits["x_train"][:100]
    fid = FrechetInceptionDistance(feature=domain, normalize=False)
    fid.update(images_to_tensor(real), real=True)
    fid.update(images_to_tensor(fake), real=False)
    ours = compute_fidelity(real, fake, domain)["fid"]
    assert float(fid.compute()) == pytest.approx(ours, rel=1e-3)


def test_fidelity_rejects_bad_inputs(domain, digits):
    real = digits["x_test"][:10]
    with pytest.raises(ConfigError, match=r"`fake_images` needs at least 2 images"):
        compute_fidelity(real, real[:1], domain)
    with pytest.raises(ConfigError, match=r"`real_images` must have dtype uint8"):
        compute_fidelity(real.astype(np.float32), real, domain)
    with pytest.raises(ConfigError, match=r"`metrics.kid_subset_size` must be an int >= 2, got 1"):
        compute_fidelity(real, real, domain, kid_subset_size=1)


# --------------------------------------------------------------------------- #
# Config dispatch and Inception
# --------------------------------------------------------------------------- #
def test_build_from_the_real_config_uses_the_cache(domain, digits, cache_dir, monkeypatch):
    cfg = OmegaConf.load(CONF_METRICS)
    assert cfg.features == "domain" and cfg.inception_weights is None
    cfg.cache_dir = str(cache_dir)
    monkeypatch.setattr(features_mod, "_train_domain_classifier", lambda *a, **k: pytest.fail("must not train"))
    ex = build_feature_extractor(cfg, digits["x_train"], digits["y_train"], 10)
    assert isinstance(ex, DomainFeatures) and ex.loaded_from_cache and ex.cache_key == domain.cache_key


def test_build_rejects_unknown_features_and_missing_reference():
    with pytest.raises(ConfigError, match=r"`metrics.features` = 'clip'.*allowed: domain, inception"):
        build_feature_extractor({"features": "clip"})
    with pytest.raises(ConfigError, match=r"pass `reference_images`, `reference_labels` and `num_classes`"):
        build_feature_extractor({"features": "domain"})
    with pytest.raises(ConfigError, match=r"`metrics.domain_steps` must be a positive int, got 0"):
        build_feature_extractor({"domain_steps": 0}, np.zeros((4, 8, 8, 1), np.uint8), np.arange(4) % 2, 2)


@pytest.mark.parametrize("weights", [None, "/nonexistent/inception.pth"])
def test_inception_without_a_local_file_is_a_config_error(weights):
    with pytest.raises(ConfigError, match=r"`metrics.inception_weights`.*cannot be downloaded.*metrics.features=domain"):
        build_feature_extractor({"features": "inception", "inception_weights": weights})


def test_inception_rejects_a_file_that_is_not_inception(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(3)}, bad)
    with pytest.raises(ConfigError, match=r"not a torchvision inception_v3 state dict"):
        InceptionFeatures(bad)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"could not be read as a state dict"):
        InceptionFeatures(garbage)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    net = inception_v3(weights=None, aux_logits=True, init_weights=True)
    path = tmp_path_factory.mktemp("inception") / "inception_v3_random.pth"
    torch.save(net.state_dict(), path)
    return path, net.state_dict()


def test_inception_from_local_random_weights(inception_file, tmp_path):
    from safetensors.torch import save_file

    path, state = inception_file
    ex = build_feature_extractor({"features": "inception", "inception_weights": str(path)})
    assert isinstance(ex, InceptionFeatures) and ex.num_features == 2048
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (3, 16, 16, 1), dtype=np.uint8)
    rgb = np.repeat(gray, 3, axis=-1)
    f = ex.features(gray)
    assert f.shape == (3, 2048) and torch.isfinite(f).all() and f.abs().sum() > 0
    torch.testing.assert_close(ex.features(rgb), f)  # grayscale is replicated to RGB

    st_path = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(st_path))
    ex_st = InceptionFeatures(st_path)
    torch.testing.assert_close(ex_st.features(gray), f)

    out = compute_fidelity(gray, rng.integers(0, 256, (3, 20, 20, 3), dtype=np.uint8), ex, kid_subsets=3)
    assert out["num_features"] == 2048 and out["features"] == ex.name
    assert math.isfinite(out["fid"]) and math.isfinite(out["kid_mean"])
