"""The plan of a generate job: every image it writes, in a fixed order, with its id and seeds.

The mixing policy (``n_per_class``, ``mix.synthetic_ratio`` / ``mix.target_per_class``, ``mix.sources``)
gives per-class, per-source counts; :func:`plan_items` turns them into :class:`Item` s whose ids and seeds
depend only on the config (so a killed job resumes, and shards are disjoint); :func:`plan_shard` takes one
shard's share.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from imgaug_gen.errors import ConfigError

log = logging.getLogger(__name__)


MODES = ("sample", "img2img")


#: The most images (candidates included) one generate job plans: its plan is held in memory.
MAX_PLANNED = 20_000_000


#: Offset of the classical-augmentation seed stream from ``cfg.seed`` (independent of the generator's).
AUGMENT_SEED_OFFSET = 1_000_003


@dataclass(slots=True)
class Item:
    """One planned output image (slots: a 200,000-image plan stays small)."""

    id: str
    label: int
    source: str  # "synthetic" | "real"
    mode: str  # "sample" | "img2img" | "real" | "augment"
    seed: int | None = None
    strength: float | None = None
    real_index: int | None = None  # index into the real training set (img2img source, or the copy)
    partner_index: int | None = None  # img2img with `img2img.blend`: the same-class real image blended in
    blend: float | None = None  # weight of the source image in that blend
    extra: dict | None = None
    aug_seed: int | None = None  # classical augmentation seed (None: not augmented)


def _mix_sources(cfg: DictConfig) -> list[dict]:
    """``mix.sources`` as plain dicts (the YAML default: ``[{mode: <mode>, fraction: 1.0}]``)."""
    return [dict(s) for s in OmegaConf.to_container(cfg.mix.sources, resolve=True)]


def _filter_cfg(cfg: DictConfig) -> dict:
    return dict(OmegaConf.to_container(cfg.filter, resolve=True))


def _blend_range(cfg: DictConfig) -> tuple[float, float] | None:
    """``img2img.blend`` as ``(lo, hi)`` (checked by the schema), or None (plain edits)."""
    b = cfg.img2img.get("blend")
    return None if b is None else (float(b[0]), float(b[1]))


def split_counts(total: int, fractions: Sequence[float]) -> list[int]:
    """Split ``total`` into integer parts proportional to ``fractions`` (largest remainder).

    Parts sum to ``total`` exactly; leftover units go to the largest fractional parts, ties
    to the earlier entry, so the split is deterministic.
    """
    total = int(total)
    f = np.asarray(fractions, dtype=np.float64)
    if total < 0 or f.ndim != 1 or f.size == 0 or (f < 0).any() or f.sum() <= 0:
        raise ConfigError(
            f"cannot split {total} by fractions {list(fractions)}: need a count >= 0 and "
            "non-negative fractions with a positive sum."
        )
    quotas = total * f / f.sum()
    parts = np.floor(quotas + 1e-9).astype(np.int64)
    rest = total - int(parts.sum())
    order = sorted(range(f.size), key=lambda j: (-(quotas[j] - parts[j]), j))
    for j in order[: max(rest, 0)]:
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


def plan_items(
    cfg: DictConfig, num_classes: int, real_labels: np.ndarray, real_ids: list[str], augmenter: Any = None
) -> list[Item]:
    """Every image of the job (with ``filter.enabled``: every candidate), in a fixed order, with id and seeds.

    Sample ids ``syn_{i}`` number the classes' (candidate) counts one after the other; img2img
    ids ``edit_{r * M + k}`` are edit ``k`` of real image ``r`` (each class's edits go round-robin
    over its real images), which with the default policy are exactly ``img2img.edits_per_image``
    edits of every real image. With ``img2img.blend = [lo, hi]`` each edit starts from
    ``w * image + (1 - w) * partner``, the partner another real image of the same class and
    ``w ~ U(lo, hi)``, both drawn from the edit's seed (in-class interpolation, then denoised).
    Seeds come from ``(seed, id number)``; augmentation seeds from a separate stream
    ``(seed + 1_000_003, position in the plan)``.
    """
    from imgaug_gen.generators.seeds import seeds_at

    counts = synthetic_counts(cfg, num_classes, real_labels)
    real_labels = np.asarray(real_labels, dtype=np.int64)
    _check_planned(cfg, counts, real_labels, augmenter)
    items = _sample_items(cfg, counts, num_classes)
    items += _edit_items(cfg, counts, num_classes, real_labels, real_ids)
    items += _real_items(cfg, real_labels, real_ids, augmenter)
    if augmenter is not None:
        at = [g for g, it in enumerate(items) if it.source == "synthetic" or it.mode == "augment"]
        for g, aug_seed in zip(at, seeds_at(cfg.seed + AUGMENT_SEED_OFFSET, at)):
            items[g].aug_seed = aug_seed
    return items


def _check_planned(cfg: DictConfig, counts: dict[int, dict[str, int]], real_labels: np.ndarray, augmenter) -> None:
    """Refuse a plan of more than :data:`MAX_PLANNED` images (candidates and real copies included)."""
    planned = sum(_candidates(n, cfg) for per in counts.values() for n in per.values())
    planned += len(real_labels) * (
        int(bool(cfg.include_real))
        + (augmenter.copies_per_image if augmenter is not None and augmenter.apply_to == "all" else 0)
    )
    if planned > MAX_PLANNED:
        raise ConfigError(
            f"this job plans {planned} images (with `filter.max_factor` candidates), over the limit of "
            f"{MAX_PLANNED} per job (each planned image is held in memory). Lower `n_per_class` / "
            "`mix.target_per_class` / `img2img.edits_per_image`, or split the job into several "
            "`out_dir`s with different `seed`s."
        )


def _sample_items(cfg: DictConfig, counts: dict[int, dict[str, int]], num_classes: int) -> list[Item]:
    """The ``sample`` items: the classes one after the other, ids ``syn_{i}``."""
    from imgaug_gen.generators.seeds import per_image_seeds

    items: list[Item] = []
    n_sample = [_candidates(counts[c].get("sample", 0), cfg) for c in range(num_classes)]
    seeds = per_image_seeds(cfg.seed, 0, int(sum(n_sample)))
    i = 0
    for c in range(num_classes):
        for _ in range(n_sample[c]):
            items.append(Item(f"syn_{i:07d}", c, "synthetic", "sample", seed=seeds[i]))
            i += 1
    return items


def _edit_items(
    cfg: DictConfig, counts: dict[int, dict[str, int]], num_classes: int, real_labels: np.ndarray, real_ids: list[str]
) -> list[Item]:
    """The ``img2img`` items: edit ``k`` of real image ``r``, round-robin over the class's real images."""
    from imgaug_gen.generators.seeds import seeds_at

    n_edit = [_candidates(counts[c].get("img2img", 0), cfg) for c in range(num_classes)]
    if not sum(n_edit):
        return []
    strengths, blend = list(cfg.img2img.strengths), _blend_range(cfg)
    by_class = [np.flatnonzero(real_labels == c) for c in range(num_classes)]
    per_real = max([math.ceil(n_edit[c] / len(by_class[c])) for c in range(num_classes) if len(by_class[c])], default=0)
    edits = []
    for c in range(num_classes):
        if n_edit[c] and not len(by_class[c]):
            log.warning("class %d has no real images to edit; its %d img2img images are skipped", c, n_edit[c])
            continue
        for j in range(n_edit[c]):
            r, k = int(by_class[c][j % len(by_class[c])]), j // len(by_class[c])
            edits.append((r * per_real + k, r))
    items: list[Item] = []
    edits.sort()
    for (idx, r), seed in zip(edits, seeds_at(cfg.seed, [idx for idx, _ in edits])):
        rng = np.random.default_rng(seed)
        strength = float(strengths[rng.integers(len(strengths))])
        item = Item(
            f"edit_{idx:07d}",
            int(real_labels[r]),
            "synthetic",
            "img2img",
            seed=seed,
            strength=strength,
            real_index=r,
            extra={"source_id": real_ids[r]},
        )
        if blend is not None:
            mates = by_class[int(real_labels[r])]
            others = mates[mates != r] if len(mates) > 1 else mates
            item.partner_index = int(others[rng.integers(len(others))])
            item.blend = round(float(rng.uniform(*blend)), 4)
        items.append(item)
    return items


