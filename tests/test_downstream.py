"""Metrics beyond FID/KID: improved precision/recall, per-class fidelity, and the downstream classifier."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imgaug_gen.errors import ConfigError
from imgaug_gen.metrics.downstream import (
    classification_accuracy_score,
    compare_methods,
    plot_accuracy_vs_shots,
    results_table_markdown,
    train_and_test,
)
from imgaug_gen.metrics.precision_recall import knn_radii, per_class_fidelity, precision_recall


# --------------------------------------------------------------------------- precision / recall
def _modes(n_modes: int, per_mode: int, seed: int, dim: int = 2) -> np.ndarray:
    """Tight Gaussian blobs around well-separated centres (the centres are fixed)."""
    centres = np.random.default_rng(123).standard_normal((10, dim)) * 20
    rng = np.random.default_rng(seed)
    return np.concatenate([centres[m] + 0.3 * rng.standard_normal((per_mode, dim)) for m in range(n_modes)])


def test_precision_recall_sanity():
    real = _modes(10, 100, seed=0)
    same = precision_recall(real, real)
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["k"] == 3 and same["coverage"] == 1.0
    far = precision_recall(real, real + 1000.0)
    assert far["precision"] == 0.0 and far["recall"] == 0.0 and far["density"] == 0.0 and far["coverage"] == 0.0
    # A fresh sample of the same distribution: both ~1 (k-NN balls miss a few tail points).
    full = precision_recall(real, _modes(10, 100, seed=1))
    assert full["precision"] > 0.93 and full["recall"] > 0.93
    # Covering only modes 0-4: every fake is realistic (precision ~1), half the real data is missed.
    half = precision_recall(real, _modes(5, 100, seed=1))
    assert half["precision"] > 0.93 and half["recall"] == pytest.approx(0.5, abs=0.05)
    assert half["coverage"] == pytest.approx(0.5, abs=0.05)  # half the real balls hold a generated point
    # chunking does not change the result
    assert precision_recall(real, _modes(5, 100, seed=1), chunk=7) == half


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_density_coverage_match_prdc(k):
    """The reference implementation of Naeem et al. (``prdc``) on the same features."""
    prdc = pytest.importorskip("prdc")
    real = _modes(10, 60, seed=0, dim=8)
    for fake in (_modes(10, 50, seed=1, dim=8), _modes(4, 80, seed=2, dim=8) * 1.3, real[::2] + 0.05):
        ours = precision_recall(real, fake, k=k)
        ref = prdc.compute_prdc(real_features=real, fake_features=fake, nearest_k=k)
        for key in ("precision", "recall", "density", "coverage"):
            assert ours[key] == pytest.approx(float(ref[key]), abs=1e-12), key
    # identical sets: every score is 1
    same = precision_recall(real, real, k=k)
    assert same["density"] == pytest.approx(1.0, abs=0.1) and same["coverage"] == 1.0


def test_knn_radii_and_errors():
    x = np.array([[0.0], [1.0], [3.0], [6.0]])
    assert knn_radii(x, k=1).tolist() == [1.0, 1.0, 2.0, 3.0]
    assert knn_radii(x, k=2).tolist() == [3.0, 2.0, 3.0, 5.0]
    with pytest.raises(ConfigError, match=r"needs more than 3 images in each set, got 10 real and 3 generated"):
        precision_recall(np.zeros((10, 4)), np.zeros((3, 4)))
    with pytest.raises(ConfigError, match=r"must come from the same extractor"):
        precision_recall(np.zeros((10, 4)), np.zeros((10, 5)))


def test_per_class_fidelity(tmp_path):
    import torch

    from imgaug_gen.metrics import DomainFeatures

    from conftest import digits_images

    torch.manual_seed(0)
    extractor = DomainFeatures(num_classes=3, in_channels=1)
    extractor._freeze()  # untrained features are enough to check the bookkeeping
    images, labels = digits_images(n_per_class=12, classes=(0, 1, 2), size=16, channels=1)
    x, y = np.stack(images)[..., None], np.asarray(labels)
    real = np.concatenate([np.flatnonzero(y == c)[:6] for c in range(3)])
    fake = np.concatenate([np.flatnonzero(y == 0)[6:], np.flatnonzero(y == 1)[6:9]])  # nothing of class 2
    out = per_class_fidelity(
        x[real], y[real], x[fake], y[fake], extractor, class_names=["zero", "one", "two"], kid_subsets=5
    )
    json.dumps(out)
    assert list(out) == ["zero", "one", "two"]
    assert out["zero"]["n_real"] == 6 and out["zero"]["n_fake"] == 6 and out["one"]["n_fake"] == 3
    assert out["zero"]["fid"] >= 0 and out["zero"]["kid_mean"] is not None
    assert 0 <= out["zero"]["precision"] <= 1 and 0 <= out["zero"]["recall"] <= 1
    assert out["one"]["fid"] is not None and out["one"]["precision"] is None  # 3 fakes <= k
    assert out["two"] == {**out["two"], "n_fake": 0, "fid": None, "kid_mean": None, "precision": None}


# --------------------------------------------------------------------------- the classifier
@pytest.fixture(scope="module")
def digits16():
    """sklearn digits at 16x16 (PIL bilinear), 1 channel: 50 per class to train, 50 others to train
    "synthetic", 400 for test."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.stack(
        [
            np.asarray(Image.fromarray((im * 255 / 16).astype(np.uint8)).resize((16, 16), Image.BILINEAR))
            for im in d.images
        ]
    )[..., None]
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    idx = [rng.permutation(np.flatnonzero(y == c)) for c in range(10)]
    train = np.concatenate([i[:50] for i in idx])
    other = np.concatenate([i[50:100] for i in idx])
    test = np.concatenate([i[100:140] for i in idx])
    return {"train": (x[train], y[train]), "other": (x[other], y[other]), "test": (x[test], y[test])}


