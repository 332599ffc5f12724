"""The pseudo-label baseline ``real+pseudo+classical``: what the unlabelled pool is worth without a generator.

With an unlabelled pool in the data (``data.unlabeled=rest`` / ``data.unlabeled_root``), per (shots, subset):

1. each classifier seed's teacher -- the same seed's ``real+classical`` classifier (``transfer+classical``
   with ``classifier.init``) -- labels the pool; its top class and softmax confidence per image are kept in
   ``OUT/pseudo/teacher/`` (keyed by the teacher's cache key and the pool), so a re-run trains no teacher;
2. for every ``pseudo.thresholds`` value t, the images labelled with confidence >= t (each its own group,
   paired with no real image; ``pseudo.copies`` classical copies of each) join the ``real+classical`` set,
   and the classifier trains on it (``real+pseudo@<t>+classical`` in ``classifier_runs.jsonl``);
3. t is the threshold with the best mean **validation** accuracy over the seeds (first of equals, in the
   config's order); its runs are ``real+pseudo+classical``, and its pseudo-labels are written as data,
   one row per kept image with its confidence, to ``OUT/pseudo/<shots-tag>_d<subset>_s<seed>.jsonl``;
4. every generator x policy runs on top of that set: ``real+pseudo+<g>+classical@<P>``.

Without a pool none of this runs, and no other method's training set or cache key changes.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgaug_gen.errors import require
from imgaug_gen.jobs.evaluate.classifiers import Classifiers, SyntheticSet, TrainingSet, digest
from imgaug_gen.jobs.evaluate.config import BASELINE, PSEUDO_BASELINE, TRANSFER_BASELINE, method_name

log = logging.getLogger(__name__)


def threshold_method(t: float) -> str:
    """The cache's name of one threshold's run (not a method of the report: ``eval.json`` ``pseudo`` holds them)."""
    return f"real+pseudo@{t:g}+classical"


def pseudo_methods(entries: Mapping[str, Mapping]) -> list[str]:
    return [PSEUDO_BASELINE] + [method_name(g, p, pseudo=True) for g, e in entries.items() for p in e["policies"]]


def wants_pseudo(entries: Mapping[str, Mapping], wanted: list[str] | None) -> bool:
    """Whether ``methods`` asks for any pseudo-label method (null: all)."""
    return wanted is None or bool(set(wanted) & set(pseudo_methods(entries)))


@dataclass
class UnlabeledPool:
    """The pool of one (shots, subset): uint8 images, their records (``id``, ``path``, ``sha1``), and their
    true labels where a labelled image of the data has the very same pixels (-1 elsewhere; None: none known)."""

    images: np.ndarray
    records: list[dict]
    true_labels: np.ndarray | None
    key: str

    def __len__(self) -> int:
        return len(self.images)


def load_pool(dm, image_shape: tuple) -> UnlabeledPool | None:
    """The data module's unlabelled pool, or None when it has none (or an empty one)."""
    if not hasattr(dm, "unlabeled_arrays"):
        return None
    images = dm.unlabeled_arrays()
    if len(images) == 0:
        return None
    require(
        tuple(images.shape[1:]) == tuple(image_shape),
        f"the unlabelled pool's images are {tuple(images.shape[1:])}, the labelled ones {tuple(image_shape)} (HWC).",
    )
    records = dm.unlabeled_records()
    require(len(records) == len(images), "the unlabelled pool has not one record per image.")
    return UnlabeledPool(images, records, _true_labels(images, *dm.reference_arrays()), digest(images))


def _true_labels(pool: np.ndarray, ref_x: np.ndarray, ref_y: np.ndarray) -> np.ndarray | None:
    """Each pool image's label where a labelled training image has the same pixels and one label (so for
    ``data.unlabeled=rest``, every image's dropped label); -1 elsewhere; None when no image is known.
    A folder pool never holds a labelled image's pixels (the data module drops them): its purity is unknown."""
    owner: dict[bytes, int] = {}
    for x, y in zip(ref_x, ref_y):
        h = x.tobytes()
        owner[h] = int(y) if owner.get(h, int(y)) == int(y) else -1
    labels = np.asarray([owner.get(x.tobytes(), -1) for x in pool], dtype=np.int64)
    return labels if (labels >= 0).any() else None


@dataclass
class PseudoJob:
    """What the pseudo-label runs of one (shots, subset) need."""

    clf: Classifiers
    classical: TrainingSet  # the real+classical set (its groups: 0 .. n_real - 1)
    n_real: int
    pool: UnlabeledPool
    pool_copies: TrainingSet  # `copies` classical copies of every pool image: copy k of image i at k * M + i
    copies: int
    thresholds: list[float]
    class_names: list[str]
    root: Path
    tag: str  # shots<N>_d<subset>

    @classmethod
    def build(
        cls,
        clf: Classifiers,
        classical: TrainingSet,
        n_real: int,
        pool: UnlabeledPool,
        augmenter,
        settings: Mapping[str, Any],
        class_names: list[str],
        root: Path,
        tag: str,
    ) -> "PseudoJob":
        """The job with the pool's classical copies (``settings["copies"]`` of each, seeded by the subset)."""
        from imgaug_gen.jobs.evaluate.sources import classical_copies

        copies = int(settings["copies"])
        whole = TrainingSet(pool.images, np.zeros(len(pool), np.int64), np.arange(len(pool)))
        pool_copies = classical_copies(augmenter, whole, copies, clf.data_seed + 2)
        copies = copies if len(pool_copies) else 0  # no classical augmenter: no copies
        thresholds = [float(t) for t in settings["thresholds"]]
        return cls(clf, classical, n_real, pool, pool_copies, copies, thresholds, class_names, root, tag)


