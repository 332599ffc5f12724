"""FID and KID between real and generated images, as torchmetrics ``Metric`` states.

:class:`FeatureFID` and :class:`FeatureKID` are torchmetrics metrics over *features*:
``update(features, real=...)`` then ``compute()``, with states that DDP reduces (sums and
counts for FID, gathered features for KID), so streamed or multi-process scoring needs no
writes into another library's internals. Their math is torchmetrics'
``FrechetInceptionDistance`` / ``KernelInceptionDistance`` (same covariance estimate, the
trace-of-sqrt from eigenvalues, ``poly_mmd`` subsets drawn from the global RNG), which the
tests check to agree with torchmetrics' own metrics on the same images. Features are extracted
once per image set by the :class:`~imgaug_gen.metrics.features.FeatureExtractor` (so FID and
KID do not run the network twice).

Real statistics (the features of the real set plus FID's running sums) are
cached by a content hash of the real images and the extractor's weights: in
memory (a small LRU shared by :func:`compute_fidelity` and
:class:`FidelityEvaluator`) and, when ``cache_dir`` is given, on disk as
``<cache_dir>/real_stats/<hash>.safetensors``. Scoring many generated sets
against the same reals therefore extracts real features once.

Both entry points compute locally in the calling process
(``sync_on_compute=False``): under DDP, call them on one rank or gather the
images first.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.image.kid import poly_mmd
from torchmetrics.utilities import dim_zero_cat

from imgaug_gen.errors import require
from imgaug_gen.metrics.features import FeatureExtractor, validate_images

__all__ = [
    "FeatureFID",
    "FeatureKID",
    "FidelityEvaluator",
    "RealStats",
    "compute_fidelity",
    "images_hash",
    "clear_real_stats_cache",
]

_MEMORY_CACHE_SIZE = 4
_memory_cache: OrderedDict[str, RealStats] = OrderedDict()


def images_hash(images: np.ndarray) -> str:
    """sha256 of a uint8 image array's shape, dtype and bytes."""
    h = hashlib.sha256(f"{images.shape}|{images.dtype}".encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()


def clear_real_stats_cache() -> None:
    """Forget the in-memory real statistics (the disk cache is untouched)."""
    _memory_cache.clear()


class FeatureFID(Metric):
    """Fréchet distance between the Gaussians fitted to real and generated features.

    States (float64, summed across processes): per side the feature sum, the sum of outer
    products and the count. ``compute`` is torchmetrics' FID formula.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, num_features: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        d = int(num_features)
        for side in ("real", "fake"):
            self.add_state(f"{side}_sum", torch.zeros(d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_cov_sum", torch.zeros(d, d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_n", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, features: torch.Tensor, real: bool) -> None:
        f = features.double()
        side = "real" if real else "fake"
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + f.sum(dim=0))
        setattr(self, f"{side}_cov_sum", getattr(self, f"{side}_cov_sum") + f.t().mm(f))
        setattr(self, f"{side}_n", getattr(self, f"{side}_n") + f.shape[0])

    def load_real(self, stats: RealStats) -> None:
        """The real side from cached sufficient statistics (instead of ``update(..., real=True)``)."""
        self.real_sum, self.real_cov_sum = stats.sum.clone(), stats.cov_sum.clone()
        self.real_n = torch.tensor(stats.n, dtype=torch.long)

    @staticmethod
    def _mean_cov(total: torch.Tensor, cov_sum: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = total / n
        return mean, (cov_sum - n * mean.outer(mean)) / (n - 1)

    def compute(self) -> torch.Tensor:
        mu1, s1 = self._mean_cov(self.real_sum, self.real_cov_sum, self.real_n)
        mu2, s2 = self._mean_cov(self.fake_sum, self.fake_cov_sum, self.fake_n)
        # trace(sqrtm(s1 s2)) from the eigenvalues of s1 s2 (real, >= 0 up to round-off)
        tr_sqrt = torch.linalg.eigvals(s1 @ s2).sqrt().real.sum()
        return (mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt


class FeatureKID(Metric):
    """Kernel distance (cubic polynomial MMD², mean and std over random subsets) between feature
    sets. States: the features of each side, gathered across processes."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, subsets: int = 50, subset_size: int = 1000, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.subsets, self.subset_size = int(subsets), int(subset_size)
        self.add_state("real_features", [], dist_reduce_fx="cat")
        self.add_state("fake_features", [], dist_reduce_fx="cat")

    def update(self, features: torch.Tensor, real: bool) -> None:
        (self.real_features if real else self.fake_features).append(features.double())

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        real, fake = dim_zero_cat(self.real_features), dim_zero_cat(self.fake_features)
        size = min(self.subset_size, real.shape[0], fake.shape[0])
        scores = []
        for _ in range(self.subsets):  # the same draws as torchmetrics' KID under the same seed
            r = real[torch.randperm(real.shape[0])[:size]]
            f = fake[torch.randperm(fake.shape[0])[:size]]
            scores.append(poly_mmd(r, f))
        scores = torch.stack(scores)
        return scores.mean(), scores.std(unbiased=False)


class RealStats:
    """Features of a real image set and FID's sufficient statistics over them."""

    def __init__(self, key: str, features: torch.Tensor) -> None:
        self.key = key
        self.features = features.float().contiguous()
        f64 = self.features.double()
        self.sum = f64.sum(dim=0)
        self.cov_sum = f64.t().mm(f64)

    @property
    def n(self) -> int:
        return int(self.features.shape[0])

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"features": self.features, "sum": self.sum, "cov_sum": self.cov_sum}

    @classmethod
    def from_tensors(cls, key: str, tensors: dict[str, torch.Tensor]) -> RealStats:
        obj = cls.__new__(cls)
        obj.key, obj.features, obj.sum, obj.cov_sum = key, tensors["features"], tensors["sum"], tensors["cov_sum"]
        return obj