def _real_items(cfg: DictConfig, real_labels: np.ndarray, real_ids: list[str], augmenter) -> list[Item]:
    """The real images' items: the copies (``include_real``), then the classical copies (``apply_to: all``)."""
    items: list[Item] = []
    if cfg.include_real:
        for r, label in enumerate(real_labels):
            items.append(Item(f"real_{real_ids[r]}", int(label), "real", "real", real_index=r))
    if augmenter is not None and augmenter.apply_to == "all":
        for r, label in enumerate(real_labels):
            for k in range(augmenter.copies_per_image):
                items.append(
                    Item(
                        f"aug_{real_ids[r]}_{k}",
                        int(label),
                        "real",
                        "augment",
                        real_index=r,
                        extra={"source_id": real_ids[r]},
                    )
                )
    return items


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
        return ShardPlan(items, items[cfg.shard :: cfg.num_shards], {}, targets, counts)
    groups: dict[tuple[int, str], list[Item]] = {}
    for it in items:
        if it.source == "synthetic":
            groups.setdefault((it.label, it.mode), []).append(it)
    keys = sorted(groups, key=lambda k: (k[0], MODES.index(k[1])))
    mine = {k: groups[k] for g, k in enumerate(keys) if g % cfg.num_shards == cfg.shard}
    plain = [it for it in items if it.source != "synthetic"][cfg.shard :: cfg.num_shards]
    return ShardPlan(items, plain, mine, targets, counts)
