"""``generate(cfg)``: the job behind ``generate.py``, as numbered steps.

1. Check inputs          (before anything heavy)
2. Load the generator    (any registered kind, from safetensors)
3. Rebuild the real data (the run's own data config)
4. Plan the images       (deterministic ids and per-image seeds; shard; skip done)
5. Build the scorer      (feature extractor for per-image scores and FID/KID)
6. Generate and write    (batches, atomic PNGs, manifest lines, progress bar)
7. Copy real images      (``include_real=true``)
8. Score the folder      (``metrics.json``), preview, config
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from imgaug_gen.errors import ConfigError

log = logging.getLogger(__name__)

MODES = ("sample", "img2img")


@dataclass
class Item:
    """One planned output image."""

    id: str
    label: int
    source: str  # "synthetic" | "real"
    mode: str  # "sample" | "img2img" | "real"
    seed: int | None = None
    strength: float | None = None
    real_index: int | None = None  # index into the real training set (img2img source, or the copy)
    extra: dict = field(default_factory=dict)


# -- 1. check ------------------------------------------------------------------------
def check_generate_config(cfg: DictConfig) -> None:
    for key in ("run_dir", "out_dir"):
        if cfg.get(key) in (None, "", "???"):
            raise ConfigError(f"`{key}` is required: python generate.py run_dir=RUN out_dir=OUT ...")
    if not Path(cfg.run_dir).is_dir():
        raise ConfigError(f"`run_dir` = {cfg.run_dir!r} is not a folder; pass the folder train.py wrote.")
    if cfg.mode not in MODES:
        raise ConfigError(f"`mode` = {cfg.mode!r}; allowed: {list(MODES)}.")
    if cfg.n_per_class < 0:
        raise ConfigError(f"`n_per_class` = {cfg.n_per_class}; give a count >= 0.")
    if not (cfg.num_shards >= 1 and 0 <= cfg.shard < cfg.num_shards):
        raise ConfigError(f"`shard` = {cfg.shard}, `num_shards` = {cfg.num_shards}: need 0 <= shard < num_shards.")
    if cfg.mode == "img2img":
        s = list(cfg.img2img.strengths)
        if not s or min(s) <= 0 or max(s) > 1:
            raise ConfigError(f"`img2img.strengths` = {s}; give values in (0, 1].")
        if cfg.img2img.edits_per_image < 1:
            raise ConfigError(f"`img2img.edits_per_image` = {cfg.img2img.edits_per_image}; give a count >= 1.")


def _generator_dir(run_dir: Path) -> Path:
    return run_dir / "generator" if (run_dir / "generator").is_dir() else run_dir


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


# -- 3. real data ------------------------------------------------------------------------
def rebuild_datamodule(gen_config: dict, data_override: Any = None):
    """The run's data module (from the generator's saved data config, or an override)."""
    from imgaug_gen.config import instantiate_checked as instantiate

    data_cfg = data_override if data_override is not None else gen_config.get("data")
    if data_cfg is None:
        raise ConfigError("the generator records no data config; pass `data=...` to generate.py.")
    dm = instantiate(OmegaConf.create(data_cfg) if isinstance(data_cfg, dict) else data_cfg)
    dm.setup("fit")
    if list(dm.class_names) != list(gen_config["class_names"]):
        raise ConfigError(f"the data's classes {list(dm.class_names)} differ from the generator's "
                          f"{gen_config['class_names']}; pass the data the generator was trained on.")
    return dm


# -- 4. plan -----------------------------------------------------------------------------
def plan_items(cfg: DictConfig, num_classes: int, real_labels: np.ndarray, real_ids: list[str]) -> list[Item]:
    """Every image of the job, in a fixed order, with its id and seed."""
    from imgaug_gen.generators.base import per_image_seeds

    items: list[Item] = []
    if cfg.mode == "sample":
        n = int(cfg.n_per_class)
        seeds = per_image_seeds(cfg.seed, 0, n * num_classes)
        for c in range(num_classes):
            for j in range(n):
                i = c * n + j
                items.append(Item(f"syn_{i:07d}", c, "synthetic", "sample", seed=seeds[i]))
    else:
        m = int(cfg.img2img.edits_per_image)
        strengths = list(cfg.img2img.strengths)
        seeds = per_image_seeds(cfg.seed, 0, m * len(real_labels))
        for r, label in enumerate(real_labels):
            for k in range(m):
                i = r * m + k
                strength = float(strengths[np.random.default_rng(seeds[i]).integers(len(strengths))])
                items.append(Item(f"edit_{i:07d}", int(label), "synthetic", "img2img", seed=seeds[i],
                                  strength=strength, real_index=r, extra={"source_id": real_ids[r]}))
    if cfg.include_real:
        for r, label in enumerate(real_labels):
            items.append(Item(f"real_{real_ids[r]}", int(label), "real", "real", real_index=r))
    return items


# -- 6. generate -------------------------------------------------------------------------
def _batches(items: list[Item], size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _render(gen, batch: list[Item], real_images: np.ndarray, cfg: DictConfig) -> np.ndarray:
    labels = [it.label for it in batch]
    seeds = [it.seed for it in batch]
    if batch[0].mode == "sample":
        return gen.sample(labels, seeds=seeds, batch_size=len(batch), **dict(cfg.get("sample_kwargs") or {}))
    if batch[0].mode == "img2img":
        src = real_images[[it.real_index for it in batch]]
        return gen.edit(src, labels, strength=[it.strength for it in batch], seeds=seeds,
                        batch_size=len(batch), **dict(cfg.get("sample_kwargs") or {}))
    return real_images[[it.real_index for it in batch]]


def generate(cfg: DictConfig) -> dict[str, Any]:
    """Run a generation job as configured; returns the metrics dict (also in metrics.json)."""
    from tqdm.auto import tqdm

    from imgaug_gen.export import FolderWriter, merge_manifests, read_manifest
    from imgaug_gen.generators.base import load_generator, read_run_config
    from imgaug_gen.io import atomic_write_json, atomic_write_text

    # 1. Check inputs.
    check_generate_config(cfg)
    run_dir, out_dir = Path(cfg.run_dir), Path(cfg.out_dir)
    gen_dir = _generator_dir(run_dir)
    gen_config = read_run_config(gen_dir)  # kind and format version, before loading weights

    # 2. Load the generator (denormal floats flushed: see training.py).
    import torch

    torch.set_flush_denormal(True)
    gen = load_generator(gen_dir, device=_device(cfg.device))
    if cfg.mode == "img2img" and not gen.supports_edit:
        gen.edit(np.zeros((0, 1, 1, 1), np.uint8), [])  # raises the kind's clear error

    # 3. Rebuild the real data.
    dm = rebuild_datamodule(gen_config, cfg.get("data"))
    real_images, real_labels = dm.train_arrays()
    real_ids = [r["id"] for r in dm.train_records()]
    real_records = dm.train_records()

    # 4. Plan: ids and seeds fixed by the config; this shard's share; skip what is done.
    items = plan_items(cfg, gen.num_classes, real_labels, real_ids)
    mine = items[cfg.shard::cfg.num_shards]
    job = {"run_dir": str(run_dir.resolve()), "kind": gen.kind, "mode": cfg.mode, "seed": int(cfg.seed),
           "n_per_class": int(cfg.n_per_class), "include_real": bool(cfg.include_real),
           "img2img": OmegaConf.to_container(cfg.img2img, resolve=True), "num_shards": int(cfg.num_shards),
           "num_items": len(items)}
    writer = FolderWriter(out_dir, gen.class_names, job, overwrite=cfg.overwrite,
                          shard=cfg.shard, num_shards=cfg.num_shards, io_workers=int(cfg.io_workers))
    writer.remove_orphans((it.id, writer.class_dirs[it.label]) for it in mine)
    todo = [it for it in mine if it.id not in writer.records]
    log.info("%d images planned for this shard, %d already written, %d to go", len(mine), len(mine) - len(todo),
             len(todo))

    # 5. Scorer: per-image confidence of the intended label, and FID/KID at the end.
    scorer = None
    if cfg.score:
        from imgaug_gen.metrics import build_feature_extractor

        ref_images, ref_labels = dm.reference_arrays()
        scorer = build_feature_extractor(cfg.metrics, ref_images, ref_labels, dm.num_classes)
        confidence = scorer if hasattr(scorer, "predict_proba") else build_feature_extractor(
            {**OmegaConf.to_container(cfg.metrics, resolve=True), "features": "domain"},
            ref_images, ref_labels, dm.num_classes)

    # 6.-7. Generate (or copy) and write, batch by batch.
    t0 = time.perf_counter()
    generator_info = {"kind": gen.kind, "run_dir": str(run_dir.resolve())}
    with writer, tqdm(total=len(todo), desc=f"generate ({cfg.mode})", unit="img", dynamic_ncols=True,
                      disable=not cfg.progress) as bar:
        for batch in _batches(todo, int(cfg.batch_size)):
            groups: dict[str, list[Item]] = {}
            for it in batch:
                groups.setdefault(it.mode, []).append(it)
            for group in groups.values():
                images = _render(gen, group, real_images, cfg)
                conf = (confidence.predict_proba(images)[np.arange(len(group)), [it.label for it in group]]
                        if scorer is not None else None)
                for k, (it, img) in enumerate(zip(group, images)):
                    rec = {"id": it.id, "label": it.label, "source": it.source, "mode": it.mode,
                           "seed": it.seed, "generator": generator_info if it.source == "synthetic" else None,
                           "scores": {"confidence": float(conf[k])} if conf is not None else {}}
                    if it.strength is not None:
                        rec["strength"] = it.strength
                    if it.source == "synthetic" and hasattr(gen, "prompt_for"):
                        rec["prompt"] = gen.prompt_for(it.label)
                    if it.real_index is not None:
                        src = real_records[it.real_index]
                        rec["source_id"] = src["id"]
                        rec["source_path"] = src.get("path")
                    writer.write(rec, img)
                bar.update(len(group))
    elapsed = time.perf_counter() - t0

    # 8. Score the whole folder, write metrics.json, preview and config.
    metrics: dict[str, Any] = {"images_written_now": len(todo), "seconds": round(elapsed, 3),
                               "images_per_second": round(len(todo) / elapsed, 2) if elapsed > 0 else None}
    if cfg.num_shards > 1:
        # A shard marks itself done; whichever shard finishes last merges the manifests and scores.
        atomic_write_json(out_dir / f"shard{cfg.shard:03d}-of-{cfg.num_shards:03d}.done", {"items": len(mine)})
        if not all((out_dir / f"shard{s:03d}-of-{cfg.num_shards:03d}.done").is_file() for s in range(cfg.num_shards)):
            return metrics
        merge_manifests(out_dir, cfg.num_shards)
    records = read_manifest(out_dir)
    metrics.update(score_folder(out_dir, records, gen.class_names, scorer, dm if scorer is not None else None))
    atomic_write_json(out_dir / "metrics.json", metrics)
    atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    try:
        from imgaug_gen.visual import preview_sheet

        preview_sheet(out_dir, records, gen.class_names)
    except Exception as e:  # a picture must never fail the job
        log.warning("could not draw preview.png: %s", e)
    return metrics


def load_folder_images(out_dir: Path, records: list[dict]) -> np.ndarray:
    from PIL import Image

    arrays = [np.asarray(Image.open(out_dir / r["file"])) for r in records]
    if not arrays:
        return np.zeros((0, 1, 1, 1), np.uint8)
    a = np.stack(arrays)
    return a[..., None] if a.ndim == 3 else a


def score_folder(out_dir: Path, records: list[dict], class_names: list[str], extractor=None, dm=None) -> dict:
    """Counts per class and source; FID/KID of the synthetic images against the real reference."""
    counts = {c: {"real": 0, "synthetic": 0} for c in class_names}
    for r in records:
        counts[r["class_name"]][r["source"]] += 1
    out: dict[str, Any] = {"counts": counts,
                           "n_synthetic": sum(v["synthetic"] for v in counts.values()),
                           "n_real": sum(v["real"] for v in counts.values())}
    syn = [r for r in records if r["source"] == "synthetic"]
    if extractor is None or not syn:
        return out
    from imgaug_gen.metrics import compute_fidelity

    ref_images, _ = dm.reference_arrays()
    fake = load_folder_images(out_dir, syn)
    fid = compute_fidelity(ref_images, fake, extractor)
    conf = [r["scores"]["confidence"] for r in syn if "confidence" in r.get("scores", {})]
    out.update({"fid": fid["fid"], "kid_mean": fid["kid_mean"], "kid_std": fid["kid_std"],
                "features": fid["features"], "num_features": fid["num_features"],
                "n_reference": fid["n_real"], "reference": "real images of the run's data (all but the test split)",
                "mean_confidence": float(np.mean(conf)) if conf else None})
    return out
