"""The sets a classifier trains on: one few-shot subset's real images and classical copies, and each generator
entry's synthetic images (trained with the real train job, written with the real generate job, or read from a
folder), with their memorisation facts; and the transfer classifier's init."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from imgaug_gen.errors import require
from imgaug_gen.jobs.evaluate.classifiers import SyntheticSet, TrainingSet, deciding_recipe, digest
from imgaug_gen.jobs.evaluate.config import SEED_STRIDE
from imgaug_gen.metrics.memorisation import memorisation

log = logging.getLogger(__name__)


def subset_datamodule(cfg: DictConfig, shots: int | None, data_seed: int):
    from imgaug_gen.config import instantiate_checked

    data = OmegaConf.to_container(cfg.data, resolve=True)
    data.update(shots=shots, seed=int(data_seed))
    dm = instantiate_checked(OmegaConf.create(data))
    dm.setup()
    return dm, data


def classical_copies(augmenter, images: TrainingSet, copies: int, seed: int) -> TrainingSet:
    """``copies`` classical copies of every image (copy k of image i seeded (seed, k, i)), with the
    labels and groups of their originals."""
    from imgaug_gen.generators.seeds import per_image_seeds

    x, y, g = images.astuple()
    if augmenter is None or copies == 0 or len(x) == 0:
        return TrainingSet(x[:0], y[:0], g[:0])
    out = [augmenter.apply_batch(x, per_image_seeds(seed + SEED_STRIDE * k, 0, len(x)))[0] for k in range(copies)]
    return TrainingSet(np.concatenate(out), np.tile(y, copies), np.tile(g, copies))


def folder_synthetic(
    folder: Path, num_classes: int, image_shape: tuple, real_ids: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """The folder's synthetic images, labels, groups (index of the edited real image in ``real_ids``,
    -1 for samples) and metrics.json."""
    from imgaug_gen.export import load_folder_images, read_manifest

    records = [r for r in read_manifest(folder) if r.get("source") == "synthetic"]
    require(len(records) > 0, f"`{folder}` holds no synthetic images (manifest source=synthetic).")
    images = load_folder_images(folder, records)
    labels = np.asarray([r["label"] for r in records], dtype=np.int64)
    require(
        images.shape[1:] == tuple(image_shape),
        f"`{folder}`: synthetic images are {images.shape[1:]}, the evaluation data is {tuple(image_shape)} "
        "(HWC); set `data.image_size` / `data.channels` to the generator's.",
    )
    require(labels.max() < num_classes, f"`{folder}`: labels exceed the data's {num_classes} classes.")
    where = {rid: i for i, rid in enumerate(real_ids)}
    groups = np.asarray([where.get(r.get("source_id"), -1) for r in records], dtype=np.int64)
    metrics_path = folder / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    return images, labels, groups, metrics


def run_is_complete(run_dir: Path) -> bool:
    return (run_dir / "generator" / "config.json").is_file() and (run_dir / "evaluation_done.json").is_file()


def train_entry(
    cfg: DictConfig, name: str, entry: dict, shots: int | None, data: dict, run_dir: Path, data_seed: int
) -> dict:
    """Train the entry's generator on this few-shot subset (skipped when already done with the same config)."""
    from imgaug_gen.config import compose_config
    from imgaug_gen.io import atomic_write_json
    from imgaug_gen.jobs.train import train

    overrides = [*entry["train"], f"run_dir={run_dir}", f"seed={int(data_seed)}"]
    tcfg = compose_config("train", overrides)
    # Validation FID during training costs time nobody reads here (evaluate.py scores the written folder):
    # off unless the entry's own overrides name it.
    if tcfg.get("callbacks") and tcfg.callbacks.get("fidelity") and not any("fidelity" in o for o in entry["train"]):
        tcfg.callbacks.fidelity = None
    tdata = dict(data)
    tdata["batch_size"] = tcfg.data.get("batch_size", data.get("batch_size"))
    own = {o.split("=", 1)[0].lstrip("+~") for o in entry["train"]}
    for key in ("unlabeled", "unlabeled_root", "unlabeled_share"):  # the entry's own use of an unlabelled pool
        if f"data.{key}" in own:
            tdata[key] = tcfg.data.get(key)
    pool = tdata.get("unlabeled") is not None or tdata.get("unlabeled_root") is not None
    if pool and "data.unlabeled_share" not in own and not _trains_unlabeled(tcfg):
        tdata["unlabeled_share"] = 0.0  # the pool is for its pseudo-labels and the baseline, not its batches
    OmegaConf.set_struct(tcfg, False)
    tcfg.data = OmegaConf.create(tdata)
    OmegaConf.set_struct(tcfg, True)
    plain = OmegaConf.to_container(tcfg, resolve=True)
    plain.get("metrics", {}).pop("cache_dir", None)  # where features are cached changes no result
    fingerprint = hashlib.sha1(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]
    done = run_dir / "evaluation_done.json"
    if run_is_complete(run_dir) and json.loads(done.read_text()).get("fingerprint") == fingerprint:
        log.info("[%s, shots=%s, data_seed=%s] reusing the trained generator in %s", name, shots, data_seed, run_dir)
        info = json.loads(done.read_text())
        info["reused"] = True
        return info
    # Retraining: the old marker goes first, so a retrain killed part-way (then the config reverted) is
    # never taken for the finished run it replaces.
    done.unlink(missing_ok=True)
    log.info("[%s, shots=%s, data_seed=%s] training: %s", name, shots, data_seed, " ".join(overrides))
    t0 = time.perf_counter()
    metrics, _ = train(tcfg)
    info = {
        "fingerprint": fingerprint,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "trained_at": round(time.time(), 1),  # when it finished (a later job may reuse it)
        "train_metrics": metrics,
        "overrides": overrides,
        "reused": False,
    }
    atomic_write_json(done, info)
    return info