def teacher_predictions(job: PseudoJob, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """The seed's teacher's class and confidence for every pool image (read back when cached), and the
    teacher's cache key."""
    from imgaug_gen.io import atomic_write_bytes
    from imgaug_gen.metrics.pseudo_labels import teacher_confidences

    clf = job.clf
    tkey = clf.key(seed, job.classical, transfer=True)
    input_size = clf.recipe.get("input_size")
    path = job.root / "pseudo" / "teacher" / f"{digest(tkey, job.pool.key, input_size)[:24]}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            if len(z["labels"]) == len(job.pool):
                return z["labels"].astype(np.int64), z["confidence"].astype(np.float32), tkey
    model = clf.teacher_model(seed, job.classical)
    labels, conf = teacher_confidences(model, job.pool.images, input_size)
    buf = io.BytesIO()
    np.savez(buf, labels=labels, confidence=conf)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return labels, conf, tkey


def pseudo_set(job: PseudoJob, kept) -> TrainingSet:
    """The kept pool images (:class:`~imgaug_gen.metrics.pseudo_labels.PseudoLabels`) with their pseudo-labels,
    each its own group (``n_real + pool index``: paired with no real image), and their classical copies."""
    groups = job.n_real + kept.index
    own = TrainingSet(job.pool.images[kept.index], kept.labels, groups)
    if job.copies == 0 or len(kept) == 0:
        return own
    m = len(job.pool)
    at = np.concatenate([k * m + kept.index for k in range(job.copies)])
    return own.plus(
        TrainingSet(job.pool_copies.images[at], np.tile(kept.labels, job.copies), np.tile(groups, job.copies))
    )


def _run_facts(job: PseudoJob, kept, row: dict) -> dict:
    """One (threshold, seed) run's facts: accuracies, kept count per class, purity where true labels are known."""
    out = {
        "seed": row["seed"],
        "accuracy": row["accuracy"],
        "val_accuracy": row.get("val_accuracy"),
        "kept": int(len(kept)),
        "kept_per_class": dict(zip(job.class_names, kept.per_class(len(job.class_names)))),
    }
    true = job.pool.true_labels
    if true is not None:
        known = true[kept.index] >= 0
        out["purity_known"] = int(known.sum())
        out["purity"] = float(np.mean(kept.labels[known] == true[kept.index][known])) if known.any() else None
    return out


def choose_threshold(grid: Mapping[float, list[dict]]) -> dict:
    """The threshold with the best mean validation accuracy over the seeds (first of equals, in the config's
    order); without a validation split, the first threshold."""
    ts = list(grid)
    vals = {t: [r.get("val_accuracy") for r in grid[t]] for t in ts}
    if any(v is None for vs in vals.values() for v in vs):
        return {"threshold": ts[0], "criterion": "fixed (no validation split): the first of `pseudo.thresholds`"}
    means = {t: float(np.mean(v)) for t, v in vals.items()}
    best = max(ts, key=lambda t: means[t])
    return {
        "threshold": best,
        "criterion": "best mean validation accuracy over the classifier seeds",
        "val_means": {f"{t:g}": m for t, m in means.items()},
    }


def write_records(job: PseudoJob, seed: int, kept, tkey: str) -> Path:
    """The kept pseudo-labels of one seed as data: one JSON line per image, written atomically."""
    from imgaug_gen.io import atomic_write_text

    ids = [r["id"] for r in job.pool.records]
    rows = kept.records(ids, job.class_names, job.clf.teacher)
    for row, i in zip(rows, kept.index):
        rec = job.pool.records[int(i)]
        row.update(path=rec.get("path"), sha1=rec.get("sha1"), teacher_seed=int(seed), teacher_key=tkey)
    path = job.root / "pseudo" / f"{job.tag}_s{int(seed)}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return path


def pseudo_runs(
    job: PseudoJob,
    seeds: list[int],
    syn: Mapping[str, SyntheticSet],
    entries: Mapping[str, dict],
    policies: Mapping[str, Any],
    wanted: list[str] | None,
) -> tuple[list[dict], dict]:
    """Every pseudo-label row of one (shots, subset) (the chosen threshold's as ``real+pseudo+classical``, and
    the generative methods on top of it) and the subset's facts for ``eval.json`` ``pseudo``."""
    from imgaug_gen.metrics.pseudo_labels import keep_confident

    preds = {s: teacher_predictions(job, s) for s in seeds}
    rows_of: dict[float, list[dict]] = {}
    grid: dict[float, list[dict]] = {}
    kept_of: dict[tuple[float, int], Any] = {}
    for t in job.thresholds:
        rows_of[t], grid[t] = [], []
        for s in seeds:
            kept_of[t, s] = kept = keep_confident(preds[s][0], preds[s][1], t)
            row = job.clf.run(threshold_method(t), s, job.classical.plus(pseudo_set(job, kept)), transfer=True)
            rows_of[t].append({**row, "method": PSEUDO_BASELINE})
            grid[t].append(_run_facts(job, kept, row))
    choice = choose_threshold(grid)
    t = choice["threshold"]
    runs = {}
    for s, facts in zip(seeds, grid[t]):
        runs[str(s)] = {**facts, "records": str(write_records(job, s, kept_of[t, s], preds[s][2]))}
    rows = rows_of[t] + _on_top(job, {s: kept_of[t, s] for s in seeds}, syn, entries, policies, wanted)
    log.info(
        "[%s] pseudo-labels: threshold %g (%s); kept %s of %d pool images (per seed)",
        job.tag,
        t,
        choice["criterion"],
        [len(kept_of[t, s]) for s in seeds],
        len(job.pool),
    )
    return rows, {
        **choice,
        "pool_size": len(job.pool),
        "teacher": job.clf.teacher,
        "runs": runs,
        "grid": {f"{th:g}": grid[th] for th in job.thresholds},
    }


def _on_top(
    job: PseudoJob,
    kept: Mapping[int, Any],
    syn: Mapping[str, SyntheticSet],
    entries: Mapping[str, dict],
    policies: Mapping[str, Any],
    wanted: list[str] | None,
) -> list[dict]:
    """``real+pseudo+<g>+classical@<P>``: the pseudo-labelled set as the real base, the synthetic images
    consumed by the same policy (a distilling policy's teacher: the same ``real+classical`` teacher)."""
    rows = []
    for s, k in kept.items():
        base = job.classical.plus(pseudo_set(job, k))
        for g, sets in syn.items():
            for pname in entries[g]["policies"]:
                m = method_name(g, pname, pseudo=True)
                if wanted is None or m in wanted:
                    rows.append({**job.clf.run(m, s, base, sets.mixed, policies[pname], transfer=True), "method": m})
    return rows


def summarise_pseudo(per_subset: Mapping[str, dict], thresholds: list[float], copies: int) -> dict:
    """One shots value's ``eval.json`` ``pseudo`` block: per threshold, the validation and test means over
    every (subset, seed), the kept count and the purity; the chosen threshold of each subset."""
    grid = {}
    for t in (f"{x:g}" for x in thresholds):
        runs = [r for sub in per_subset.values() for r in sub["grid"][t]]
        vals = [r["val_accuracy"] for r in runs]
        pur = [r["purity"] for r in runs if r.get("purity") is not None]
        grid[t] = {
            "val_mean": float(np.mean(vals)) if all(v is not None for v in vals) else None,
            "test_mean": float(np.mean([r["accuracy"] for r in runs])),
            "kept_mean": float(np.mean([r["kept"] for r in runs])),
            "purity": float(np.mean(pur)) if pur else None,
            "chosen_in": [d for d, sub in per_subset.items() if f"{sub['threshold']:g}" == t],
        }
    first = next(iter(per_subset.values()))
    return {
        "method": PSEUDO_BASELINE,
        "teacher": first["teacher"],
        "thresholds": list(thresholds),
        "copies": int(copies),
        "pool_size": first["pool_size"],
        "chosen": {d: sub["threshold"] for d, sub in per_subset.items()},
        "grid": grid,
        "subsets": dict(per_subset),
    }


def reference_gains(rows: list[dict], results: dict[str, dict]) -> None:
    """Every generative method's paired gain (test, and validation as ``val_gains``) over ``real+classical``
    (and ``transfer+classical``) and over ``real+pseudo+classical``: what a generator adds beyond the obvious
    use of the same pool. Only with pseudo-label rows; the results gain ``gains`` in place."""
    from imgaug_gen.metrics.stats import paired_gain

    by_method: dict[str, dict[tuple, dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], {})[(r["data_seed"], r["seed"])] = r
    if PSEUDO_BASELINE not in by_method:
        return
    refs = [m for m in (BASELINE, TRANSFER_BASELINE, PSEUDO_BASELINE) if m in by_method]
    for m, res in results.items():
        if "@" not in m or m not in by_method:
            continue
        runs = by_method[m]
        res["gains"], res["val_gains"] = {}, {}
        for ref in refs:
            base = by_method[ref]
            res["gains"][ref] = paired_gain(
                {k: r["accuracy"] for k, r in runs.items()}, {k: r["accuracy"] for k, r in base.items()}
            )
            if all(r.get("val_accuracy") is not None for r in [*runs.values(), *base.values()]):
                res["val_gains"][ref] = paired_gain(
                    {k: r["val_accuracy"] for k, r in runs.items()}, {k: r["val_accuracy"] for k, r in base.items()}
                )
