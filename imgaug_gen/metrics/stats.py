"""Paired statistics of accuracy gains over seeds and few-shot subsets.

A gain of method A over baseline B is measured *paired*: both are trained on the same few-shot
subset with the same classifier seed, and the per-pair differences ``d[s, k] = A[s, k] - B[s, k]``
(subset ``s``, seed ``k``) are summarised. The 95 % interval is a two-level (cluster) bootstrap:
resample the subsets with replacement, then the seeds within each drawn subset, and take the 2.5 /
97.5 percentiles of the mean difference. Resampling subsets first keeps the interval honest when
one subset's generator is luckier than another's (a plain bootstrap over all pairs would treat the
seeds of one subset as independent evidence). With a single subset it reduces to the paired
bootstrap over seeds. A gain is called significant only when its interval excludes 0.

Numpy only (hand-written: no library in the stack offers a cluster bootstrap; scipy's ``bootstrap``
resamples flat observations).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from imgaug_gen.errors import require

__all__ = ["paired_gain"]


def paired_gain(
    method: Mapping[Any, float],
    baseline: Mapping[Any, float],
    *,
    n_boot: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean paired difference ``method - baseline`` with a cluster-bootstrap interval.

    ``method`` / ``baseline``: accuracy per pair key ``(subset, seed)``; only keys present in both are
    used. Returns ``{"mean", "lo", "hi", "n_pairs", "n_subsets", "significant", "per_subset"}``
    (differences in the accuracies' units; ``per_subset``: mean difference per subset).
    """
    keys = [k for k in method if k in baseline]
    require(len(keys) > 0, "no (subset, seed) pair is shared by the method and the baseline.")
    require(all(isinstance(k, tuple) and len(k) == 2 for k in keys), "pair keys must be (subset, seed) tuples.")
    require(0 < level < 1, f"`level` = {level!r}; give a number in (0, 1).")
    by_subset: dict[Any, list[float]] = {}
    for k in keys:
        by_subset.setdefault(k[0], []).append(float(method[k]) - float(baseline[k]))
    groups = [np.asarray(v, dtype=np.float64) for v in by_subset.values()]
    diffs = np.concatenate(groups)
    mean = float(diffs.mean())
    rng = np.random.default_rng(seed)
    boot = _cluster_bootstrap(groups, n_boot, rng)
    alpha = (1 - level) / 2
    lo, hi = (float(v) for v in np.quantile(boot, [alpha, 1 - alpha]))
    return {
        "mean": mean,
        "lo": lo,
        "hi": hi,
        "n_pairs": int(len(diffs)),
        "n_subsets": len(groups),
        "significant": bool(lo > 0 or hi < 0),
        "per_subset": {str(s): float(np.mean(v)) for s, v in by_subset.items()},
    }


def _cluster_bootstrap(groups: Sequence[np.ndarray], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap means: subsets drawn with replacement, then seeds within each drawn subset."""
    n_groups = len(groups)
    picks = rng.integers(0, n_groups, size=(n_boot, n_groups))
    out = np.zeros(n_boot)
    total = np.zeros(n_boot)
    for g, vals in enumerate(groups):
        times = (picks == g).sum(1)  # how often subset g was drawn in each replicate
        m = len(vals)
        for t in np.unique(times[times > 0]):
            rows = np.flatnonzero(times == t)
            draws = vals[rng.integers(0, m, size=(len(rows), int(t) * m))]
            out[rows] += draws.sum(1)
            total[rows] += t * m
    return out / total
