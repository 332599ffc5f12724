"""``generate(cfg)``: the job behind ``generate.py``, as numbered steps (the headers in :func:`generate`
and :func:`_generate` carry the same numbers).

1. Check inputs and claim the folder (the schema, the files, ``out_dir`` against the run and the data;
   the classical augmenter is built here so a bad transform fails first; then the folder lock)
2. Load the generator    (any registered kind, from its data-only folder)
3. Rebuild the real data (the data kind the run recorded, or ``data=...``)
4. Plan this shard       (:mod:`imgaug_gen.jobs.plan`: per-class / per-source counts, ids and seeds)
5. Open the folder       (the job record; another job's folder is refused; resume: orphans removed)
6. Build the scorers     (per-image confidence, the quality filter, FID/KID: :mod:`imgaug_gen.jobs.scoring`)
7. Generate and write    (batches; with ``filter.enabled`` over-generate per class until enough pass;
                          classical augmentation after filtering; real copies; atomic PNGs, manifest lines)
8. Merge                 (the one shard that finds all done merges the manifests; ``train/metadata.jsonl``)
9. Report                (``metrics.json``, ``config.yaml``, ``preview.png``)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from imgaug_gen.errors import ConfigError
from imgaug_gen.jobs.plan import (  # noqa: F401  (split_counts, plan_items: part of the job's API)
    MODES,
    Item,
    RealData,
    ShardPlan,
    _filter_cfg,
    _mix_sources,
    launcher_shard,
    plan_items,
    plan_shard,
    split_counts,
    synthetic_counts,
)
from imgaug_gen.jobs.render import render_pool, render_streams_for, rendered
from imgaug_gen.jobs.scoring import ManifestTally, Scorers, build_scorers, write_report
from imgaug_gen.runtime import prepare_process

log = logging.getLogger(__name__)


# -- 1. check ------------------------------------------------------------------------
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
    from imgaug_gen.shards import require_format

    require_format(cfg.format)
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
            raise ConfigError(
                f"`out_dir` = {str(cfg.out_dir)!r} and {key} = {path!r} overlap (one is, contains or lies "
                "inside the other): a generate job writes, and may later remove, its own "
                "files there. Choose an `out_dir` outside both, e.g. a new folder next to them."
            )


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
        raise ConfigError(
            f"the data's classes {list(dm.class_names)} differ from the generator's "
            f"{gen_config['class_names']}; pass the data the generator was trained on."
        )
    return dm


# -- 4. plan -----------------------------------------------------------------------------
# -- 6. generate -------------------------------------------------------------------------
def _batches(items: list[Item], size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


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
        return gen.edit(
            src,
            labels,
            strength=[it.strength for it in batch],
            seeds=seeds,
            batch_size=len(batch),
            **_sample_kwargs(cfg),
        )
    return real_images[[it.real_index for it in batch]]


def _base_record(it: Item, gen, generator_info: dict, real_records: list[dict]) -> dict:
    rec = {
        "id": it.id,
        "label": it.label,
        "source": it.source,
        "mode": it.mode,
        "seed": it.seed,
        "generator": generator_info if it.source == "synthetic" else None,
        "scores": {},
    }
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
    from imgaug_gen.export import mark_merged, read_manifest, write_hf_metadata
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
    # 4. Plan this shard.
    plan = plan_shard(cfg, gen, real, augmenter)
    # 5. Open the folder under the job record (another job's folder is refused; a killed run's orphans go).
    writer = open_writer(cfg, gen.class_names, job_record(cfg, gen, gen_dir, plan, augmenter), lock, gen.device.type)
    writer.remove_orphans((it.id, writer.class_dirs[it.label]) for it in plan.mine)
    write_plan_record(cfg, len(plan.plain) + sum(plan.targets.get(k, 0) for k in plan.groups))
    # 6. Scorers: per-image confidence, the quality filter, FID/KID at the end.
    scorers = build_scorers(cfg, dm, real)
    # 7. Generate and write: plain items, then filtered candidates until each target is met. A fresh
    # one-shard job counts its kept lines (and picks the preview's) as it writes them: the report then
    # reads the manifest only for the images it scores.
    tally = None
    if cfg.num_shards == 1 and not writer.resumed:
        tally = ManifestTally(gen.class_names, preview=True)
        writer.watch = tally.add
    t0 = time.perf_counter()
    with writer, _progress(cfg, writer, plan) as bar:
        written = write_items(cfg, gen, real, plan, writer, scorers, augmenter, bar)
        written += write_filtered_items(cfg, gen, real, plan, writer, scorers, augmenter, bar)
    metrics: dict[str, Any] = {"images_written_now": written, "seconds": round(time.perf_counter() - t0, 3)}
    metrics["images_per_second"] = round(written / metrics["seconds"], 2) if metrics["seconds"] > 0 else None
    # 8. Merge: the one shard that finds every shard done merges the manifests, then writes
    # train/metadata.jsonl from the final manifest (Hugging Face imagefolder columns).
    if not finish_shards(cfg, plan):
        return metrics
    if cfg.format == "folder":
        write_hf_metadata(cfg.out_dir, read_manifest(cfg.out_dir))
    # 9. Report: score the folder, metrics.json, config.yaml, preview.png.
    metrics = write_report(cfg, gen, dm, real, plan, scorers, augmenter, metrics, tally)
    if cfg.num_shards > 1:
        mark_merged(cfg.out_dir, cfg.num_shards)
    return metrics


def io_workers_for(cfg: DictConfig, device: str) -> int:
    """``io_workers``, or where it is null: one writer thread, overlapping the generator's forward with the
    writes' waits on the disk (and, on a GPU, with the encoding); inline for shards on a CPU device, where
    the forward keeps every core busy and a shard job waits on no disk: a thread there overlaps nothing
    (``benchmarks/bench_generate.py`` runs both)."""
    if cfg.io_workers is not None:
        return int(cfg.io_workers)
    return 0 if cfg.format != "folder" and device == "cpu" else 1


def open_writer(cfg: DictConfig, class_names: list[str], job: dict, lock, device: str = "cpu"):
    """The writer of ``cfg.format``: image files (:class:`~imgaug_gen.export.FolderWriter`) or shards
    (:class:`~imgaug_gen.shards.ShardWriter`), under the job's lock."""
    from imgaug_gen.export import FolderWriter

    io_workers = io_workers_for(cfg, device)
    common = dict(overwrite=cfg.overwrite, shard=cfg.shard, num_shards=cfg.num_shards, io_workers=io_workers, lock=lock)
    if cfg.format == "folder":
        return FolderWriter(Path(cfg.out_dir), class_names, job, **common)
    from imgaug_gen.shards import ShardWriter

    return ShardWriter(Path(cfg.out_dir), class_names, job, format=cfg.format, shard_size=cfg.shard_size, **common)


