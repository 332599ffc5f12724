"""Scoring a generate job's folder: the per-image scorer and quality filter, and the report: ``metrics.json``'s
counts, FID/KID, precision/recall/density/coverage (overall and per class) and the filter summary, with
``config.yaml`` and ``preview.png``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from imgaug_gen.jobs.plan import RealData, ShardPlan, _filter_cfg

log = logging.getLogger(__name__)


@dataclass
class Scorers:
    scorer: Any = None  # per-image confidence + FID/KID features (score=true)
    confidence: Any = None  # the domain classifier behind per-image confidence
    quality_filter: Any = None
    filter_images: int = 0  # images the filter's classifier learnt from


def build_scorers(cfg: DictConfig, dm, real: RealData) -> Scorers:
    """The domain classifier for per-image confidence and FID/KID (``score``), and the quality filter."""
    fcfg = _filter_cfg(cfg)
    out = Scorers()
    if not (cfg.score or fcfg.get("enabled")):
        return out
    from imgaug_gen.metrics import build_feature_extractor

    domain = {**OmegaConf.to_container(cfg.metrics, resolve=True), "features": "domain"}
    ref_images, ref_labels = dm.reference_arrays()
    out.scorer = build_feature_extractor(cfg.metrics, ref_images, ref_labels, dm.num_classes)
    out.confidence = (
        out.scorer
        if hasattr(out.scorer, "predict_proba")
        else build_feature_extractor(domain, ref_images, ref_labels, dm.num_classes)
    )
    if fcfg.get("enabled"):
        from imgaug_gen.filtering import QualityFilter

        confidence, out.filter_images = out.confidence, len(ref_images)
        if fcfg["classifier_data"] == "train":
            # The filter shapes the training data, so it may only learn from the images the user
            # trains on (with data.shots set, the reference set holds labels a few-shot user lacks).
            out.filter_images = len(real.images)
            confidence = build_feature_extractor(domain, real.images, real.labels, dm.num_classes)
        out.quality_filter = QualityFilter(
            confidence, real.images, tau=fcfg["tau"], delta=fcfg["delta"], metric=fcfg["metric"], space=fcfg["space"]
        )
    if not cfg.score:
        out.scorer = None  # the filter's extractor only; no per-image confidence / FID for unfiltered images
    return out


def filter_summary(records: list[dict], qf, class_names: list[str], targets: dict) -> dict:
    """Acceptance per class and overall, memorisation rate and shortfalls, from the manifest's candidate lines."""
    cands = [r for r in records if "kept" in r and r.get("source") == "synthetic"]
    labels = np.asarray([r["label"] for r in cands], dtype=np.int64)
    keep = np.asarray([bool(r["kept"]) for r in cands], dtype=bool)
    scores = {}
    for key in ("confidence", "nearest_real_distance"):
        if cands and all(key in r.get("scores", {}) for r in cands):
            scores[key] = np.asarray([r["scores"][key] for r in cands], dtype=np.float64)
    out = qf.summarise(scores, keep, labels, class_names)
    short = {}
    for c, name in enumerate(class_names):
        want = sum(n for (cc, _), n in targets.items() if cc == c)
        got = int(keep[labels == c].sum())
        if got < want:
            short[str(name)] = {"target": int(want), "kept": got}
    out["short"] = short
    return out


def folder_features(out_dir: Path, records: list[dict], extractor, chunk: int = 1024):
    """Features ``[N, D]`` of the records' image files, read ``chunk`` files at a time."""
    import torch

    from imgaug_gen.export import load_folder_images

    parts = [
        extractor.features(load_folder_images(out_dir, records[i : i + chunk]), batch_size=256)
        for i in range(0, len(records), chunk)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, extractor.num_features)


def score_manifest(
    out_dir: Path,
    class_names: list[str],
    extractor=None,
    dm=None,
    k: int = 3,
    max_images: int | None = None,
    tally: ManifestTally | None = None,
) -> dict:
    """Counts per class and source (and source mode); FID/KID and precision/recall of the synthetic
    images against the real reference, overall and per class; rejected candidates are ignored. With
    ``max_images``, the scores use at most that many synthetic images, evenly spaced in manifest order.
    Streamed: one pass counts (:func:`tally_manifest`), a second keeps only the synthetic lines scored, so
    memory holds at most ``max_images`` lines however many the folder has. ``tally``: the counts already
    made (the writer fed them every kept line as it wrote it), so the first pass is skipped."""
    from imgaug_gen.data.manifest import iter_manifest

    out = (tally or tally_manifest(out_dir, class_names)).summary()
    n_syn = out["n_synthetic"]
    if extractor is None or not n_syn:
        return out
    picked = set(_evenly(n_syn, max_images).tolist()) if max_images and n_syn > max_images else None
    syn = (r for r in iter_manifest(out_dir) if r["source"] == "synthetic")
    syn = [r for i, r in enumerate(syn) if picked is None or i in picked]
    out.update(_synthetic_scores(out_dir, syn, class_names, extractor, dm, k))
    return out


class ManifestTally:
    """The kept manifest lines' counts, fed one line at a time in manifest order (by a pass over the
    manifest, or by the writer as it writes them): per class and source, per class and source mode, and
    the totals; with ``preview``, also the lines ``preview.png`` shows (``picks``)."""

    def __init__(self, class_names: list[str], preview: bool = False):
        from imgaug_gen.visual import PreviewPicks

        self.counts = {c: {"real": 0, "synthetic": 0} for c in class_names}
        self.by_mode: dict[str, dict[str, int]] = {c: {} for c in class_names}
        self.picks = PreviewPicks(class_names) if preview else None

    def add(self, r: dict) -> None:
        name, source = r["class_name"], r["source"]
        self.counts[name][source] += 1
        modes, mode = self.by_mode[name], r.get("mode") or source
        modes[mode] = modes.get(mode, 0) + 1
        if self.picks is not None:
            self.picks.add(r)

    def summary(self) -> dict[str, Any]:
        return {
            "counts": self.counts,
            "counts_by_mode": self.by_mode,
            "n_synthetic": sum(v["synthetic"] for v in self.counts.values()),
            "n_real": sum(v["real"] for v in self.counts.values()),
        }