def _real_stats_key(extractor: FeatureExtractor, real_images: np.ndarray) -> str:
    return hashlib.sha256(f"{extractor.fingerprint()}|{images_hash(real_images)}".encode()).hexdigest()


def _load_or_compute_real_stats(
    extractor: FeatureExtractor, real_images: np.ndarray, cache_dir: str | os.PathLike | None, batch_size: int
) -> RealStats:
    key = _real_stats_key(extractor, real_images)
    if key in _memory_cache:
        _memory_cache.move_to_end(key)
        return _memory_cache[key]

    stats = None
    path = Path(cache_dir).expanduser() / "real_stats" / f"{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
            if tensors["features"].shape == (real_images.shape[0], extractor.num_features):
                stats = RealStats.from_tensors(key, tensors)
        except Exception:  # corrupt entry: recompute and overwrite
            stats = None
    if stats is None:
        stats = RealStats(key, extractor.features(real_images, batch_size=batch_size))
        if path is not None:
            from imgaug_gen.io import atomic_save_safetensors

            atomic_save_safetensors(path, stats.to_tensors(), metadata={"key": key, "features": extractor.name})

    _memory_cache[key] = stats
    while len(_memory_cache) > _MEMORY_CACHE_SIZE:
        _memory_cache.popitem(last=False)
    return stats


def _fidelity_from_features(
    real: RealStats,
    fake_features: torch.Tensor,
    *,
    num_features: int,
    kid_subset_size: int,
    kid_subsets: int,
    seed: int,
) -> tuple[float, float, float]:
    """(fid, kid_mean, kid_std) from real statistics and fake features."""
    fid = FeatureFID(num_features, sync_on_compute=False)
    fid.load_real(real)
    fid.update(fake_features, real=False)
    kid = FeatureKID(kid_subsets, kid_subset_size, sync_on_compute=False)
    kid.update(real.features, real=True)
    kid.update(fake_features, real=False)
    fid_value = float(fid.compute())
    with torch.random.fork_rng(devices=[]):  # KID draws subsets from the global RNG: seeded, then restored
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    # FID is a squared distance; tiny negatives are round-off of sqrtm(eigvals).
    return max(fid_value, 0.0), float(kid_mean), float(kid_std)


def _check_sets(real_images: np.ndarray, fake_images: np.ndarray) -> None:
    for name, x in (("real_images", real_images), ("fake_images", fake_images)):
        validate_images(x, name)
        require(x.shape[0] >= 2, f"`{name}` needs at least 2 images for FID/KID, got {x.shape[0]}.")


def _check_kid_args(kid_subset_size: int, kid_subsets: int) -> None:
    require(
        isinstance(kid_subset_size, int) and kid_subset_size >= 2,
        f"`metrics.kid_subset_size` must be an int >= 2, got {kid_subset_size!r}.",
    )
    require(
        isinstance(kid_subsets, int) and kid_subsets >= 1,
        f"`metrics.kid_subsets` must be a positive int, got {kid_subsets!r}.",
    )


