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
from imgaug_gen.metrics import domain as features_mod

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


# The `domain` fixture's training steps: 80 (the default is 300) already reach ~95 % on held-out digits.
DOMAIN_STEPS = 80


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
    return fit_domain_features(digits["x_train"], digits["y_train"], 10, cache_dir, seed=0, steps=DOMAIN_STEPS)


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
    assert meta["recipe"]["steps"] == DOMAIN_STEPS
    assert 0.9 < meta["train_accuracy"] <= 1.0
    assert not list(folder.glob("*.tmp")), "temporary files left behind"


def test_domain_cache_hit_loads_without_training(domain, digits, cache_dir, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("cache hit must not train")

    monkeypatch.setattr(features_mod, "_train_domain_classifier", boom)
    again = fit_domain_features(digits["x_train"], digits["y_train"], 10, cache_dir, seed=0, steps=DOMAIN_STEPS)
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
        type(domain),
        "features",
        lambda self, im, batch_size=256: calls.append(len(im)) or original(self, im, batch_size),
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
    cfg.cache_dir, cfg.domain_steps = str(cache_dir), DOMAIN_STEPS
    monkeypatch.setattr(features_mod, "_train_domain_classifier", lambda *a, **k: pytest.fail("must not train"))
    ex = build_feature_extractor(cfg, digits["x_train"], digits["y_train"], 10)
    assert isinstance(ex, DomainFeatures) and ex.loaded_from_cache and ex.cache_key == domain.cache_key


def test_build_rejects_unknown_features_and_missing_reference():
    with pytest.raises(
        ConfigError,
        match=r"`metrics.features` = 'vgg': input should be 'domain', 'inception', "
        r"'dinov2' or 'clip'",
    ):
        build_feature_extractor({"features": "vgg"})
    with pytest.raises(ConfigError, match=r"pass `reference_images`, `reference_labels` and `num_classes`"):
        build_feature_extractor({"features": "domain"})
    with pytest.raises(ConfigError, match=r"`metrics.domain_steps` = 0: input should be greater than or equal to 1"):
        build_feature_extractor({"domain_steps": 0}, np.zeros((4, 8, 8, 1), np.uint8), np.arange(4) % 2, 2)
    with pytest.raises(
        ConfigError, match=r"`metrics.inception_wieghts` is not a key .*allowed here: .*'inception_weights'"
    ):
        build_feature_extractor({"features": "inception", "inception_wieghts": "x.pth"})


@pytest.mark.parametrize("kind", ["inception", "dinov2", "clip"])
def test_pretrained_features_without_local_weights_are_a_config_error(kind, tmp_path):
    with pytest.raises(
        ConfigError,
        match=rf"`metrics.features` = '{kind}' needs `metrics.{kind}_weights`.*nothing is "
        r"downloaded.*metrics.features=domain",
    ):
        build_feature_extractor({"features": kind})
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=rf"`metrics.{kind}_weights` = '{missing}' is not a (file|folder)"):
        build_feature_extractor({"features": kind, f"{kind}_weights": missing})


# --------------------------------------------------------------------------- #
# The standard FID Inception (random weights of the real architecture, from a local file)
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def fid_inception_file(tmp_path_factory):
    """torch-fidelity's FID Inception-v3 with random weights, saved as a local file (the real one is
    the 2015-12-05 TensorFlow port; no download here: its loader is bypassed to build the layers)."""
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.manual_seed(0)
    with (
        mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None),
        mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", return_value={}),
    ):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("fid_inception") / "weights-inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


def test_fid_inception_fid_and_kid_equal_torchmetrics_on_the_same_file(fid_inception_file, digits):
    """metrics.features=inception gives the FID/KID torchmetrics computes with the same weights file."""
    from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = digits["x_test"][:5], digits["x_train"][:4]  # few images: Inception forwards are the cost
    ex = build_feature_extractor({"features": "inception", "inception_weights": str(fid_inception_file)})
    assert isinstance(ex, InceptionFeatures) and ex.num_features == 2048 and "fid-inception" in ex.name
    ours = compute_fidelity(real, fake, ex, kid_subset_size=4, kid_subsets=5, seed=3)

    rgb = lambda x: images_to_tensor(np.repeat(x, 3, axis=-1))  # noqa: E731 - torchmetrics' Inception takes RGB
    fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(fid_inception_file))
    kid = KernelInceptionDistance(
        feature=NoTrainInceptionV3("inception-v3-compat", ["2048"], str(fid_inception_file)), subsets=5, subset_size=4
    )
    for metric in (fid, kid):
        metric.update(rgb(real), real=True)
        metric.update(rgb(fake), real=False)
    torch.manual_seed(3)
    kid_mean, kid_std = kid.compute()
    assert ours["fid"] > 0
    assert ours["fid"] == pytest.approx(float(fid.compute()), rel=1e-3)
    assert ours["kid_mean"] == pytest.approx(float(kid_mean), rel=1e-3)
    assert ours["kid_std"] == pytest.approx(float(kid_std), rel=1e-3)
    # same images -> 0; grayscale and its RGB replica give the same features
    same = compute_fidelity(real[:2], real[:2], ex, kid_subset_size=2, kid_subsets=2)
    assert same["fid"] == pytest.approx(0, abs=1e-3)
    torch.testing.assert_close(ex.features(real[:2]), ex.features(np.repeat(real[:2], 3, axis=-1)))


