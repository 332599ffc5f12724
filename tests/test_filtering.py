"""Quality filtering: confidence and memorisation filters, summaries, over-generation plans."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imgaug_gen.errors import ConfigError
from imgaug_gen.filtering import (
    QualityFilter,
    calibrate_delta,
    confidence_filter,
    memorisation_filter,
    nearest_real_distance,
    overgenerate_plan,
    select_accepted,
    summarise,
)

from conftest import digits_images


# --------------------------------------------------------------------------- pure functions
def test_confidence_filter():
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.55, 0.45], [0.2, 0.8]])
    labels = np.array([0, 0, 0, 1])
    assert confidence_filter(probs, labels, 0.5).tolist() == [True, False, True, True]
    assert confidence_filter(probs, labels, None).all()
    with pytest.raises(ConfigError, match=r"`filter.tau` = 1.5; give a number in \[0.0, 1.0\] or null"):
        confidence_filter(probs, labels, 1.5)
    with pytest.raises(ConfigError, match=r"`labels` must lie in \[0, 1\]"):
        confidence_filter(probs, np.array([0, 0, 0, 2]), 0.5)


def test_nearest_real_distance_finds_copies_and_is_chunk_independent():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((57, 16)).astype(np.float32)
    syn = np.concatenate([real[[3, 10, 40]] * 2.5, rng.standard_normal((20, 16)).astype(np.float32)])
    d, idx = nearest_real_distance(syn, real)
    assert d.shape == (23,) and d.dtype == np.float32 and idx.dtype == np.int64
    assert idx[:3].tolist() == [3, 10, 40] and np.allclose(d[:3], 0, atol=1e-6)  # scale-invariant (normalised)
    assert (d[3:] > 0.05).all()
    d2, idx2 = nearest_real_distance(syn, real, chunk=4)
    assert np.allclose(d, d2, atol=1e-6) and (idx == idx2).all()
    # brute force reference, L2 on unit vectors
    s = syn / np.linalg.norm(syn, axis=1, keepdims=True)
    r = real / np.linalg.norm(real, axis=1, keepdims=True)
    full = np.linalg.norm(s[:, None] - r[None], axis=-1)
    dl2, il2 = nearest_real_distance(syn, real, metric="l2", chunk=5)
    assert np.allclose(dl2, full.min(1), atol=1e-5) and (il2 == full.argmin(1)).all()
    # leave-one-out on the real set itself never returns the point itself
    _, self_idx = nearest_real_distance(real, real, exclude_self=True, chunk=7)
    assert (self_idx != np.arange(57)).all()
    with pytest.raises(ConfigError, match=r"`filter.metric` = 'manhattan'; allowed: \['cosine', 'l2'\]"):
        nearest_real_distance(syn, real, metric="manhattan")
    with pytest.raises(ConfigError, match=r"must come from the same extractor"):
        nearest_real_distance(syn, real[:, :8])


def test_memorisation_filter_and_calibration():
    d = np.array([0.0, 0.001, 0.2, 0.5])
    assert memorisation_filter(d, 0.01).tolist() == [False, False, True, True]
    assert memorisation_filter(d, None).all()
    with pytest.raises(ConfigError, match=r"`filter.delta` = -1"):
        memorisation_filter(d, -1)
    feats = np.random.default_rng(1).standard_normal((50, 8))
    loo, _ = nearest_real_distance(feats, feats, exclude_self=True)
    assert calibrate_delta(feats, quantile=0.0) == pytest.approx(float(loo.min()), abs=1e-6)
    assert 0 < calibrate_delta(feats) < float(np.median(loo))


def test_overgenerate_plan_and_select_accepted():
    assert overgenerate_plan(100, 1.0, 3.0) == 110  # 10% margin
    assert overgenerate_plan(100, 0.5, 3.0) == 220
    assert overgenerate_plan(100, 0.1, 3.0) == 300  # capped at max_factor
    assert overgenerate_plan(100, 0.0, 2.0) == 200
    assert overgenerate_plan(100, 0.5, 1.0) == 100  # no over-generation allowed
    assert overgenerate_plan(100, 0.8, 3.0, margin=0.0) == 125
    assert overgenerate_plan(0, 0.5) == 0
    with pytest.raises(ConfigError, match=r"`filter.max_factor` = 0.5; give a number >= 1"):
        overgenerate_plan(10, 0.5, 0.5)
    with pytest.raises(ConfigError, match=r"`acceptance_estimate` = 1.2; give a fraction in \[0, 1\]"):
        overgenerate_plan(10, 1.2)
    keep = np.array([1, 0, 1, 1, 1, 0, 1, 1], bool)
    labels = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    assert select_accepted(keep, labels, 2).tolist() == [0, 2, 3, 6]
    assert select_accepted(keep, labels, {0: 1, 1: 5}).tolist() == [0, 3, 6, 7]


def test_summarise_counts():
    scores = {
        "confidence": np.array([0.9, 0.2, 0.8, 0.1, 0.95]),
        "nearest_real_distance": np.array([0.5, 0.5, 0.0, 0.0, 0.3]),
    }
    labels = np.array([0, 0, 1, 1, 1])
    keep = confidence_filter(np.stack([scores["confidence"]] * 2, 1), np.zeros(5, np.int64), 0.5) & memorisation_filter(
        scores["nearest_real_distance"], 0.01
    )
    s = summarise(scores, keep, labels, ["a", "b"], tau=0.5, delta=0.01)
    json.dumps(s)
    assert (s["n"], s["kept"], s["low_confidence"], s["memorised"]) == (5, 2, 2, 2)
    assert s["acceptance_rate"] == pytest.approx(0.4) and s["memorisation_rate"] == pytest.approx(0.4)
    assert s["per_class"]["a"] == {**s["per_class"]["a"], "n": 2, "kept": 1, "low_confidence": 1, "memorised": 0}
    assert s["per_class"]["b"]["memorised"] == 2 and s["per_class"]["b"]["acceptance_rate"] == pytest.approx(1 / 3)
    empty = summarise(scores, keep, labels, ["a", "b", "c"])
    assert empty["per_class"]["c"]["n"] == 0 and empty["per_class"]["c"]["acceptance_rate"] is None


# --------------------------------------------------------------------------- the filter on images
@pytest.fixture(scope="module")
def digit_setup():
    """10-class digits: 15 real training images per class and a trained (tiny) domain network."""
    from imgaug_gen.metrics import fit_domain_features

    images, labels = digits_images(n_per_class=25, classes=range(10), size=16, channels=1, seed=0)
    x = np.stack(images)[..., None]
    y = np.asarray(labels, np.int64)
    train = np.concatenate([np.flatnonzero(y == c)[:15] for c in range(10)])
    held = np.concatenate([np.flatnonzero(y == c)[15:] for c in range(10)])
    domain = fit_domain_features(x[train], y[train], 10, cache_dir=None, seed=0, steps=80)
    return domain, x[train], y[train], x[held], y[held]


@pytest.mark.parametrize("space", ["features", "pixels"])
def test_quality_filter_flags_copies_and_noise(digit_setup, space):
    domain, real_x, real_y, held_x, held_y = digit_setup
    rng = np.random.default_rng(1)
    copies = rng.choice(len(real_x), 20, replace=False)
    noise = rng.integers(0, 256, (30, 16, 16, 1), dtype=np.uint8)
    images = np.concatenate([real_x[copies], held_x, noise])
    labels = np.concatenate([real_y[copies], held_y, np.arange(30) % 10])
    kinds = np.array(["copy"] * 20 + ["novel"] * len(held_x) + ["noise"] * 30)

    qf = QualityFilter(domain, real_x, tau=0.5, delta="auto", space=space)
    assert 0 < qf.delta < 0.05
    scores = qf.score(images, labels)
    assert set(scores) == {"confidence", "predicted", "nearest_real_distance", "nearest_real_index"}
    assert (scores["nearest_real_index"][:20] == copies).all()
    flags, keep = qf.flags(scores), qf.keep(scores)
    assert flags["memorised"][kinds == "copy"].all()  # exact copies of training images are flagged
    assert flags["memorised"][kinds != "copy"].mean() < 0.05  # new images are not
    assert flags["low_confidence"][kinds == "noise"].mean() > 0.8  # noise is not recognisably its class
    assert keep[kinds == "novel"].mean() > 0.6
    assert not keep[kinds == "copy"].any()

    s = qf.summarise(scores, keep, labels, [str(c) for c in range(10)])
    json.dumps(s)
    assert s["memorised"] == int(flags["memorised"].sum()) and s["kept"] == int(keep.sum())
    assert sum(v["n"] for v in s["per_class"].values()) == len(images)
    rec = QualityFilter.record(scores, 0)
    assert set(rec) == set(scores) and isinstance(rec["nearest_real_index"], int)
    json.dumps(rec)


def test_quality_filter_errors(digit_setup):
    domain, real_x, *_ = digit_setup
    with pytest.raises(ConfigError, match=r"`filter.delta` = 'tiny'; give a distance in \[0, 2\], 'auto' or null"):
        QualityFilter(domain, real_x, delta="tiny")
    with pytest.raises(ConfigError, match=r"`filter.space` = 'latent'"):
        QualityFilter(domain, real_x, space="latent")

    class NoClassifier:
        name = "inception-v3-torchvision-pool3"

    with pytest.raises(ConfigError, match=r"`filter.tau` = 0.5 needs a classifier .* `metrics.features=domain`"):
        QualityFilter(NoClassifier(), real_x, tau=0.5)
    qf = QualityFilter(domain, real_x, space="pixels")
    with pytest.raises(ConfigError, match=r"`filter.space=pixels` needs images of the real images' shape"):
        qf.score(np.zeros((2, 8, 8, 1), np.uint8), [0, 1])
