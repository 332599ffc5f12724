"""Quality filters for generated images: classifier confidence and memorisation distance.

Pure functions over arrays, plus :class:`QualityFilter`, which ties them to the domain
feature network (``imgaug_gen.metrics.DomainFeatures``: a classifier trained on the real
images, whose penultimate activations are the features):

* **confidence** -- the domain classifier's probability of the *intended* label; images
  below ``tau`` are off-class or unrecognisable and are dropped.
* **memorisation** -- the distance of each generated image to its nearest real training
  image in feature space (L2-normalised features; cosine or L2 distance); images closer
  than ``delta`` are (near-)copies of a training image and are dropped. ``delta="auto"``
  calibrates it on the real set: the ``auto_quantile`` quantile of the real images'
  leave-one-out nearest-neighbour distances (a generated image closer to a real one than
  99% of real images are to each other is flagged).

:func:`overgenerate_plan` and :func:`select_accepted` let a pipeline generate more than
requested and still deliver exactly the requested count per class after filtering.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from imgaug_gen.errors import ConfigError, require

__all__ = [
    "DISTANCES",
    "QualityFilter",
    "calibrate_delta",
    "confidence_filter",
    "memorisation_filter",
    "nearest_real_distance",
    "overgenerate_plan",
    "select_accepted",
    "summarise",
]

#: Allowed values of ``metric`` in :func:`nearest_real_distance`.
DISTANCES = ("cosine", "l2")
#: Bytes of one similarity block ``[chunk, M]`` (float64) in :func:`nearest_real_distance`.
_BLOCK_BYTES = 64 * 2**20


def _as_2d_float(x: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().cpu().float()
    require(
        t.ndim == 2 and t.shape[0] > 0 and t.shape[1] > 0,
        f"`{name}` must be a non-empty 2-d array [N, D], got shape {tuple(t.shape)}.",
    )
    require(bool(torch.isfinite(t).all()), f"`{name}` holds NaN or inf values.")
    return t


def _labels(labels: Any, n: int, name: str = "labels") -> np.ndarray:
    y = np.asarray(labels)
    require(
        y.ndim == 1 and y.shape[0] == n and (n == 0 or np.issubdtype(y.dtype, np.integer)),
        f"`{name}` must be an integer array of shape [{n}], got dtype {y.dtype} and shape {tuple(y.shape)}.",
    )
    return y.astype(np.int64)


def _check_threshold(value: Any, name: str, lo: float, hi: float) -> None:
    require(
        value is None
        or (isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) and lo <= float(value) <= hi),
        f"`{name}` = {value!r}; give a number in [{lo}, {hi}] or null to disable.",
    )


# --------------------------------------------------------------------------- #
# Pure functions
# --------------------------------------------------------------------------- #
def confidence_filter(probs: np.ndarray, labels: np.ndarray, tau: float | None) -> np.ndarray:
    """Keep mask ``[N]``: ``probs[i, labels[i]] >= tau`` (all True when ``tau`` is None).

    ``probs``: ``[N, K]`` class probabilities; ``labels``: the intended class of each image.
    """
    p = np.asarray(probs, dtype=np.float64)
    require(p.ndim == 2, f"`probs` must be [N, K] class probabilities, got shape {p.shape}.")
    y = _labels(labels, p.shape[0])
    require(
        y.size == 0 or (y.min() >= 0 and y.max() < p.shape[1]),
        f"`labels` must lie in [0, {p.shape[1] - 1}] for {p.shape[1]} classes.",
    )
    _check_threshold(tau, "filter.tau", 0.0, 1.0)
    if tau is None:
        return np.ones(p.shape[0], dtype=bool)
    return p[np.arange(p.shape[0]), y] >= float(tau)


def nearest_real_distance(
    syn_features: Any, real_features: Any, metric: str = "cosine", chunk: int | None = None, exclude_self: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Distance of each synthetic feature to its nearest real feature, and that real's index.

    Features are L2-normalised first; ``metric="cosine"`` gives ``1 - cos`` in [0, 2],
    ``"l2"`` the Euclidean distance of the unit vectors in [0, 2]. The work is done in
    blocks of ``chunk`` synthetic rows (default: blocks of ~64 MiB), so 50k x 5k fits in
    bounded memory. ``exclude_self=True`` (same set passed twice) skips the diagonal, giving
    leave-one-out distances. Returns ``(distances float32 [N], indices int64 [N])``.
    """
    require(metric in DISTANCES, f"`filter.metric` = {metric!r}; allowed: {list(DISTANCES)}.")
    # float64: with float32, sqrt(2 - 2 cos) of an exact copy is ~3e-4 instead of 0
    s = torch.nn.functional.normalize(_as_2d_float(syn_features, "syn_features").double(), dim=1)
    r = torch.nn.functional.normalize(_as_2d_float(real_features, "real_features").double(), dim=1)
    require(
        s.shape[1] == r.shape[1],
        f"`syn_features` ({s.shape[1]}-d) and `real_features` ({r.shape[1]}-d) must come from the same extractor.",
    )
    n, m = s.shape[0], r.shape[0]
    if exclude_self:
        require(n == m and m >= 2, "`exclude_self=True` needs the same set (>= 2 rows) passed twice.")
    if chunk is None:
        chunk = max(1, _BLOCK_BYTES // (8 * m))
    require(isinstance(chunk, int) and chunk > 0, f"`chunk` must be a positive int, got {chunk!r}.")
    best_sim = torch.empty(n, dtype=torch.float64)
    best_idx = torch.empty(n, dtype=torch.long)
    for i in range(0, n, chunk):
        sim = s[i : i + chunk] @ r.T
        if exclude_self:
            rows = torch.arange(sim.shape[0])
            sim[rows, rows + i] = -math.inf
        best_sim[i : i + chunk], best_idx[i : i + chunk] = sim.max(dim=1)
    best_sim = best_sim.clamp(-1.0, 1.0)
    dist = (1.0 - best_sim) if metric == "cosine" else torch.sqrt((2.0 - 2.0 * best_sim).clamp_min(0.0))
    return dist.numpy().astype(np.float32), best_idx.numpy()


def memorisation_filter(dist: np.ndarray, delta: float | None) -> np.ndarray:
    """Keep mask ``[N]``: ``dist > delta`` (a copy of a real image is closer than ``delta``).
    All True when ``delta`` is None."""
    d = np.asarray(dist, dtype=np.float64)
    require(d.ndim == 1, f"`dist` must be 1-d [N], got shape {d.shape}.")
    _check_threshold(delta, "filter.delta", 0.0, 2.0)
    if delta is None:
        return np.ones(d.shape[0], dtype=bool)
    return d > float(delta)


def calibrate_delta(real_features: Any, metric: str = "cosine", quantile: float = 0.01) -> float:
    """``quantile`` of the real set's leave-one-out nearest-neighbour distances (``delta="auto"``)."""
    require(0.0 <= quantile <= 1.0, f"`filter.auto_quantile` = {quantile!r}; give a number in [0, 1].")
    d, _ = nearest_real_distance(real_features, real_features, metric=metric, exclude_self=True)
    return float(np.quantile(d.astype(np.float64), quantile))


def overgenerate_plan(target: int, acceptance_estimate: float, max_factor: float = 3.0, margin: float = 0.1) -> int:
    """How many images to generate so that about ``target`` survive filtering.

    ``ceil(target * (1 + margin) / acceptance_estimate)``, capped at ``ceil(target * max_factor)``
    and never below ``target``. Call it per class with that class's acceptance estimate (e.g.
    from a pilot batch); :func:`select_accepted` then takes the first ``target`` kept images.
    """
    require(isinstance(target, (int, np.integer)) and target >= 0, f"`target` = {target!r}; give an int >= 0.")
    require(
        isinstance(acceptance_estimate, (int, float, np.floating)) and 0.0 <= acceptance_estimate <= 1.0,
        f"`acceptance_estimate` = {acceptance_estimate!r}; give a fraction in [0, 1].",
    )
    require(
        isinstance(max_factor, (int, float)) and max_factor >= 1.0,
        f"`filter.max_factor` = {max_factor!r}; give a number >= 1 (1 = no over-generation).",
    )
    require(margin >= 0.0, f"`filter.margin` = {margin!r}; give a number >= 0.")
    target = int(target)
    cap = math.ceil(target * float(max_factor))
    if acceptance_estimate <= 0.0:
        return cap
    want = math.ceil(target * (1.0 + margin) / float(acceptance_estimate) - 1e-9)
    return int(max(target, min(want, cap)))


def select_accepted(keep: np.ndarray, labels: np.ndarray, target_per_class: int | Mapping[int, int]) -> np.ndarray:
    """Indices of the first ``target_per_class`` kept images of each class, in input order.

    Deterministic: with images planned in a fixed order (ids/seeds), the same images are
    chosen however the generation was batched. Classes with fewer kept images contribute
    what they have (check the per-class counts against the target).
    """
    keep = np.asarray(keep, dtype=bool)
    y = _labels(labels, keep.shape[0])
    chosen: list[int] = []
    counts: dict[int, int] = {}
    for i in np.flatnonzero(keep):
        c = int(y[i])
        limit = target_per_class.get(c, 0) if isinstance(target_per_class, Mapping) else int(target_per_class)
        if counts.get(c, 0) < limit:
            counts[c] = counts.get(c, 0) + 1
            chosen.append(int(i))
    return np.asarray(chosen, dtype=np.int64)


def _rate(num: int, den: int) -> float | None:
    return float(num) / den if den else None


def summarise(
    scores: Mapping[str, np.ndarray],
    keep: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    tau: float | None = None,
    delta: float | None = None,
) -> dict[str, Any]:
    """Acceptance per class and overall, and why images were dropped (JSON-serialisable).

    ``scores`` as from :meth:`QualityFilter.score`; ``tau``/``delta`` (when given) split the
    rejections into ``low_confidence`` and ``memorised`` (an image may be both).
    """
    keep = np.asarray(keep, dtype=bool)
    y = _labels(labels, keep.shape[0])
    conf = np.asarray(scores["confidence"], dtype=np.float64) if "confidence" in scores else None
    dist = np.asarray(scores["nearest_real_distance"], dtype=np.float64) if "nearest_real_distance" in scores else None
    low = (conf < tau) if (conf is not None and tau is not None) else np.zeros(keep.shape[0], dtype=bool)
    mem = (dist <= delta) if (dist is not None and delta is not None) else np.zeros(keep.shape[0], dtype=bool)

    def block(mask: np.ndarray) -> dict[str, Any]:
        n = int(mask.sum())
        out: dict[str, Any] = {
            "n": n,
            "kept": int((keep & mask).sum()),
            "acceptance_rate": _rate(int((keep & mask).sum()), n),
            "low_confidence": int((low & mask).sum()),
            "memorised": int((mem & mask).sum()),
            "memorisation_rate": _rate(int((mem & mask).sum()), n),
        }
        if conf is not None:
            out["mean_confidence"] = float(conf[mask].mean()) if n else None
        if dist is not None:
            out["mean_nearest_real_distance"] = float(dist[mask].mean()) if n else None
        return out

    overall = block(np.ones(keep.shape[0], dtype=bool))
    return {
        "tau": None if tau is None else float(tau),
        "delta": None if delta is None else float(delta),
        **overall,
        "per_class": {str(name): block(y == c) for c, name in enumerate(class_names)},
    }


# --------------------------------------------------------------------------- #
# The filter over images
# --------------------------------------------------------------------------- #
def _stable(x: np.ndarray) -> np.ndarray:
    """Scores rounded to 6 decimals: float32 network outputs differ in the last bits with the batch
    an image is scored in, and a resumed job (other batches) must record and decide the same."""
    return np.round(np.asarray(x, dtype=np.float64), 6)


class QualityFilter:
    """Scores generated images against the real set with the domain network, and filters them.

    >>> qf = QualityFilter(domain, real_images, tau=0.5, delta="auto")   # doctest: +SKIP
    >>> scores = qf.score(images, labels); keep = qf.keep(scores)          # doctest: +SKIP
    >>> qf.summarise(scores, keep, labels, class_names)                    # doctest: +SKIP

    ``domain_features`` needs ``predict_proba`` (a :class:`~imgaug_gen.metrics.DomainFeatures`)
    for the confidence score; any :class:`~imgaug_gen.metrics.FeatureExtractor` works for the
    memorisation distance when ``tau`` is None. ``space="pixels"`` measures memorisation on raw
    pixels instead (images must have the real images' shape).
    """

    def __init__(
        self,
        domain_features: Any,
        real_images: np.ndarray,
        tau: float | None = None,
        delta: float | str | None = None,
        *,
        metric: str = "cosine",
        space: str = "features",
        auto_quantile: float = 0.01,
        batch_size: int = 256,
    ) -> None:
        from imgaug_gen.metrics.features import validate_images

        _check_threshold(tau, "filter.tau", 0.0, 1.0)
        require(
            delta is None or delta == "auto" or (isinstance(delta, (int, float)) and 0.0 <= delta <= 2.0),
            f"`filter.delta` = {delta!r}; give a distance in [0, 2], 'auto' or null to disable.",
        )
        require(metric in DISTANCES, f"`filter.metric` = {metric!r}; allowed: {list(DISTANCES)}.")
        require(space in ("features", "pixels"), f"`filter.space` = {space!r}; allowed: ['features', 'pixels'].")
        if tau is not None and not hasattr(domain_features, "predict_proba"):
            raise ConfigError(
                f"`filter.tau` = {tau} needs a classifier for the confidence score, but the extractor "
                f"{getattr(domain_features, 'name', type(domain_features).__name__)!r} has no `predict_proba`; "
                "use `metrics.features=domain` or set `filter.tau=null`."
            )
        self.extractor = domain_features
        self.real_images = validate_images(real_images, "real_images")
        self.tau = None if tau is None else float(tau)
        self.metric = metric
        self.space = space
        self.batch_size = int(batch_size)
        self.real_features = self._features(self.real_images)
        if delta == "auto":
            require(self.real_images.shape[0] >= 2, "`filter.delta=auto` needs at least 2 real images.")
            delta = calibrate_delta(self.real_features, metric=metric, quantile=auto_quantile)
        self.delta = None if delta is None else float(delta)

    def _features(self, images: np.ndarray) -> torch.Tensor:
        if self.space == "pixels":
            x = torch.from_numpy(np.ascontiguousarray(images)).float().reshape(images.shape[0], -1) / 255.0
            return x - 0.5  # centred, so that cosine distance is not dominated by the mean grey level
        return self.extractor.features(images, batch_size=self.batch_size)

    def score(self, images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
        """``{"confidence" [N] (when the extractor classifies), "predicted" [N],
        "nearest_real_distance" [N], "nearest_real_index" [N]}`` (numpy arrays)."""
        from imgaug_gen.metrics.features import validate_images

        images = validate_images(images, "images")
        y = _labels(labels, images.shape[0])
        if self.space == "pixels":
            require(
                images.shape[1:] == self.real_images.shape[1:],
                f"`filter.space=pixels` needs images of the real images' shape {self.real_images.shape[1:]}, "
                f"got {images.shape[1:]}; use `filter.space=features`.",
            )
        out: dict[str, np.ndarray] = {}
        if hasattr(self.extractor, "predict_proba"):
            probs = self.extractor.predict_proba(images, batch_size=self.batch_size)
            require(
                y.min() >= 0 and y.max() < probs.shape[1],
                f"`labels` must lie in [0, {probs.shape[1] - 1}] for the domain network's {probs.shape[1]} classes.",
            )
            out["confidence"] = _stable(probs[np.arange(len(y)), y])
            out["predicted"] = probs.argmax(axis=1).astype(np.int64)
        dist, idx = nearest_real_distance(self._features(images), self.real_features, metric=self.metric)
        out["nearest_real_distance"] = _stable(dist)
        out["nearest_real_index"] = idx
        return out

    def flags(self, scores: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``{"low_confidence": mask, "memorised": mask}`` (True = rejected for that reason)."""
        n = len(scores["nearest_real_distance"])
        low = (
            np.asarray(scores["confidence"], dtype=np.float64) < self.tau
            if self.tau is not None
            else np.zeros(n, dtype=bool)
        )
        mem = ~memorisation_filter(scores["nearest_real_distance"], self.delta)
        return {"low_confidence": low, "memorised": mem}

    def keep(self, scores: Mapping[str, np.ndarray]) -> np.ndarray:
        """Keep mask ``[N]``: confident enough (``tau``) and not a near-copy of a real image (``delta``)."""
        f = self.flags(scores)
        return ~(f["low_confidence"] | f["memorised"])

    def summarise(
        self, scores: Mapping[str, np.ndarray], keep: np.ndarray, labels: np.ndarray, class_names: Sequence[str]
    ) -> dict[str, Any]:
        """:func:`summarise` with this filter's ``tau`` and ``delta``."""
        out = summarise(scores, keep, labels, class_names, tau=self.tau, delta=self.delta)
        out.update(
            {
                "metric": self.metric,
                "space": self.space,
                "features": getattr(self.extractor, "name", None) if self.space == "features" else "pixels",
            }
        )
        return out

    @staticmethod
    def record(scores: Mapping[str, np.ndarray], i: int) -> dict[str, Any]:
        """Image ``i``'s scores as a JSON-serialisable dict (for its manifest line)."""
        return {
            k: (int(v[i]) if np.issubdtype(np.asarray(v).dtype, np.integer) else float(v[i])) for k, v in scores.items()
        }