def write_plan_record(cfg: DictConfig, planned: int) -> None:
    """``plan[.shardXXX-of-YYY].json``: how many images this shard of the job keeps when done (read by
    :func:`imgaug_gen.progress.job_progress` beside the manifests' line counts)."""
    from imgaug_gen.export import plan_record_name
    from imgaug_gen.io import atomic_write_json

    atomic_write_json(Path(cfg.out_dir) / plan_record_name(cfg.shard, cfg.num_shards), {"planned": int(planned)})


def job_record(cfg: DictConfig, gen, gen_dir: Path, plan: ShardPlan, augmenter) -> dict:
    """What makes this job this job (job.json): a folder holding another job's output is refused."""
    fcfg, mix = _filter_cfg(cfg), cfg.get("mix") or {}
    return {
        "run_dir": str(Path(cfg.run_dir).resolve()),
        "generator": generator_fingerprint(gen_dir),
        "kind": gen.kind,
        "mode": cfg.mode,
        "seed": int(cfg.seed),
        "n_per_class": int(cfg.n_per_class),
        "include_real": bool(cfg.include_real),
        "img2img": OmegaConf.to_container(cfg.img2img, resolve=True),
        "num_shards": int(cfg.num_shards),
        "num_items": len(plan.items),
        "augment": augmenter.to_dict() if augmenter is not None else None,
        "mix": {
            "synthetic_ratio": mix.get("synthetic_ratio"),
            "target_per_class": mix.get("target_per_class"),
            "sources": _mix_sources(cfg),
        },
        "filter": fcfg if fcfg.get("enabled") else None,
        # a folder-format job keeps the record it always had (its folders stay resumable)
        **({"format": cfg.format, "shard_size": int(cfg.shard_size)} if cfg.format != "folder" else {}),
    }