def _trains_unlabeled(tcfg: DictConfig) -> bool:
    """Whether the entry's generator learns from unlabelled images in its batches."""
    from imgaug_gen.jobs.train import model_accepts_unlabeled

    return model_accepts_unlabeled(OmegaConf.to_container(tcfg.model, resolve=True))


def generate_entry(
    name: str, entry: dict, run_dir: Path, out: Path, fresh_run: bool, data_seed: int, metrics: DictConfig | None = None
) -> dict:
    """Write the entry's synthetic folder with generate.py. The evaluation's ``metrics`` block (the scoring of
    each written folder) applies to it, under any ``metrics`` key the entry's own ``generate`` overrides set."""
    from imgaug_gen.config import compose_config
    from imgaug_gen.jobs.generate import generate

    overrides = [
        f"run_dir={run_dir}",
        f"out_dir={out}",
        "include_real=false",
        "progress=false",
        f"seed={int(data_seed)}",
    ] + list(entry.get("generate") or [])
    if fresh_run:
        overrides.append("overwrite=true")  # the generator changed: its old images are stale
    log.info("[%s] generating: %s", name, " ".join(overrides))
    gcfg = compose_config("generate", overrides)
    if metrics is not None:
        _apply_metrics(gcfg, metrics, entry.get("generate") or [])
    t0 = time.perf_counter()
    scores = generate(gcfg)
    scores["generate_seconds"] = round(time.perf_counter() - t0, 1)
    return scores


def _apply_metrics(gcfg: DictConfig, metrics: DictConfig, own: list[str]) -> None:
    """Set the evaluation's ``metrics`` keys on a generate config, except those the entry's overrides name
    (``metrics.KEY=...``), and none if they choose another metrics config (``metrics=NAME``)."""
    named = {str(o).lstrip("+~").split("=", 1)[0] for o in own}
    if "metrics" in named:
        return
    with open_dict(gcfg):
        for key, value in metrics.items():
            if f"metrics.{key}" not in named:
                gcfg.metrics[key] = value


def check_run_data(run_dir: Path, shots: int | None, data: Mapping[str, Any], where: str) -> None:
    """An existing run must have trained on this very subset: same shots, subset seed and splits (a
    generator that saw validation or test images would leak them into the scores)."""
    from imgaug_gen.generators.base import read_run_config

    recorded = (read_run_config(run_dir / "generator").get("data") or {}).get("args") or {}
    require(
        recorded.get("shots") == shots,
        f"`{where}` = {str(run_dir)!r} was trained with data.shots={recorded.get('shots')!r}, but this "
        f"evaluation uses shots={shots!r}: its generator saw other real images. Evaluate it with "
        f"shots=[{recorded.get('shots')}], or use `train:` to train one per shots value.",
    )
    for key in ("seed", "val_fraction", "test_fraction", "split_seed"):
        mine, theirs = (
            data.get(key, 0.0 if key == "val_fraction" else None),
            recorded.get(key, 0.0 if key == "val_fraction" else None),
        )
        require(
            mine == theirs,
            f"`{where}` = {str(run_dir)!r} was trained with data.{key}={theirs!r}, this evaluation's subset has "
            f"{mine!r}: its generator trained on other images (possibly validation or test ones). Set "
            f"`data_seeds=[{recorded.get('seed')}]` / `data.{key}={theirs!r}` to match, or use `train:`.",
        )


