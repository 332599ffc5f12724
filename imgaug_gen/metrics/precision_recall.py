"""Improved precision and recall (Kynkäänniemi et al., NeurIPS 2019), density and coverage
(Naeem et al., ICML 2020) and per-class fidelity.

Each set's manifold is the union of balls around its points, each ball's radius being the
distance to the point's k-th nearest neighbour in the same set. **Precision** is the share
of generated points inside the real manifold (fidelity), **recall** the share of real points
inside the generated manifold (coverage / diversity). Both lie in [0, 1]; identical sets
give 1/1. **Density** counts how many real balls hold each generated point (divided by k; about 1
for a generator that matches the real distribution, above 1 where it crowds dense real regions)
and **coverage** is the share of real points whose ball holds at least one generated point; both
use the real balls only, so they are robust to outliers among the generated points. A point
is inside a ball when its distance is strictly below the radius, as in the reference code
(``prdc``, checked in the tests). Computed in feature space (Euclidean), in blocks so memory
stays bounded. The math is the pure function :func:`precision_recall`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from imgaug_gen.errors import require
from imgaug_gen.metrics.features import FeatureExtractor, validate_images

__all__ = [
    "PRDC_KEYS",
    "knn_radii",
    "per_class_fidelity",
    "per_class_fidelity_from_features",
    "precision_recall",
    "precision_recall_images",
]

_BLOCK_BYTES = 64 * 2**20
#: the four scores of :func:`precision_recall`, in the order reports show them
PRDC_KEYS = ("precision", "recall", "density", "coverage")


def _feats(x: Any, name: str) -> torch.Tensor:
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.double()
    require(
        t.ndim == 2 and t.shape[0] > 0 and t.shape[1] > 0,
        f"`{name}` must be a non-empty 2-d array [N, D], got shape {tuple(t.shape)}.",
    )
    require(bool(torch.isfinite(t).all()), f"`{name}` holds NaN or inf values.")
    return t


def _chunk(chunk: int | None, m: int) -> int:
    if chunk is None:
        return max(1, _BLOCK_BYTES // (8 * m))
    require(isinstance(chunk, int) and chunk > 0, f"`chunk` must be a positive int, got {chunk!r}.")
    return chunk


def knn_radii(features: Any, k: int = 3, chunk: int | None = None) -> torch.Tensor:
    """Distance of each point to its ``k``-th nearest *other* point in the same set (float64 ``[N]``)."""
    x = _feats(features, "features")
    n = x.shape[0]
    require(isinstance(k, int) and 1 <= k < n, f"`k` = {k!r}; need 1 <= k < number of points ({n}).")
    c = _chunk(chunk, n)
    out = torch.empty(n, dtype=torch.float64)
    for i in range(0, n, c):
        d = torch.cdist(x[i : i + c], x)
        # the k+1 smallest include the point itself (distance 0)
        out[i : i + c] = d.topk(k + 1, dim=1, largest=False).values[:, k]
    return out


def _inside_counts(
    points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each point, how many balls ``(centres[j], radii[j])`` hold it; for each ball, whether
    any point lies inside it (``[len(points)]`` int64, ``[len(centres)]`` bool)."""
    c = _chunk(chunk, centres.shape[0])
    counts = torch.empty(points.shape[0], dtype=torch.long)
    hit = torch.zeros(centres.shape[0], dtype=torch.bool)
    for i in range(0, points.shape[0], c):
        inside = torch.cdist(points[i : i + c], centres) < radii[None, :]
        counts[i : i + c] = inside.sum(dim=1)
        hit |= inside.any(dim=0)
    return counts, hit


def precision_recall(real_feats: Any, fake_feats: Any, k: int = 3, chunk: int | None = None) -> dict[str, float]:
    """Improved precision and recall of ``fake_feats`` against ``real_feats`` (``[N, D]`` each).

    ``k``: neighbourhood size of the manifold radii (the paper's default is 3); each set needs
    more than ``k`` points. ``chunk``: rows per distance block (default: blocks of ~64 MiB).
    Returns ``{"precision", "recall", "density", "coverage", "k", "n_real", "n_fake"}``.
    """
    real = _feats(real_feats, "real_feats")
    fake = _feats(fake_feats, "fake_feats")
    require(
        real.shape[1] == fake.shape[1],
        f"`real_feats` ({real.shape[1]}-d) and `fake_feats` ({fake.shape[1]}-d) must come from the same extractor.",
    )
    require(isinstance(k, int) and k >= 1, f"`k` = {k!r}; give an int >= 1.")
    require(
        real.shape[0] > k and fake.shape[0] > k,
        f"precision/recall with k={k} needs more than {k} images in each set, got "
        f"{real.shape[0]} real and {fake.shape[0]} generated; lower `k` or add images.",
    )
    real_r = knn_radii(real, k, chunk)
    fake_in_real, real_covered = _inside_counts(fake, real, real_r, chunk)
    real_in_fake, _ = _inside_counts(real, fake, knn_radii(fake, k, chunk), chunk)
    return {
        "precision": float((fake_in_real > 0).double().mean()),
        "recall": float((real_in_fake > 0).double().mean()),
        "density": float(fake_in_real.double().mean() / k),
        "coverage": float(real_covered.double().mean()),
        "k": int(k),
        "n_real": int(real.shape[0]),
        "n_fake": int(fake.shape[0]),
    }