def _progress(cfg: DictConfig, writer, plan: ShardPlan):
    from tqdm.auto import tqdm

    kept = lambda g: sum(1 for it in g if writer.is_kept(it.id))  # noqa: E731
    todo = sum(1 for it in plan.plain if not writer.has(it.id))
    log.info(
        "%d images planned for this shard, %d already written, %d to go", len(plan.plain), len(plan.plain) - todo, todo
    )
    total = todo + sum(max(0, plan.targets.get(k, 0) - kept(g)) for k, g in plan.groups.items())
    return tqdm(total=total, desc=f"generate ({cfg.mode})", unit="img", dynamic_ncols=True, disable=not cfg.progress)


def _generator_info(cfg: DictConfig, gen) -> dict:
    """A synthetic image's ``generator`` in the manifest: its kind, run and (when it started from one) prior."""
    info = {"kind": gen.kind, "run_dir": str(Path(cfg.run_dir).resolve())}
    prior = gen.config.get("prior")
    if isinstance(prior, dict):
        info["prior"] = {k: prior.get(k) for k in ("path", "sha256", "source")}
    return info


def _mode_groups(items: list[Item], size: int):
    """Each batch's items split by mode (a batch renders one mode at a time), batch after batch."""
    for batch in _batches(items, size):
        by_mode: dict[str, list[Item]] = {}
        for it in batch:
            by_mode.setdefault(it.mode, []).append(it)
        yield from by_mode.values()


def write_items(cfg: DictConfig, gen, real: RealData, plan: ShardPlan, writer, scorers: Scorers, augmenter, bar) -> int:
    """Generate (or copy) the plain items not yet in the folder, batch by batch, in plan order (rendered
    ``render_streams`` batches at once); returns how many."""
    todo = [it for it in plan.plain if not writer.has(it.id)]
    info, written = _generator_info(cfg, gen), 0
    streams = render_streams_for(cfg, gen)
    with render_pool(gen, streams) as pool:
        for group, images in rendered(
            lambda g: _render(gen, g, real.images, cfg), _mode_groups(todo, int(cfg.batch_size)), pool, streams
        ):
            conf = (
                scorers.confidence.predict_proba(images)[np.arange(len(group)), [it.label for it in group]]
                if scorers.scorer is not None
                else None
            )
            recs = [_base_record(it, gen, info, real.records) for it in group]
            if conf is not None:
                for rec, c in zip(recs, conf.tolist()):
                    rec["scores"] = {"confidence": c}
            writer.write_many(recs, [_augment(augmenter, it, img, rec) for it, img, rec in zip(group, images, recs)])
            written += len(group)
            bar.update(len(group))
    return written


def write_filtered_items(
    cfg: DictConfig, gen, real: RealData, plan: ShardPlan, writer, scorers: Scorers, augmenter, bar
) -> int:
    """Each (class, source) group's candidates in plan order until ``n`` pass the filter: the first n
    accepted (resumable: the manifest records rejected candidates too). Returns how many were kept."""
    from imgaug_gen.filtering import QualityFilter, overgenerate_plan, select_accepted

    qf, max_factor = scorers.quality_filter, float(_filter_cfg(cfg)["max_factor"])
    info, written = _generator_info(cfg, gen), 0
    for key, cands in plan.groups.items():
        n = plan.targets.get(key, 0)
        accepted = sum(1 for it in cands if writer.is_kept(it.id))
        pending = [it for it in cands if not writer.has(it.id)]
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
            for k, (it, img) in enumerate(zip(chunk[: last + 1], images)):
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
            log.warning(
                "filter: class %s (%s) has %d of %d images after %d candidates "
                "(raise `filter.max_factor` or relax `filter.tau` / `filter.delta`)",
                gen.class_names[key[0]],
                key[1],
                accepted,
                n,
                len(cands),
            )
    return written


def finish_shards(cfg: DictConfig, plan: ShardPlan) -> bool:
    """A shard marks itself done; True for exactly one shard, the one that merges the manifests."""
    from imgaug_gen.export import finish_shard

    if cfg.num_shards == 1:
        return True
    return finish_shard(cfg.out_dir, int(cfg.shard), int(cfg.num_shards), len(plan.mine))