def synthetic_sets(
    cfg: DictConfig, entries: dict[str, dict], shots: int | None, data_seed: int, data: dict, root: Path, dm
) -> tuple[dict[str, dict], dict[str, SyntheticSet]]:
    """Per generator entry: its synthetic images for this (shots, subset), trained / written on demand.
    Returns each entry's facts (JSON-able: run, folder, scores, memorisation) and its images."""
    runs: dict[str, tuple[Path, bool]] = {}
    out: dict[str, dict] = {}
    sets: dict[str, SyntheticSet] = {}
    tag = f"shots{shots if shots is not None else 'all'}_d{data_seed}"
    real_x, _ = dm.train_arrays()
    real_ids = [r["id"] for r in dm.train_records()]
    heldout = dm.val_arrays()[0] if len(dm.val_arrays()[0]) else dm.test_arrays()[0]
    for name, e in entries.items():  # trained runs first, so `run_of` can use them
        if e["source"] == "train":
            run_dir = root / "runs" / name / tag
            info = train_entry(cfg, name, e, shots, data, run_dir, data_seed)
            runs[name] = (run_dir, not info["reused"])
            out[name] = {
                "run_dir": str(run_dir),
                "train_seconds": info["train_seconds"],
                "trained_at": info.get("trained_at"),
                "reused_run": info["reused"],
            }
        elif e["source"] == "run_dir":
            run_dir = Path(e["run_dir"]).resolve()
            check_run_data(run_dir, shots, data, f"generators.{name}.run_dir")
            runs[name] = (run_dir, False)
            out[name] = {"run_dir": str(run_dir)}
    for name, e in entries.items():
        info = out.setdefault(name, {})
        if e["source"] == "folder":
            folder = Path(e["folder"]).resolve()
        else:
            run_dir, fresh = runs[e["run_of"]] if e["source"] == "run_of" else runs[name]
            info.setdefault("run_dir", str(run_dir))
            folder = root / "synthetic" / name / tag
            info["generate"] = {
                k: v
                for k, v in generate_entry(name, e, run_dir, folder, fresh, data_seed, cfg.metrics).items()
                if k
                in (
                    "fid",
                    "kid_mean",
                    "kid_std",
                    "precision",
                    "recall",
                    "density",
                    "coverage",
                    "features",
                    "n_synthetic",
                    "generate_seconds",
                    "filter",
                    "mean_confidence",
                )
            }
        images, labels, groups, metrics = folder_synthetic(folder, dm.num_classes, real_x.shape[1:], real_ids)
        sets[name] = SyntheticSet(TrainingSet(images, labels, groups))
        info.update(folder=str(folder), n_synthetic=int(len(images)))
        if "generate" not in info and metrics:
            info["generate"] = {
                k: metrics.get(k) for k in ("fid", "kid_mean", "precision", "recall", "density", "coverage", "features")
            }
        info.update(memorisation(images, real_x, heldout))
    return out, sets


def resolve_init(cfg: DictConfig, init: Any, recipe: dict, root: Path) -> str | None:
    """``classifier.init`` as the path of a saved classifier: given, or (``{classes: [...]}``) trained once
    here with the same recipe on every training image of those classes (never their validation or test
    images), kept in ``OUT/classifier_init/`` and reused by a re-run."""
    if init is None or isinstance(init, str):
        if init is not None:
            require(
                Path(init).is_file(),
                f"`classifier.init` = {init!r} is not a file; give a classifier saved with "
                "imgaug_gen.metrics.downstream.save_classifier, or {classes: [...]}.",
            )
        return init
    from imgaug_gen.config import instantiate_checked
    from imgaug_gen.metrics.downstream import save_classifier, train_and_test

    data = OmegaConf.to_container(cfg.data, resolve=True)
    data.update(classes=list(init["classes"]), shots=None, seed=0)
    base_recipe = {
        **deciding_recipe(recipe, transfer=False),
        **({"steps": int(init["steps"])} if init.get("steps") else {}),
    }
    path = root / "classifier_init" / f"{digest(data, base_recipe)[:16]}.safetensors"
    if path.is_file():
        return str(path)
    dm = instantiate_checked(OmegaConf.create(data))
    dm.setup()
    (x, y), test = dm.train_arrays(), dm.test_arrays()
    log.info("classifier.init: training the recipe on %d images of classes %s", len(y), list(init["classes"]))
    d = train_and_test(x, y, *test, dm.num_classes, 0, return_details=True, return_model=True, **base_recipe)
    log.info("classifier.init: test accuracy on its own classes %.1f %%", 100 * d["accuracy"])
    save_classifier(d["model"], path, **base_recipe)
    return str(path)