def test_fid_inception_loads_safetensors_and_rejects_other_files(fid_inception_file, tmp_path, digits):
    from safetensors.torch import save_file
    from torchvision.models import inception_v3

    ref = InceptionFeatures(fid_inception_file)
    st = tmp_path / "fid_inception.safetensors"
    save_file({k: v.contiguous() for k, v in torch.load(fid_inception_file, weights_only=True).items()}, str(st))
    torch.testing.assert_close(InceptionFeatures(st).features(digits["x_test"][:2]), ref.features(digits["x_test"][:2]))

    tv = tmp_path / "torchvision_inception.pth"
    torch.save(inception_v3(weights=None, aux_logits=False, init_weights=False).state_dict(), tv)
    with pytest.raises(
        ConfigError,
        match=r"is torchvision's ImageNet Inception-v3 \(1000 classes\), not the FID "
        r"Inception.*weights-inception-2015-12-05-6726825d.pth",
    ):
        InceptionFeatures(tv)
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(3)}, bad)
    with pytest.raises(ConfigError, match=r"is not the FID Inception-v3 state dict"):
        InceptionFeatures(bad)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"could not be read as a state dict"):
        InceptionFeatures(garbage)


# --------------------------------------------------------------------------- #
# DINOv2 and CLIP (tiny random models of the real classes, saved and loaded from a local folder)
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14, image_size=224
    )
    path = tmp_path_factory.mktemp("dinov2") / "tiny-dinov2"
    Dinov2Model(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=8,
        image_size=32,
        projection_dim=16,
    )
    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    CLIPVisionModelWithProjection(cfg).save_pretrained(path)
    return path


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance written out with scipy (the reference computation)."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fd_dinov2_equals_a_direct_computation(dinov2_dir, digits):
    import torch.nn.functional as F
    from transformers import Dinov2Model

    from imgaug_gen.metrics import DINOv2Features

    real, fake = digits["x_test"][:40], digits["x_train"][:40]
    ex = build_feature_extractor({"features": "dinov2", "dinov2_weights": str(dinov2_dir)})
    assert isinstance(ex, DINOv2Features) and ex.num_features == 32
    ours = compute_fidelity(real, fake, ex, kid_subsets=2)

    model = Dinov2Model.from_pretrained(dinov2_dir).eval()

    def direct(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        mean, std = (
            torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
            torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1),
        )
        with torch.no_grad():
            return model(pixel_values=(x - mean) / std).pooler_output.double().numpy()

    assert ours["features"] == ex.name and ours["num_features"] == 32
    assert ours["fid"] == pytest.approx(_frechet(direct(real), direct(fake)), rel=1e-3)


def test_fd_clip_features_and_folder_checks(clip_dir, dinov2_dir, digits, tmp_path):
    from transformers import CLIPVisionModelWithProjection

    from imgaug_gen.metrics import CLIPFeatures

    ex = build_feature_extractor({"features": "clip", "clip_weights": str(clip_dir)})
    assert isinstance(ex, CLIPFeatures) and ex.num_features == 16 and ex.size == 32
    f = ex.features(digits["x_test"][:5])
    model = CLIPVisionModelWithProjection.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        direct = model(pixel_values=ex.preprocess(images_to_tensor(digits["x_test"][:5]))).image_embeds
    torch.testing.assert_close(f, direct.float())
    out = compute_fidelity(digits["x_test"][:30], digits["x_train"][:30], ex, kid_subsets=2)
    assert out["fid"] > 0 and math.isfinite(out["kid_mean"])

    with pytest.raises(
        ConfigError,
        match=r"`metrics.clip_weights` = .*tiny-dinov2' holds a 'dinov2' model, expected "
        r"one of \['clip', 'clip_vision_model'\].*huggingface-cli download",
    ):
        CLIPFeatures(dinov2_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"has no config.json"):
        CLIPFeatures(tmp_path / "empty")


def test_feature_fid_state_is_a_torchmetrics_metric(domain, digits):
    """FID's states are sums a DDP reduce adds up: two halves merged give the whole."""
    from imgaug_gen.metrics import FeatureFID

    real, fake = domain.features(digits["x_test"][:60]), domain.features(digits["x_train"][:60])
    whole, a, b = (FeatureFID(domain.num_features) for _ in range(3))
    whole.update(real, real=True)
    whole.update(fake, real=False)
    a.update(real[:30], real=True), a.update(fake[:25], real=False)
    b.update(real[30:], real=True), b.update(fake[25:], real=False)
    a.merge_state(b)
    assert float(a.compute()) == pytest.approx(float(whole.compute()), rel=1e-6)
    assert float(whole.compute()) == pytest.approx(_frechet(real.double().numpy(), fake.double().numpy()), rel=1e-6)