def tally_manifest(out_dir: Path, class_names: list[str], preview: bool = False) -> ManifestTally:
    """:class:`ManifestTally` of a folder's kept manifest lines, in one streamed pass."""
    from imgaug_gen.data.manifest import iter_manifest

    tally = ManifestTally(class_names, preview)
    for r in iter_manifest(out_dir):
        tally.add(r)
    return tally


def _evenly(n: int, m: int) -> np.ndarray:
    """``m`` indices evenly spaced over ``range(n)`` (every class and source keeps its share)."""
    return np.linspace(0, n - 1, int(m)).round().astype(int)


def _synthetic_scores(out_dir: Path, syn: list[dict], class_names: list[str], extractor, dm, k: int) -> dict:
    from imgaug_gen.metrics import PRDC_KEYS, FidelityEvaluator, precision_recall

    ref_images, ref_labels = dm.reference_arrays()
    evaluator = FidelityEvaluator(extractor, ref_images)
    # Streamed: files are read and turned into features chunk by chunk, so memory holds
    # features (N x D floats), never all the images.
    out = {"n_scored": len(syn)}
    fake_f = folder_features(out_dir, syn, extractor)
    fid = evaluator.evaluate_features(fake_f)
    conf = [r["scores"]["confidence"] for r in syn if "confidence" in r.get("scores", {})]
    out.update(
        {
            "fid": fid["fid"],
            "kid_mean": fid["kid_mean"],
            "kid_std": fid["kid_std"],
            "features": fid["features"],
            "num_features": fid["num_features"],
            "n_reference": fid["n_real"],
            "reference": "real images of the run's data (all but the test split)",
            "mean_confidence": float(np.mean(conf)) if conf else None,
        }
    )
    out.update(dict.fromkeys(PRDC_KEYS))
    real_f = evaluator.real.features
    if len(real_f) > k and len(fake_f) > k:
        pr = precision_recall(real_f, fake_f, k=k)
        out.update({key: pr[key] for key in PRDC_KEYS})
    out["precision_recall_k"] = int(k)
    out["per_class"] = _per_class_scores(real_f, ref_labels, fake_f, syn, extractor, class_names, k)
    return out


def _per_class_scores(real_f, ref_labels, fake_f, syn: list[dict], extractor, class_names: list[str], k: int) -> dict:
    """FID/KID and precision/recall per class, keyed by class name, from the features already computed."""
    from imgaug_gen.metrics import per_class_fidelity_from_features

    fake_labels = np.asarray([r["label"] for r in syn], dtype=np.int64)
    return {
        str(name): v
        for name, v in per_class_fidelity_from_features(
            real_f,
            ref_labels,
            fake_f,
            fake_labels,
            features_name=extractor.name,
            num_features=extractor.num_features,
            class_names=list(class_names),
            k=k,
        ).items()
    }


def write_report(
    cfg: DictConfig,
    gen,
    dm,
    real: RealData,
    plan: ShardPlan,
    scorers: Scorers,
    augmenter,
    metrics: dict,
    tally: ManifestTally | None = None,
) -> dict:
    """Score the whole folder; write metrics.json, config.yaml and preview.png; return the metrics.
    ``tally``: the counts and preview picks the writer made of every kept line (else a pass makes them)."""
    from imgaug_gen.data.manifest import iter_manifest
    from imgaug_gen.io import atomic_write_json, atomic_write_text

    out_dir = Path(cfg.out_dir)
    # streamed from the manifest: memory holds the scored lines (at most `score_max_images`) and the
    # preview's picks, not the folder
    tally = tally or tally_manifest(out_dir, gen.class_names, preview=True)
    metrics.update(
        score_manifest(
            out_dir,
            gen.class_names,
            scorers.scorer,
            dm if scorers.scorer is not None else None,
            k=int(cfg.get("precision_recall_k", 3) or 3),
            max_images=cfg.get("score_max_images"),
            tally=tally,
        )
    )
    real_counts = np.bincount(np.asarray(real.labels, dtype=np.int64), minlength=gen.num_classes)
    metrics["planned"] = {
        name: {"real": int(real_counts[c]) if cfg.include_real else 0, **plan.counts[c]}
        for c, name in enumerate(gen.class_names)
    }
    if scorers.quality_filter is not None:
        candidates = iter_manifest(out_dir, include_rejected=True)
        metrics["filter"] = filter_summary(candidates, scorers.quality_filter, gen.class_names, plan.targets)
        metrics["filter"]["classifier_data"] = _filter_cfg(cfg)["classifier_data"]
        metrics["filter"]["classifier_images"] = scorers.filter_images
    for name in gen.class_names:
        log.info("class %s: %s", name, metrics["counts_by_mode"][name])
    atomic_write_json(out_dir / "metrics.json", metrics)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["augment_resolved"] = augmenter.to_dict() if augmenter is not None else None
    atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved)))
    try:
        from imgaug_gen.visual import preview_sheet

        preview_sheet(out_dir, tally.picks.records, gen.class_names)
    except Exception as e:  # a picture must never fail the job
        log.warning("could not draw preview.png: %s", e)
    return metrics