@pytest.mark.slow  # fast variants: test_classifier_is_deterministic_and_handles_channels; CAS in test_evaluate
def test_classifier_learns_digits_and_cas_matches_real(digits16):
    (xtr, ytr), (xo, yo), (xte, yte) = digits16["train"], digits16["other"], digits16["test"]
    real = train_and_test(xtr, ytr, xte, yte, 10, seed=0, return_details=True)
    assert real["accuracy"] > 0.85 and real["steps"] == 300 and real["n_train"] == 500
    # CAS with real images posing as synthetic: a classifier trained on them does as well on real data
    cas = classification_accuracy_score(xo, yo, xte, yte, 10, seed=0)
    assert abs(cas - real["accuracy"]) < 0.06


def test_classifier_is_deterministic_and_handles_channels(digits16):
    (xtr, ytr), (xte, yte) = digits16["train"], digits16["test"]
    small = dict(steps=30, batch_size=32)
    a = train_and_test(xtr[::5], ytr[::5], xte, yte, 10, seed=3, **small)
    b = train_and_test(xtr[::5], ytr[::5], xte, yte, 10, seed=3, **small)
    assert a == b
    rgb = np.repeat(xtr[::5], 3, axis=-1)  # RGB training set, grey test set: converted to the train channels
    assert 0.0 <= train_and_test(rgb, ytr[::5], xte, yte, 10, seed=3, **small) <= 1.0
    with pytest.raises(ConfigError, match=r"`recipe` has unknown keyword\(s\) \['epoch'\]"):
        train_and_test(xtr, ytr, xte, yte, 10, epoch=3)
    with pytest.raises(ConfigError, match=r"`test_labels` must lie in \[0, 9\]"):
        train_and_test(xtr, ytr, xte, yte + 5, 10)


def test_compare_methods_table_and_plot(digits16, tmp_path):
    (xtr, ytr), (xo, yo), (xte, yte) = digits16["train"], digits16["other"], digits16["test"]
    methods = {
        "real": (xtr[::10], ytr[::10]),
        "real+synthetic": (np.concatenate([xtr[::10], xo[::10]]), np.concatenate([ytr[::10], yo[::10]])),
    }
    res = compare_methods(methods, xte, yte, 10, seeds=[0, 1], steps=20, batch_size=32)
    assert list(res) == ["real", "real+synthetic"]
    for r in res.values():
        assert len(r["accs"]) == 2 and r["mean"] == pytest.approx(np.mean(r["accs"]))
        assert r["std"] == pytest.approx(np.std(r["accs"], ddof=1))
    assert res["real"]["n_train"] == 50 and res["real+synthetic"]["n_train"] == 100
    json.dumps(res)

    table = results_table_markdown(res)
    lines = table.strip().splitlines()
    assert lines[0].startswith("| method | train images | accuracy (%) mean ± std") and len(lines) == 4
    assert lines[2].startswith("| real | 50 |") and lines[2].endswith("| — |")
    assert lines[3].startswith("| real+synthetic | 100 |")

    by_shots = {5: res, 10: {k: {**v, "mean": v["mean"] + 0.05} for k, v in res.items()}}
    png = plot_accuracy_vs_shots(by_shots, tmp_path / "plots" / "acc_vs_shots.png", title="digits")
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