class FidelityEvaluator:
    """Scores generated sets against one fixed real set; real features are extracted once.

    >>> ev = FidelityEvaluator(extractor, real_images)          # doctest: +SKIP
    >>> ev.evaluate(fake_images)["fid"]                         # doctest: +SKIP
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        real_images: np.ndarray,
        *,
        kid_subset_size: int = 100,
        kid_subsets: int = 50,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
        batch_size: int = 256,
    ) -> None:
        validate_images(real_images, "real_images")
        require(
            real_images.shape[0] >= 2, f"`real_images` needs at least 2 images for FID/KID, got {real_images.shape[0]}."
        )
        _check_kid_args(kid_subset_size, kid_subsets)
        self.extractor = extractor
        self.kid_subset_size = kid_subset_size
        self.kid_subsets = kid_subsets
        self.seed = seed
        self.batch_size = batch_size
        self.real = _load_or_compute_real_stats(extractor, real_images, cache_dir, batch_size)

    @property
    def n_real(self) -> int:
        return self.real.n

    def evaluate(self, fake_images: np.ndarray) -> dict[str, Any]:
        """``{"fid", "kid_mean", "kid_std", "n_real", "n_fake", "features", "num_features"}``."""
        validate_images(fake_images, "fake_images")
        require(
            fake_images.shape[0] >= 2, f"`fake_images` needs at least 2 images for FID/KID, got {fake_images.shape[0]}."
        )
        return self.evaluate_features(self.extractor.features(fake_images, batch_size=self.batch_size))

    def evaluate_features(self, fake_features: torch.Tensor) -> dict[str, Any]:
        """:meth:`evaluate` from already extracted features ``[N, num_features]`` (streamed or
        gathered from several processes)."""
        return fidelity_from_features(
            self.real,
            fake_features,
            features_name=self.extractor.name,
            num_features=self.extractor.num_features,
            kid_subset_size=self.kid_subset_size,
            kid_subsets=self.kid_subsets,
            seed=self.seed,
        )


def fidelity_from_features(
    real: RealStats | torch.Tensor,
    fake_features: torch.Tensor,
    *,
    features_name: str,
    num_features: int,
    kid_subset_size: int = 100,
    kid_subsets: int = 50,
    seed: int = 0,
) -> dict[str, Any]:
    """FID / KID from feature tensors (or the real side's :class:`RealStats`); same result dict as
    :func:`compute_fidelity`."""
    real = real if isinstance(real, RealStats) else RealStats("", torch.as_tensor(real))
    fake = torch.as_tensor(fake_features)
    require(
        fake.ndim == 2 and fake.shape[0] >= 2 and fake.shape[1] == int(num_features),
        f"fake features must be [N >= 2, {num_features}], got {tuple(fake.shape)}.",
    )
    fid, kid_mean, kid_std = _fidelity_from_features(
        real, fake, num_features=num_features, kid_subset_size=kid_subset_size, kid_subsets=kid_subsets, seed=seed
    )
    return {
        "fid": fid,
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "n_real": real.n,
        "n_fake": int(fake.shape[0]),
        "features": features_name,
        "num_features": int(num_features),
    }


def compute_fidelity(
    real_images: np.ndarray,
    fake_images: np.ndarray,
    extractor: FeatureExtractor,
    *,
    kid_subset_size: int = 100,
    kid_subsets: int = 50,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
) -> dict[str, Any]:
    """FID and KID of ``fake_images`` against ``real_images`` (uint8 ``[N, H, W, C]``).

    The KID subset size is clipped to the smaller set; KID subsets are drawn
    with ``seed`` (the global RNG is left untouched). Returns
    ``{"fid", "kid_mean", "kid_std", "n_real", "n_fake", "features", "num_features"}``.
    """
    _check_sets(real_images, fake_images)
    _check_kid_args(kid_subset_size, kid_subsets)
    return FidelityEvaluator(
        extractor,
        real_images,
        kid_subset_size=kid_subset_size,
        kid_subsets=kid_subsets,
        seed=seed,
        cache_dir=cache_dir,
        batch_size=batch_size,
    ).evaluate(fake_images)