def precision_recall_images(
    real_images: np.ndarray, fake_images: np.ndarray, extractor: FeatureExtractor, k: int = 3, batch_size: int = 256
) -> dict[str, Any]:
    """:func:`precision_recall` of uint8 image sets ``[N, H, W, C]`` in ``extractor``'s feature space."""
    validate_images(real_images, "real_images")
    validate_images(fake_images, "fake_images")
    out = precision_recall(
        extractor.features(real_images, batch_size=batch_size),
        extractor.features(fake_images, batch_size=batch_size),
        k=k,
    )
    out["features"] = extractor.name
    return out


def per_class_fidelity(
    real_images: np.ndarray,
    real_labels: np.ndarray,
    fake_images: np.ndarray,
    fake_labels: np.ndarray,
    extractor: FeatureExtractor,
    *,
    class_names: Sequence[str] | None = None,
    k: int = 3,
    with_precision_recall: bool = True,
    kid_subset_size: int = 100,
    kid_subsets: int = 50,
    seed: int = 0,
    cache_dir: Any = None,
    batch_size: int = 256,
) -> dict[Any, dict[str, Any]]:
    """FID / KID (and precision / recall) of each class's generated images against its real ones.

    Returns ``{class: {"fid", "kid_mean", "kid_std", "precision", "recall", "density", "coverage",
    "n_real", "n_fake"}}``
    keyed by ``class_names[c]`` (or the int label when no names are given), over the classes
    present in either set. A class with fewer than 2 images on a side gets ``None`` scores (and
    ``precision``/``recall`` need more than ``k``). Per-class FID from few images is strongly
    biased upwards (compare it between methods at equal counts only); KID is unbiased.
    """
    validate_images(real_images, "real_images")
    validate_images(fake_images, "fake_images")
    ry = np.asarray(real_labels).astype(np.int64)
    fy = np.asarray(fake_labels).astype(np.int64)
    require(
        ry.shape == (real_images.shape[0],), f"`real_labels` must have shape [{real_images.shape[0]}], got {ry.shape}."
    )
    require(
        fy.shape == (fake_images.shape[0],), f"`fake_labels` must have shape [{fake_images.shape[0]}], got {fy.shape}."
    )
    classes = sorted(set(ry.tolist()) | set(fy.tolist()))
    if class_names is not None:
        require(
            max(classes) < len(class_names),
            f"labels go up to {max(classes)} but only {len(class_names)} `class_names` were given.",
        )
    real_f = extractor.features(real_images, batch_size=batch_size)
    fake_f = extractor.features(fake_images, batch_size=batch_size)
    return per_class_fidelity_from_features(
        real_f,
        ry,
        fake_f,
        fy,
        features_name=extractor.name,
        num_features=extractor.num_features,
        class_names=class_names,
        k=k,
        with_precision_recall=with_precision_recall,
        kid_subset_size=kid_subset_size,
        kid_subsets=kid_subsets,
        seed=seed,
    )


def per_class_fidelity_from_features(
    real_f: torch.Tensor,
    real_labels: np.ndarray,
    fake_f: torch.Tensor,
    fake_labels: np.ndarray,
    *,
    features_name: str,
    num_features: int,
    class_names: Sequence[str] | None = None,
    k: int = 3,
    with_precision_recall: bool = True,
    kid_subset_size: int = 100,
    kid_subsets: int = 50,
    seed: int = 0,
) -> dict[Any, dict[str, Any]]:
    """:func:`per_class_fidelity` from feature tensors (features extracted once, e.g. streamed from files)."""
    from imgaug_gen.metrics.fidelity import fidelity_from_features

    ry = np.asarray(real_labels).astype(np.int64)
    fy = np.asarray(fake_labels).astype(np.int64)
    real_f, fake_f = torch.as_tensor(real_f), torch.as_tensor(fake_f)
    classes = sorted(set(ry.tolist()) | set(fy.tolist()))
    if class_names is not None and classes:
        require(
            max(classes) < len(class_names),
            f"labels go up to {max(classes)} but only {len(class_names)} `class_names` were given.",
        )
    out: dict[Any, dict[str, Any]] = {}
    for c in classes:
        rm, fm = ry == c, fy == c
        nr, nf = int(rm.sum()), int(fm.sum())
        entry: dict[str, Any] = {"fid": None, "kid_mean": None, "kid_std": None, "n_real": nr, "n_fake": nf}
        if nr >= 2 and nf >= 2:
            fid = fidelity_from_features(
                real_f[torch.from_numpy(rm)],
                fake_f[torch.from_numpy(fm)],
                features_name=features_name,
                num_features=num_features,
                kid_subset_size=kid_subset_size,
                kid_subsets=kid_subsets,
                seed=seed,
            )
            entry.update(fid=fid["fid"], kid_mean=fid["kid_mean"], kid_std=fid["kid_std"])
        if with_precision_recall:
            entry.update(dict.fromkeys(PRDC_KEYS))
            if nr > k and nf > k:
                pr = precision_recall(real_f[torch.from_numpy(rm)], fake_f[torch.from_numpy(fm)], k=k)
                entry.update({key: pr[key] for key in PRDC_KEYS})
        out[class_names[c] if class_names is not None else int(c)] = entry
    return out
