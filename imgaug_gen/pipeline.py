"""``generate(cfg)``: the job behind ``generate.py``, as numbered steps.

1. Check inputs          (before anything heavy; the augmenter is built here so a bad transform fails first)
2. Load the generator    (any registered kind, from safetensors)
3. Rebuild the real data (the run's own data config)
4. Plan the images       (mixing policy -> per-class / per-source counts; deterministic ids and seeds; shard; skip done)
5. Build the scorer      (feature extractor for per-image scores, the quality filter and FID/KID)
6. Generate and write    (batches; with ``filter.enabled`` over-generate per class until enough pass;
                          classical augmentation after filtering; atomic PNGs, manifest lines, progress bar)
7. Copy real images      (``include_real=true``; augmented copies with ``augment.apply_to=all``)
8. Metadata              (the last shard merges the manifests; ``train/metadata.jsonl`` for Hugging Face ``imagefolder``)
9. Score the folder      (``metrics.json``: counts, FID/KID, precision/recall, per class; filter summary), preview, config
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from imgaug_gen.errors import ConfigError
from imgaug_gen.runtime import prepare_process

log = logging.getLogger(__name__)

MODES = ("sample", "img2img")
#: The most images (candidates included) one generate job plans: its plan is held in memory.
MAX_PLANNED = 20_000_000
#: Offset of the classical-augmentation seed stream from ``cfg.seed`` (independent of the generator's).
AUGMENT_SEED_OFFSET = 1_000_003


@dataclass
class Item:
    """One planned output image."""

    id: str
    label: int
    source: str  # "synthetic" | "real"
    mode: str  # "sample" | "img2img" | "real" | "augment"
    seed: int | None = None
    strength: float | None = None
    real_index: int | None = None  # index into the real training set (img2img source, or the copy)
    partner_index: int | None = None  # img2img with `img2img.blend`: the same-class real image blended in
    blend: float | None = None  # weight of the source image in that blend
    extra: dict = field(default_factory=dict)
    aug_seed: int | None = None  # classical augmentation seed (None: not augmented)


# -- 1. check ------------------------------------------------------------------------
def _mix_sources(cfg: DictConfig) -> list[dict]:
    """``mix.sources`` as plain dicts (the YAML default: ``[{mode: <mode>, fraction: 1.0}]``)."""
    return [dict(s) for s in OmegaConf.to_container(cfg.mix.sources, resolve=True)]


def _filter_cfg(cfg: DictConfig) -> dict:
    return dict(OmegaConf.to_container(cfg.filter, resolve=True))


def check_generate_config(cfg: DictConfig):
    """Validate ``cfg`` (the schema :class:`imgaug_gen.schemas.Generate`, then the facts only the
    filesystem knows); return the classical augmenter (or None) so a bad transform fails here."""
    from imgaug_gen.augment.classical import build_augmenter
    from imgaug_gen.schemas import Generate, validate

    for key in ("run_dir", "out_dir"):
        if cfg.get(key) in (None, "", "???"):
            raise ConfigError(f"`{key}` is required: python generate.py run_dir=RUN out_dir=OUT ...")
    validate(cfg, Generate, "generate")
    if not Path(cfg.run_dir).is_dir():
        raise ConfigError(f"`run_dir` = {cfg.run_dir!r} is not a folder; pass the folder train.py wrote.")
    return build_augmenter(cfg.get("augment"))


def _data_root(data: Any) -> str | None:
    """The image folder a data config or a recorded data kind reads (None: an embedded data set)."""
    if data is None:
        return None
    data = OmegaConf.to_container(data, resolve=True) if OmegaConf.is_config(data) else data
    if not isinstance(data, dict):
        return None
    root = (data.get("args") or {}).get("root") if "args" in data else data.get("root")
    return root if isinstance(root, str) and root not in ("", "???") else None


def check_out_dir(cfg: DictConfig, gen_config: dict) -> None:
    """``out_dir`` may not be, contain or lie inside the run folder or the training images (a job only
    ever deletes what it wrote, and a folder of your files is never an output folder)."""
    import os

    from imgaug_gen.io import overlaps

    out = os.path.expanduser(str(cfg.out_dir))
    protected = {"run_dir": str(cfg.run_dir)}
    for key, data in (("data.root", cfg.get("data")), ("the generator's recorded data.root", gen_config.get("data"))):
        root = _data_root(data)
        if root is not None:
            protected.setdefault(key, os.path.expanduser(root))
    for key, path in protected.items():
        if os.path.exists(path) and overlaps(out, path):
            raise ConfigError(f"`out_dir` = {str(cfg.out_dir)!r} and {key} = {path!r} overlap (one is, contains or lies "
                              "inside the other): a generate job writes, and may later remove, its own "
                              "files there. Choose an `out_dir` outside both, e.g. a new folder next to them.")


def _blend_range(cfg: DictConfig) -> tuple[float, float] | None:
    """``img2img.blend`` as ``(lo, hi)`` (checked by the schema), or None (plain edits)."""
    b = cfg.img2img.get("blend")
    return None if b is None else (float(b[0]), float(b[1]))


def _generator_dir(run_dir: Path) -> Path:
    return run_dir / "generator" if (run_dir / "generator").is_dir() else run_dir


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


# -- 3. real data ------------------------------------------------------------------------
def rebuild_datamodule(gen_config: dict, data_override: Any = None, source: str = "the generator's config.json"):
    """The run's data module: from the data kind the generator recorded (data, never a call target),
    or from ``data=...`` on the command line (the user's own config, built by Hydra)."""
    from imgaug_gen.config import instantiate_checked as instantiate
    from imgaug_gen.data.kinds import build_data

    if data_override is not None:
        dm = instantiate(OmegaConf.create(data_override) if isinstance(data_override, dict) else data_override)
    elif gen_config.get("data") is None:
        raise ConfigError("the generator records no data config; pass `data=...` to generate.py.")
    else:
        dm = build_data(gen_config["data"], f"data` in `{source}")
    dm.setup("fit")
    if list(dm.class_names) != list(gen_config["class_names"]):
        raise ConfigError(f"the data's classes {list(dm.class_names)} differ from the generator's "
                          f"{gen_config['class_names']}; pass the data the generator was trained on.")
    return dm


# -- 4. plan -----------------------------------------------------------------------------
def split_counts(total: int, fractions: Sequence[float]) -> list[int]:
    """Split ``total`` into integer parts proportional to ``fractions`` (largest remainder).

    Parts sum to ``total`` exactly; leftover units go to the largest fractional parts, ties
    to the earlier entry, so the split is deterministic.
    """
    total = int(total)
    f = np.asarray(fractions, dtype=np.float64)
    if total < 0 or f.ndim != 1 or f.size == 0 or (f < 0).any() or f.sum() <= 0:
        raise ConfigError(f"cannot split {total} by fractions {list(fractions)}: need a count >= 0 and "
                          "non-negative fractions with a positive sum.")
    quotas = total * f / f.sum()
    parts = np.floor(quotas + 1e-9).astype(np.int64)
    rest = total - int(parts.sum())
    order = sorted(range(f.size), key=lambda j: (-(quotas[j] - parts[j]), j))
    for j in order[:max(rest, 0)]:
        parts[j] += 1
    return [int(p) for p in parts]


def synthetic_counts(cfg: DictConfig, num_classes: int, real_labels: np.ndarray) -> dict[int, dict[str, int]]:
    """The mixing policy: ``{class: {mode: synthetic images to write}}``.

    Per class: ``mix.target_per_class`` tops up to that total (``max(0, target - real)``);
    else ``mix.synthetic_ratio`` gives ``round(ratio * real)``; else ``n_per_class``
    (``mode=sample``) or ``img2img.edits_per_image * real`` (``mode=img2img``). Each class's
    count is split across ``mix.sources`` by :func:`split_counts`.
    """
    sources = _mix_sources(cfg)
    mix = cfg.get("mix") or {}
    ratio, target = mix.get("synthetic_ratio"), mix.get("target_per_class")
    real_counts = np.bincount(np.asarray(real_labels, dtype=np.int64), minlength=num_classes)
    out: dict[int, dict[str, int]] = {}
    for c in range(num_classes):
        real_c = int(real_counts[c])
        if target is not None:
            n = max(0, int(target) - real_c)
        elif ratio is not None:
            n = int(round(float(ratio) * real_c))
        elif cfg.mode == "img2img":
            n = int(cfg.img2img.edits_per_image) * real_c
        else:
            n = int(cfg.n_per_class)
        parts = split_counts(n, [float(s["fraction"]) for s in sources])
        out[c] = {s["mode"]: p for s, p in zip(sources, parts)}
    return out


def _candidates(n: int, cfg: DictConfig) -> int:
    f = _filter_cfg(cfg)
    return int(math.ceil(n * float(f["max_factor"]) - 1e-9)) if f["enabled"] else int(n)


def plan_items(cfg: DictConfig, num_classes: int, real_labels: np.ndarray, real_ids: list[str],
               augmenter: Any = None) -> list[Item]:
    """Every image of the job (with ``filter.enabled``: every candidate), in a fixed order, with id and seeds.

    Sample ids ``syn_{i}`` number the classes' (candidate) counts one after the other; img2img
    ids ``edit_{r * M + k}`` are edit ``k`` of real image ``r`` (each class's edits go round-robin
    over its real images), which with the default policy are exactly ``img2img.edits_per_image``
    edits of every real image. With ``img2img.blend = [lo, hi]`` each edit starts from
    ``w * image + (1 - w) * partner``, the partner another real image of the same class and
    ``w ~ U(lo, hi)``, both drawn from the edit's seed (in-class interpolation, then denoised). Seeds come from ``(seed, id number)``; augmentation seeds from
    a separate stream ``(seed + 1_000_003, position in the plan)``.
    """
    from imgaug_gen.generators.base import per_image_seeds

    counts = synthetic_counts(cfg, num_classes, real_labels)
    real_labels = np.asarray(real_labels, dtype=np.int64)
    planned = sum(_candidates(n, cfg) for per in counts.values() for n in per.values())
    planned += len(real_labels) * (int(bool(cfg.include_real)) + (augmenter.copies_per_image if augmenter is not None
                                                                   and augmenter.apply_to == "all" else 0))
    if planned > MAX_PLANNED:
        raise ConfigError(f"this job plans {planned} images (with `filter.max_factor` candidates), over the limit of "
                          f"{MAX_PLANNED} per job (each planned image is held in memory). Lower `n_per_class` / "
                          "`mix.target_per_class` / `img2img.edits_per_image`, or split the job into several "
                          "`out_dir`s with different `seed`s.")
    items: list[Item] = []
    # sample: classes one after the other
    n_sample = [_candidates(counts[c].get("sample", 0), cfg) for c in range(num_classes)]
    seeds = per_image_seeds(cfg.seed, 0, int(sum(n_sample)))
    i = 0
    for c in range(num_classes):
        for _ in range(n_sample[c]):
            items.append(Item(f"syn_{i:07d}", c, "synthetic", "sample", seed=seeds[i]))
            i += 1
    # img2img: edit k of real image r, round-robin over the class's real images
    n_edit = [_candidates(counts[c].get("img2img", 0), cfg) for c in range(num_classes)]
    if sum(n_edit):
        strengths, blend = list(cfg.img2img.strengths), _blend_range(cfg)
        by_class = [np.flatnonzero(real_labels == c) for c in range(num_classes)]
        per_real = max([math.ceil(n_edit[c] / len(by_class[c])) for c in range(num_classes) if len(by_class[c])],
                       default=0)
        edits = []
        for c in range(num_classes):
            if n_edit[c] and not len(by_class[c]):
                log.warning("class %d has no real images to edit; its %d img2img images are skipped", c, n_edit[c])
                continue
            for j in range(n_edit[c]):
                r, k = int(by_class[c][j % len(by_class[c])]), j // len(by_class[c])
                edits.append((r * per_real + k, r))
        for idx, r in sorted(edits):
            seed = per_image_seeds(cfg.seed, idx, 1)[0]
            rng = np.random.default_rng(seed)
            strength = float(strengths[rng.integers(len(strengths))])
            item = Item(f"edit_{idx:07d}", int(real_labels[r]), "synthetic", "img2img", seed=seed,
                        strength=strength, real_index=r, extra={"source_id": real_ids[r]})
            if blend is not None:
                mates = by_class[int(real_labels[r])]
                others = mates[mates != r] if len(mates) > 1 else mates
                item.partner_index = int(others[rng.integers(len(others))])
                item.blend = round(float(rng.uniform(*blend)), 4)
            items.append(item)
    if cfg.include_real:
        for r, label in enumerate(real_labels):
            items.append(Item(f"real_{real_ids[r]}", int(label), "real", "real", real_index=r))
    if augmenter is not None and augmenter.apply_to == "all":
        for r, label in enumerate(real_labels):
            for k in range(augmenter.copies_per_image):
                items.append(Item(f"aug_{real_ids[r]}_{k}", int(label), "real", "augment", real_index=r,
                                  extra={"source_id": real_ids[r]}))
    if augmenter is not None:
        for g, it in enumerate(items):
            if it.source == "synthetic" or it.mode == "augment":
                it.aug_seed = per_image_seeds(cfg.seed + AUGMENT_SEED_OFFSET, g, 1)[0]
    return items


# -- 6. generate -------------------------------------------------------------------------
def _batches(items: list[Item], size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _sample_kwargs(cfg: DictConfig) -> dict:
    """The generator's sampling options that are set (null = the generator's saved default)."""
    kwargs = OmegaConf.to_container(cfg.get("sample_kwargs") or {}, resolve=True)
    return {k: v for k, v in kwargs.items() if v is not None}


def _render(gen, batch: list[Item], real_images: np.ndarray, cfg: DictConfig) -> np.ndarray:
    labels = [it.label for it in batch]
    seeds = [it.seed for it in batch]
    if batch[0].mode == "sample":
        return gen.sample(labels, seeds=seeds, batch_size=len(batch), **_sample_kwargs(cfg))
    if batch[0].mode == "img2img":
        src = real_images[[it.real_index for it in batch]]
        if batch[0].partner_index is not None:
            w = np.asarray([it.blend for it in batch], np.float32).reshape(-1, *([1] * (src.ndim - 1)))
            mate = real_images[[it.partner_index for it in batch]].astype(np.float32)
            src = np.clip(np.rint(w * src.astype(np.float32) + (1 - w) * mate), 0, 255).astype(np.uint8)
        return gen.edit(src, labels, strength=[it.strength for it in batch], seeds=seeds,
                        batch_size=len(batch), **_sample_kwargs(cfg))
    return real_images[[it.real_index for it in batch]]


def _base_record(it: Item, gen, generator_info: dict, real_records: list[dict]) -> dict:
    rec = {"id": it.id, "label": it.label, "source": it.source, "mode": it.mode, "seed": it.seed,
           "generator": generator_info if it.source == "synthetic" else None, "scores": {}}
    if it.strength is not None:
        rec["strength"] = it.strength
    if it.partner_index is not None:
        rec["blend"] = it.blend
        rec["partner_id"] = real_records[it.partner_index]["id"]
    prompt = gen.prompt_for(it.label) if it.source == "synthetic" else None
    if prompt is not None:
        rec["prompt"] = prompt
    if it.real_index is not None:
        src = real_records[it.real_index]
        rec["source_id"] = src["id"]
        rec["source_path"] = src.get("path")
    return rec


def _augment(augmenter, it: Item, img: np.ndarray, rec: dict) -> np.ndarray:
    if augmenter is None or it.aug_seed is None:
        return img
    img, applied = augmenter.apply(np.asarray(img), it.aug_seed)
    rec["augment"] = applied
    return img


def generator_fingerprint(gen_dir: Path) -> str:
    """sha256 of every file of the generator folder, subfolders included (an sd_lora generator's
    class adapters and embeddings live there), with their relative paths: a retrained generator is
    another job, whose old images must not be kept as if they were this generator's. Hidden files
    (temp files of a write in progress) are left out."""
    from imgaug_gen.io import tree_hash

    return tree_hash(gen_dir)


def launcher_shard(cfg: DictConfig) -> DictConfig:
    """Under ``torchrun`` (``RANK``/``WORLD_SIZE``) or ``srun`` (``SLURM_PROCID``/``SLURM_NTASKS``) with
    the default ``num_shards=1``, each process takes its rank's shard; explicit shards win."""
    import os

    if int(cfg.get("num_shards", 1)) != 1:
        return cfg
    for rank_var, world_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        world = int(os.environ.get(world_var, "1") or 1)
        if world > 1 and rank_var in os.environ:
            cfg = cfg.copy()
            with open_dict(cfg):
                cfg.shard, cfg.num_shards = int(os.environ[rank_var]), world
            log.info("process %d of %d (%s): generating shard %d of %d", cfg.shard, world, rank_var, cfg.shard, world)
            return cfg
    return cfg


@dataclass
class ShardPlan:
    """This shard's share of the job: plain items (real copies, unfiltered synthetic images) and,
    with the filter on, whole (class, source) candidate groups with their targets."""

    items: list[Item]  # the whole job's plan (every shard's)
    plain: list[Item]
    groups: dict[tuple[int, str], list[Item]]
    targets: dict[tuple[int, str], int]
    counts: dict[int, dict[str, int]]

    @property
    def mine(self) -> list[Item]:
        return self.plain + [it for g in self.groups.values() for it in g]


@dataclass
class Scorers:
    scorer: Any = None  # per-image confidence + FID/KID features (score=true)
    confidence: Any = None  # the domain classifier behind per-image confidence
    quality_filter: Any = None
    filter_images: int = 0  # images the filter's classifier learnt from


def generate(cfg: DictConfig) -> dict[str, Any]:
    """Run a generation job as configured; returns the metrics dict (also in metrics.json)."""
    from imgaug_gen.export import refuse_foreign_folder, writer_lock_name
    from imgaug_gen.generators.base import read_run_config
    from imgaug_gen.io import FolderLock, set_durable

    # 1. Check inputs (and build the classical augmenter: a bad transform fails here); claim the folder.
    cfg = launcher_shard(cfg)
    augmenter = check_generate_config(cfg)
    gen_dir = _generator_dir(Path(cfg.run_dir))
    gen_config = read_run_config(gen_dir)  # kind, format version, no `_target_`: before loading weights
    check_out_dir(cfg, gen_config)
    refuse_foreign_folder(cfg.out_dir)  # before a lock file is made there (checked again under the lock)
    lock = FolderLock(cfg.out_dir, writer_lock_name(cfg.shard, cfg.num_shards), "generate.py job").acquire()
    durable = set_durable(bool(cfg.durable))
    ok = False
    try:
        metrics = _generate(cfg, augmenter, gen_dir, gen_config, lock)
        ok = True
        return metrics
    finally:
        set_durable(durable)
        lock.release(failed=not ok)


def _generate(cfg: DictConfig, augmenter, gen_dir: Path, gen_config: dict, lock) -> dict[str, Any]:
    from imgaug_gen.export import FolderWriter, mark_merged, read_manifest, write_hf_metadata
    from imgaug_gen.generators.base import load_generator

    # 2. Load the generator (denormal floats flushed, freed tensor memory reused: runtime.py).
    prepare_process()
    gen = load_generator(gen_dir, device=_device(cfg.device))
    if any(s["mode"] == "img2img" for s in _mix_sources(cfg)) and not gen.supports_edit:
        gen.edit(np.zeros((0, 1, 1, 1), np.uint8), [])  # raises the kind's clear error
    # 3. Rebuild the real data.
    dm = rebuild_datamodule(gen_config, cfg.get("data"), str(gen_dir / "config.json"))
    real = RealData(*dm.train_arrays(), dm.train_records())
    if augmenter is not None:
        augmenter.check(real.images.shape[1:])
    # 4. Plan this shard; 5. open the folder under the job record (refusing another job's folder).
    plan = plan_shard(cfg, gen, real, augmenter)
    writer = FolderWriter(Path(cfg.out_dir), gen.class_names, job_record(cfg, gen, gen_dir, plan, augmenter),
                          overwrite=cfg.overwrite, shard=cfg.shard, num_shards=cfg.num_shards,
                          io_workers=int(cfg.io_workers), lock=lock)
    writer.remove_orphans((it.id, writer.class_dirs[it.label]) for it in plan.mine)
    # 6. Scorers: per-image confidence, the quality filter, FID/KID at the end.
    scorers = build_scorers(cfg, dm, real)
    # 7. Generate and write: plain items, then filtered candidates until each target is met.
    t0 = time.perf_counter()
    with writer, _progress(cfg, writer, plan) as bar:
        written = write_items(cfg, gen, real, plan, writer, scorers, augmenter, bar)
        written += write_filtered_items(cfg, gen, real, plan, writer, scorers, augmenter, bar)
    metrics: dict[str, Any] = {"images_written_now": written, "seconds": round(time.perf_counter() - t0, 3)}
    metrics["images_per_second"] = round(written / metrics["seconds"], 2) if metrics["seconds"] > 0 else None
    # 8. The last shard to finish merges the manifests, then writes train/metadata.jsonl from the final
    # manifest (Hugging Face imagefolder columns); 9. it scores the folder and writes the report.
    if not finish_shards(cfg, plan):
        return metrics
    write_hf_metadata(cfg.out_dir, read_manifest(cfg.out_dir))
    metrics = write_report(cfg, gen, dm, real, plan, scorers, augmenter, metrics)
    if cfg.num_shards > 1:
        mark_merged(cfg.out_dir, cfg.num_shards)
    return metrics


@dataclass
class RealData:
    images: np.ndarray
    labels: np.ndarray
    records: list[dict]

    @property
    def ids(self) -> list[str]:
        return [r["id"] for r in self.records]


def plan_shard(cfg: DictConfig, gen, real: RealData, augmenter) -> ShardPlan:
    """Every planned item (ids and seeds fixed by the config) and this shard's share of them. With the
    filter, whole (class, source) candidate groups go to one shard, which keeps the first n accepted."""
    counts = synthetic_counts(cfg, gen.num_classes, real.labels)
    real_counts = np.bincount(np.asarray(real.labels, dtype=np.int64), minlength=gen.num_classes)
    for c, name in enumerate(gen.class_names):
        log.info("class %s: %d real, synthetic %s", name, int(real_counts[c]), counts[c])
    items = plan_items(cfg, gen.num_classes, real.labels, real.ids, augmenter)
    targets = {(c, m): n for c, per in counts.items() for m, n in per.items()}
    if not _filter_cfg(cfg).get("enabled"):
        return ShardPlan(items, items[cfg.shard::cfg.num_shards], {}, targets, counts)
    groups: dict[tuple[int, str], list[Item]] = {}
    for it in items:
        if it.source == "synthetic":
            groups.setdefault((it.label, it.mode), []).append(it)
    keys = sorted(groups, key=lambda k: (k[0], MODES.index(k[1])))
    mine = {k: groups[k] for g, k in enumerate(keys) if g % cfg.num_shards == cfg.shard}
    plain = [it for it in items if it.source != "synthetic"][cfg.shard::cfg.num_shards]
    return ShardPlan(items, plain, mine, targets, counts)


def job_record(cfg: DictConfig, gen, gen_dir: Path, plan: ShardPlan, augmenter) -> dict:
    """What makes this job this job (job.json): a folder holding another job's output is refused."""
    fcfg, mix = _filter_cfg(cfg), cfg.get("mix") or {}
    return {"run_dir": str(Path(cfg.run_dir).resolve()), "generator": generator_fingerprint(gen_dir),
            "kind": gen.kind, "mode": cfg.mode, "seed": int(cfg.seed), "n_per_class": int(cfg.n_per_class),
            "include_real": bool(cfg.include_real), "img2img": OmegaConf.to_container(cfg.img2img, resolve=True),
            "num_shards": int(cfg.num_shards), "num_items": len(plan.items),
            "augment": augmenter.to_dict() if augmenter is not None else None,
            "mix": {"synthetic_ratio": mix.get("synthetic_ratio"), "target_per_class": mix.get("target_per_class"),
                    "sources": _mix_sources(cfg)},
            "filter": fcfg if fcfg.get("enabled") else None}


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
    out.confidence = (out.scorer if hasattr(out.scorer, "predict_proba")
                      else build_feature_extractor(domain, ref_images, ref_labels, dm.num_classes))
    if fcfg.get("enabled"):
        from imgaug_gen.filtering import QualityFilter

        confidence, out.filter_images = out.confidence, len(ref_images)
        if fcfg["classifier_data"] == "train":
            # The filter shapes the training data, so it may only learn from the images the user
            # trains on (with data.shots set, the reference set holds labels a few-shot user lacks).
            out.filter_images = len(real.images)
            confidence = build_feature_extractor(domain, real.images, real.labels, dm.num_classes)
        out.quality_filter = QualityFilter(confidence, real.images, tau=fcfg["tau"], delta=fcfg["delta"],
                                           metric=fcfg["metric"], space=fcfg["space"])
    if not cfg.score:
        out.scorer = None  # the filter's extractor only; no per-image confidence / FID for unfiltered images
    return out


def _progress(cfg: DictConfig, writer, plan: ShardPlan):
    from tqdm.auto import tqdm

    kept = lambda g: sum(1 for it in g if writer.records.get(it.id, {}).get("kept"))  # noqa: E731
    todo = sum(1 for it in plan.plain if it.id not in writer.records)
    log.info("%d images planned for this shard, %d already written, %d to go", len(plan.plain),
             len(plan.plain) - todo, todo)
    total = todo + sum(max(0, plan.targets.get(k, 0) - kept(g)) for k, g in plan.groups.items())
    return tqdm(total=total, desc=f"generate ({cfg.mode})", unit="img", dynamic_ncols=True, disable=not cfg.progress)


def _generator_info(cfg: DictConfig, gen) -> dict:
    """A synthetic image's ``generator`` in the manifest: its kind, run and (when it started from one) prior."""
    info = {"kind": gen.kind, "run_dir": str(Path(cfg.run_dir).resolve())}
    prior = gen.config.get("prior")
    if isinstance(prior, dict):
        info["prior"] = {k: prior.get(k) for k in ("path", "sha256", "source")}
    return info


def write_items(cfg: DictConfig, gen, real: RealData, plan: ShardPlan, writer, scorers: Scorers, augmenter,
                bar) -> int:
    """Generate (or copy) the plain items not yet in the folder, batch by batch; returns how many."""
    todo = [it for it in plan.plain if it.id not in writer.records]
    info, written = _generator_info(cfg, gen), 0
    for batch in _batches(todo, int(cfg.batch_size)):
        by_mode: dict[str, list[Item]] = {}
        for it in batch:
            by_mode.setdefault(it.mode, []).append(it)
        for group in by_mode.values():
            images = _render(gen, group, real.images, cfg)
            conf = (scorers.confidence.predict_proba(images)[np.arange(len(group)), [it.label for it in group]]
                    if scorers.scorer is not None else None)
            for k, (it, img) in enumerate(zip(group, images)):
                rec = _base_record(it, gen, info, real.records)
                if conf is not None:
                    rec["scores"] = {"confidence": float(conf[k])}
                writer.write(rec, _augment(augmenter, it, img, rec))
                written += 1
            bar.update(len(group))
    return written


def write_filtered_items(cfg: DictConfig, gen, real: RealData, plan: ShardPlan, writer, scorers: Scorers,
                         augmenter, bar) -> int:
    """Each (class, source) group's candidates in plan order until ``n`` pass the filter: the first n
    accepted (resumable: the manifest records rejected candidates too). Returns how many were kept."""
    from imgaug_gen.filtering import QualityFilter, overgenerate_plan, select_accepted

    qf, max_factor = scorers.quality_filter, float(_filter_cfg(cfg)["max_factor"])
    info, written = _generator_info(cfg, gen), 0
    for key, cands in plan.groups.items():
        n = plan.targets.get(key, 0)
        accepted = sum(1 for it in cands if writer.records.get(it.id, {}).get("kept", False))
        pending = [it for it in cands if it.id not in writer.records]
        done_n = len(cands) - len(pending)
        while accepted < n and pending:
            est = max(accepted / done_n if done_n else 1.0, 1.0 / max_factor)
            size = min(len(pending), int(cfg.batch_size), overgenerate_plan(n - accepted, est, max_factor, margin=0.0))
            chunk, pending = pending[:size], pending[size:]
            images = _render(gen, chunk, real.images, cfg)
            labels = np.asarray([it.label for it in chunk])
            scores = qf.score(images, labels)
            chosen = set(select_accepted(qf.keep(scores), labels, n - accepted).tolist())
            last = max(chosen) if len(chosen) == n - accepted else len(chunk) - 1  # stop at the n-th accepted
            for k, (it, img) in enumerate(zip(chunk[:last + 1], images)):
                rec = _base_record(it, gen, info, real.records)
                rec["scores"] = QualityFilter.record(scores, k)
                done_n += 1
                if k in chosen:
                    rec["kept"] = True
                    writer.write(rec, _augment(augmenter, it, img, rec))
                    bar.update(1)
                else:
                    writer.write_rejected(rec)
            accepted += len(chosen)
            written += len(chosen)
        if accepted < n:
            log.warning("filter: class %s (%s) has %d of %d images after %d candidates "
                        "(raise `filter.max_factor` or relax `filter.tau` / `filter.delta`)",
                        gen.class_names[key[0]], key[1], accepted, n, len(cands))
    return written


def finish_shards(cfg: DictConfig, plan: ShardPlan) -> bool:
    """A shard marks itself done; True for exactly one shard, the one that merges the manifests."""
    from imgaug_gen.export import finish_shard

    if cfg.num_shards == 1:
        return True
    return finish_shard(cfg.out_dir, int(cfg.shard), int(cfg.num_shards), len(plan.mine))


def write_report(cfg: DictConfig, gen, dm, real: RealData, plan: ShardPlan, scorers: Scorers, augmenter,
                 metrics: dict) -> dict:
    """Score the whole folder; write metrics.json, config.yaml and preview.png; return the metrics."""
    from imgaug_gen.export import is_kept, read_manifest
    from imgaug_gen.io import atomic_write_json, atomic_write_text

    out_dir = Path(cfg.out_dir)
    all_records = read_manifest(out_dir, include_rejected=True)
    records = [r for r in all_records if is_kept(r)]
    metrics.update(score_folder(out_dir, records, gen.class_names, scorers.scorer,
                                dm if scorers.scorer is not None else None,
                                k=int(cfg.get("precision_recall_k", 3) or 3), max_images=cfg.get("score_max_images")))
    real_counts = np.bincount(np.asarray(real.labels, dtype=np.int64), minlength=gen.num_classes)
    metrics["planned"] = {name: {"real": int(real_counts[c]) if cfg.include_real else 0, **plan.counts[c]}
                          for c, name in enumerate(gen.class_names)}
    if scorers.quality_filter is not None:
        metrics["filter"] = filter_summary(all_records, scorers.quality_filter, gen.class_names, plan.targets)
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

        preview_sheet(out_dir, records, gen.class_names)
    except Exception as e:  # a picture must never fail the job
        log.warning("could not draw preview.png: %s", e)
    return metrics


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

    parts = [extractor.features(load_folder_images(out_dir, records[i:i + chunk]), batch_size=256)
             for i in range(0, len(records), chunk)]
    return torch.cat(parts) if parts else torch.zeros(0, extractor.num_features)


def score_folder(out_dir: Path, records: list[dict], class_names: list[str], extractor=None, dm=None,
                 k: int = 3, max_images: int | None = None) -> dict:
    """Counts per class and source (and source mode); FID/KID and precision/recall of the synthetic
    images against the real reference, overall and per class. Lines with ``"kept": false`` are ignored.
    With ``max_images``, the scores use at most that many synthetic images, evenly spaced in id order."""
    from imgaug_gen.export import is_kept

    records = [r for r in records if is_kept(r)]
    counts = {c: {"real": 0, "synthetic": 0} for c in class_names}
    by_mode: dict[str, dict[str, int]] = {c: {} for c in class_names}
    for r in records:
        counts[r["class_name"]][r["source"]] += 1
        mode = r.get("mode") or r["source"]
        by_mode[r["class_name"]][mode] = by_mode[r["class_name"]].get(mode, 0) + 1
    out: dict[str, Any] = {"counts": counts, "counts_by_mode": by_mode,
                           "n_synthetic": sum(v["synthetic"] for v in counts.values()),
                           "n_real": sum(v["real"] for v in counts.values())}
    syn = [r for r in records if r["source"] == "synthetic"]
    if extractor is None or not syn:
        return out
    from imgaug_gen.metrics import PRDC_KEYS, FidelityEvaluator, per_class_fidelity_from_features, precision_recall

    ref_images, ref_labels = dm.reference_arrays()
    evaluator = FidelityEvaluator(extractor, ref_images)
    # Streamed: files are read and turned into features chunk by chunk, so memory holds
    # features (N x D floats), never all the images.
    if max_images and len(syn) > max_images:
        # Evenly spaced over the id order (every class and source keeps its share): memory and time
        # of the scores stay bounded however many images the folder holds.
        syn = [syn[i] for i in np.linspace(0, len(syn) - 1, int(max_images)).round().astype(int)]
    out["n_scored"] = len(syn)
    fake_f = folder_features(out_dir, syn, extractor)
    fid = evaluator.evaluate_features(fake_f)
    conf = [r["scores"]["confidence"] for r in syn if "confidence" in r.get("scores", {})]
    out.update({"fid": fid["fid"], "kid_mean": fid["kid_mean"], "kid_std": fid["kid_std"],
                "features": fid["features"], "num_features": fid["num_features"],
                "n_reference": fid["n_real"], "reference": "real images of the run's data (all but the test split)",
                "mean_confidence": float(np.mean(conf)) if conf else None})
    out.update(dict.fromkeys(PRDC_KEYS))
    real_f = evaluator.real.features
    if len(real_f) > k and len(fake_f) > k:
        pr = precision_recall(real_f, fake_f, k=k)
        out.update({key: pr[key] for key in PRDC_KEYS})
    out["precision_recall_k"] = int(k)
    fake_labels = np.asarray([r["label"] for r in syn], dtype=np.int64)
    out["per_class"] = {str(name): v for name, v in per_class_fidelity_from_features(
        real_f, ref_labels, fake_f, fake_labels, features_name=extractor.name, num_features=extractor.num_features,
        class_names=list(class_names), k=k).items()}
    return out
