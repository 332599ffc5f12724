"""The downstream evaluation job behind ``python evaluate.py``: does the classifier get better?

For each ``shots`` value (real images per class, drawn once with ``data_seed``), the
fixed-recipe classifier of :mod:`imgaug_gen.metrics.downstream` is trained once per
classifier seed on each training set, and tested on the data's held-out test split (never
used for any training, generator or classifier):

* ``real``                 -- the few-shot real images;
* ``real+classical``       -- plus ``augment.copies_per_image`` classical copies of each (``augment``);
* ``real+<g>``             -- plus the synthetic images of generator entry ``<g>``;
* ``real+<g>+classical``   -- the ``real+classical`` set plus ``<g>``'s synthetic images, and
  ``synthetic_copies`` classical copies of each synthetic image.

A generator entry trains its generator on exactly that few-shot subset with the real
``train.py`` job (``train:`` overrides), or reuses another entry's run (``run_of:``), or an
existing run (``run_dir:``, its recorded shots must match), and then writes its images with the
real ``generate.py`` job (``generate:`` overrides), so what is measured is what a user gets.
An entry ``folder:`` takes the synthetic images of an existing ``generate.py`` output instead.
The Classification Accuracy Score (synthetic images only, tested on real) is reported per entry.

Steps:
1. Check the config (every key, every entry) before any heavy work.
2. Per shots: the real subset, its classical copies.
3. Per generator entry: train (or reuse) -> generate -> read the written folder.
4. Train / test the classifier on every set x seed (results cached in ``OUT/classifier_runs.jsonl``).
5. Report: ``OUT/eval.json``, ``OUT/results.md``, ``OUT/accuracy_vs_shots.png``.

A re-run with the same command reuses finished runs, folders and classifier results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from imgaug_gen.errors import ConfigError, require

log = logging.getLogger(__name__)

__all__ = ["check_evaluate_config", "evaluate", "method_names"]

_ENTRY_SOURCES = ("train", "run_of", "run_dir", "folder")
_ENTRY_KEYS = {"enabled", "generate", "label", *_ENTRY_SOURCES}
_SEED_STRIDE = 1_000_003


def _entries(cfg: DictConfig) -> dict[str, dict]:
    gens = OmegaConf.to_container(cfg.get("generators") or {}, resolve=True)
    require(isinstance(gens, dict), "`generators` must be a mapping {name: {train|run_of|run_dir|folder: ..., "
                                    "generate: [...]}}.")
    out = {}
    for name, e in gens.items():
        if e is None:
            continue
        where = f"generators.{name}"
        require(isinstance(e, dict), f"`{where}` must be a mapping, got {e!r}.")
        unknown = sorted(set(e) - _ENTRY_KEYS)
        require(not unknown, f"`{where}` has unknown key(s) {unknown}; allowed: {sorted(_ENTRY_KEYS)}.")
        if not e.get("enabled", True):
            continue
        given = [k for k in _ENTRY_SOURCES if e.get(k) is not None]
        require(len(given) == 1, f"`{where}` must give exactly one of {list(_ENTRY_SOURCES)}, got {given or 'none'}.")
        for key in ("train", "generate"):
            v = e.get(key)
            require(v is None or (isinstance(v, list) and all(isinstance(s, str) for s in v)),
                    f"`{where}.{key}` must be a list of override strings like ['trainer.max_steps=500'], got {v!r}.")
        require("/" not in str(name) and not str(name).startswith("."),
                f"`{where}`: the entry name is used as a folder name; use letters, digits, '_' or '-'.")
        out[str(name)] = {"source": given[0], **e}
    for name, e in out.items():
        if e["source"] == "run_of":
            ref = e["run_of"]
            require(ref in out and out[ref]["source"] in ("train", "run_dir"),
                    f"`generators.{name}.run_of` = {ref!r} must name an enabled entry with `train:` or `run_dir:` "
                    f"(enabled: {sorted(out)}).")
        if e["source"] in ("run_dir", "folder"):
            p = Path(e[e["source"]])
            require(p.is_dir(), f"`generators.{name}.{e['source']}` = {str(p)!r} is not a folder.")
            if e["source"] == "folder":
                require((p / "manifest.jsonl").is_file() or any(p.glob("manifest.shard*.jsonl")),
                        f"`generators.{name}.folder` = {str(p)!r} holds no manifest.jsonl; give a generate.py out_dir.")
    return out


def _shots_list(cfg: DictConfig) -> list:
    return OmegaConf.to_container(cfg.shots, resolve=True) if OmegaConf.is_list(cfg.shots) else [cfg.shots]


def _wanted_methods(cfg: DictConfig) -> list[str] | None:
    m = cfg.get("methods")
    require(m is None or OmegaConf.is_list(m), f"`methods` = {m!r}; give null (all) or a list of method names.")
    return None if m is None else [str(x) for x in m]


def method_names(generators: list[str]) -> list[str]:
    """The methods, in report order, for these generator entries."""
    names = ["real", "real+classical"]
    for g in generators:
        names += [f"real+{g}", f"real+{g}+classical"]
    return names


def check_evaluate_config(cfg: DictConfig) -> dict[str, dict]:
    """Validate an evaluate config; returns the enabled generator entries."""
    require(cfg.get("out_dir") not in (None, "", "???"), "`out_dir` is required: python evaluate.py out_dir=EVAL_DIR.")
    shots = _shots_list(cfg)
    require(len(shots) > 0 and all(s is None or (isinstance(s, int) and not isinstance(s, bool) and s > 0)
                                   for s in shots),
            f"`shots` = {shots!r}; give a list of positive ints (null = all training images), e.g. shots=[5,10,20].")
    require(len(set(shots)) == len(shots), f"`shots` = {shots!r} repeats a value.")
    seeds = list(cfg.seeds)
    require(len(seeds) > 0 and all(isinstance(s, int) for s in seeds) and len(set(seeds)) == len(seeds),
            f"`seeds` = {seeds!r}; give distinct ints, at least 3 for a mean ± std (e.g. seeds=[0,1,2]).")
    if len(seeds) < 3:
        log.warning("only %d classifier seed(s): the std is not meaningful (use seeds=[0,1,2] or more)", len(seeds))
    require(isinstance(cfg.synthetic_copies, int) and cfg.synthetic_copies >= 0,
            f"`synthetic_copies` = {cfg.synthetic_copies!r}; give an int >= 0.")
    from imgaug_gen.metrics.downstream import _recipe

    _recipe(OmegaConf.to_container(cfg.classifier, resolve=True) or {})
    entries = _entries(cfg)
    bad = sorted(set(_wanted_methods(cfg) or []) - set(method_names(list(entries))))
    require(not bad, f"`methods` names unknown method(s) {bad}; known: {method_names(list(entries))} (null = all).")
    return entries


# -- data ---------------------------------------------------------------------------------------------------------

def _datamodule(cfg: DictConfig, shots: int | None):
    from imgaug_gen.config import instantiate_checked

    data = OmegaConf.to_container(cfg.data, resolve=True)
    data.update(shots=shots, seed=int(cfg.data_seed))
    dm = instantiate_checked(OmegaConf.create(data))
    dm.setup()
    return dm, data


def _copies(augmenter, images: np.ndarray, labels: np.ndarray, copies: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``copies`` classical copies of every image; copy k of image i is seeded (seed, k, i)."""
    from imgaug_gen.generators.base import per_image_seeds

    if augmenter is None or copies == 0 or len(images) == 0:
        return images[:0], labels[:0]
    out = [augmenter.apply_batch(images, per_image_seeds(seed + _SEED_STRIDE * k, 0, len(images)))[0]
           for k in range(copies)]
    return np.concatenate(out), np.tile(labels, copies)


def _folder_synthetic(folder: Path, num_classes: int, image_shape: tuple) -> tuple[np.ndarray, np.ndarray, dict]:
    from imgaug_gen.export import read_manifest
    from imgaug_gen.pipeline import load_folder_images

    records = [r for r in read_manifest(folder) if r.get("source") == "synthetic"]
    require(len(records) > 0, f"`{folder}` holds no synthetic images (manifest source=synthetic).")
    images = load_folder_images(folder, records)
    labels = np.asarray([r["label"] for r in records], dtype=np.int64)
    require(images.shape[1:] == tuple(image_shape),
            f"`{folder}`: synthetic images are {images.shape[1:]}, the evaluation data is {tuple(image_shape)} "
            "(HWC); set `data.image_size` / `data.channels` to the generator's.")
    require(labels.max() < num_classes, f"`{folder}`: labels exceed the data's {num_classes} classes.")
    metrics_path = folder / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    return images, labels, metrics


# -- generators ---------------------------------------------------------------------------------------------------

def _run_is_complete(run_dir: Path) -> bool:
    return (run_dir / "generator" / "config.json").is_file() and (run_dir / "evaluation_done.json").is_file()


def _train_entry(cfg: DictConfig, name: str, entry: dict, shots: int | None, data: dict, run_dir: Path) -> dict:
    """Train the entry's generator on this few-shot subset (skipped when already done with the same config)."""
    from imgaug_gen.config import compose_config
    from imgaug_gen.io import atomic_write_json
    from imgaug_gen.training import train

    overrides = list(entry["train"]) + [f"run_dir={run_dir}", f"seed={int(cfg.data_seed)}"]
    tcfg = compose_config("train", overrides)
    tdata = dict(data)
    tdata["batch_size"] = tcfg.data.get("batch_size", data.get("batch_size"))
    OmegaConf.set_struct(tcfg, False)
    tcfg.data = OmegaConf.create(tdata)
    OmegaConf.set_struct(tcfg, True)
    plain = OmegaConf.to_container(tcfg, resolve=True)
    plain.get("metrics", {}).pop("cache_dir", None)  # where features are cached changes no result
    fingerprint = hashlib.sha1(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]
    done = run_dir / "evaluation_done.json"
    if _run_is_complete(run_dir) and json.loads(done.read_text()).get("fingerprint") == fingerprint:
        log.info("[%s, shots=%s] reusing the trained generator in %s", name, shots, run_dir)
        info = json.loads(done.read_text())
        info["reused"] = True
        return info
    log.info("[%s, shots=%s] training: %s", name, shots, " ".join(overrides))
    t0 = time.perf_counter()
    metrics, _ = train(tcfg)
    info = {"fingerprint": fingerprint, "train_seconds": round(time.perf_counter() - t0, 1),
            "train_metrics": metrics, "overrides": overrides, "reused": False}
    atomic_write_json(done, info)
    return info


def _generate_entry(cfg: DictConfig, name: str, entry: dict, run_dir: Path, out: Path, fresh_run: bool) -> dict:
    from imgaug_gen.config import compose_config
    from imgaug_gen.pipeline import generate

    overrides = [f"run_dir={run_dir}", f"out_dir={out}", "include_real=false", "progress=false",
                 f"seed={int(cfg.data_seed)}"] + list(entry.get("generate") or [])
    if fresh_run:
        overrides.append("overwrite=true")  # the generator changed: its old images are stale
    log.info("[%s] generating: %s", name, " ".join(overrides))
    t0 = time.perf_counter()
    metrics = generate(compose_config("generate", overrides))
    metrics["generate_seconds"] = round(time.perf_counter() - t0, 1)
    return metrics


def _check_run_shots(run_dir: Path, shots: int | None, where: str) -> None:
    from imgaug_gen.generators.base import read_run_config

    recorded = (read_run_config(run_dir / "generator").get("data") or {})
    require(recorded.get("shots") == shots,
            f"`{where}` = {str(run_dir)!r} was trained with data.shots={recorded.get('shots')!r}, but this "
            f"evaluation uses shots={shots!r}: its generator saw other real images. Evaluate it with "
            f"shots=[{recorded.get('shots')}], or use `train:` to train one per shots value.")


def _synthetic_for_shots(cfg: DictConfig, entries: dict[str, dict], shots: int | None, data: dict, root: Path,
                         num_classes: int, image_shape: tuple) -> dict[str, dict]:
    runs: dict[str, tuple[Path, bool]] = {}
    out: dict[str, dict] = {}
    tag = f"shots{shots if shots is not None else 'all'}"
    for name, e in entries.items():  # trained runs first, so `run_of` can use them
        if e["source"] == "train":
            run_dir = root / "runs" / name / tag
            info = _train_entry(cfg, name, e, shots, data, run_dir)
            runs[name] = (run_dir, not info["reused"])
            out[name] = {"run_dir": str(run_dir), "train_seconds": info["train_seconds"], "reused_run": info["reused"]}
        elif e["source"] == "run_dir":
            run_dir = Path(e["run_dir"]).resolve()
            _check_run_shots(run_dir, shots, f"generators.{name}.run_dir")
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
            info["generate"] = {k: v for k, v in _generate_entry(cfg, name, e, run_dir, folder, fresh).items()
                                if k in ("fid", "kid_mean", "kid_std", "precision", "recall", "features",
                                         "n_synthetic", "generate_seconds", "filter", "mean_confidence")}
        images, labels, metrics = _folder_synthetic(folder, num_classes, image_shape)
        info.update(folder=str(folder), images=images, labels=labels, n_synthetic=int(len(images)))
        if "generate" not in info and metrics:
            info["generate"] = {k: metrics.get(k) for k in ("fid", "kid_mean", "precision", "recall", "features")}
    return out


# -- classifier runs ----------------------------------------------------------------------------------------------

class _ResultCache:
    """Classifier accuracies keyed by a hash of (train set bytes, test set, recipe, seed); one JSON line each."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[str, dict] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    self.rows[row["key"]] = row
                except (ValueError, KeyError):
                    continue  # a torn last line from a killed run

    @staticmethod
    def key(images: np.ndarray, labels: np.ndarray, test_key: str, recipe: dict, seed: int) -> str:
        h = hashlib.sha1()
        h.update(np.ascontiguousarray(images).tobytes())
        h.update(np.ascontiguousarray(labels).tobytes())
        h.update(f"{test_key}|{json.dumps(recipe, sort_keys=True, default=str)}|{seed}".encode())
        return h.hexdigest()

    def get(self, key: str) -> dict | None:
        return self.rows.get(key)

    def put(self, row: dict) -> None:
        self.rows[row["key"]] = row
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _run_methods(sets: Mapping[str, tuple[np.ndarray, np.ndarray]], test: tuple[np.ndarray, np.ndarray],
                 num_classes: int, seeds: list[int], recipe: dict, cache: _ResultCache, shots) -> dict[str, dict]:
    from imgaug_gen.metrics.downstream import summarise_accuracies, train_and_test

    test_key = hashlib.sha1(test[0].tobytes() + test[1].tobytes()).hexdigest()
    out = {}
    for name, (images, labels) in sets.items():
        accs, seconds = [], 0.0
        for s in seeds:
            key = cache.key(images, labels, test_key, recipe, s)
            row = cache.get(key)
            if row is None:
                t0 = time.perf_counter()
                acc = float(train_and_test(images, labels, test[0], test[1], num_classes, int(s), **recipe))
                row = {"key": key, "shots": shots, "method": name, "seed": int(s), "accuracy": acc,
                       "seconds": round(time.perf_counter() - t0, 2)}
                cache.put(row)
            accs.append(row["accuracy"])
            seconds += row.get("seconds", 0.0)
        out[name] = {**summarise_accuracies(accs, seeds), "n_train": int(len(images)), "seconds": round(seconds, 1)}
        log.info("shots=%s %-28s %.2f ± %.2f %%", shots, name, 100 * out[name]["mean"], 100 * out[name]["std"])
    return out


# -- the job ------------------------------------------------------------------------------------------------------

def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the downstream evaluation configured by ``conf/evaluate.yaml``; returns the eval.json content."""
    import torch

    from imgaug_gen.augment.classical import build_augmenter
    from imgaug_gen.io import atomic_write_json, atomic_write_text
    from imgaug_gen.metrics.downstream import plot_accuracy_vs_shots

    # 1. Check the config.
    entries = check_evaluate_config(cfg)
    root = Path(cfg.out_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    torch.set_flush_denormal(True)
    recipe = OmegaConf.to_container(cfg.classifier, resolve=True) or {}
    wanted = _wanted_methods(cfg)
    shots_list = _shots_list(cfg)
    seeds = [int(s) for s in cfg.seeds]
    cache = _ResultCache(root / "classifier_runs.jsonl")
    atomic_write_text(root / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    t_start = time.perf_counter()

    results: dict[str, dict] = {}
    generators: dict[str, dict] = {}
    dataset: dict[str, Any] = {}
    plot_x: dict[str, int] = {}
    for shots in shots_list:
        # 2. Real subset and its classical copies.
        dm, data = _datamodule(cfg, shots)
        real_x, real_y = dm.train_arrays()
        test_x, test_y = dm.test_arrays()
        require(len(test_x) > 0, "the data has no test split; set `data.test_fraction` > 0.")
        augmenter = build_augmenter(cfg.augment, real_x.shape[1:])
        aug_x, aug_y = _copies(augmenter, real_x, real_y, int(cfg.augment.copies_per_image), int(cfg.data_seed))
        dataset = {"class_names": list(dm.class_names), "n_test": int(len(test_x)),
                   "image_shape": list(real_x.shape[1:]), "data": {k: v for k, v in data.items() if k != "seed"}}

        # 3. Synthetic sets.
        syn = _synthetic_for_shots(cfg, entries, shots, data, root, dm.num_classes, real_x.shape[1:])
        sets: dict[str, tuple[np.ndarray, np.ndarray]] = {
            "real": (real_x, real_y),
            "real+classical": (np.concatenate([real_x, aug_x]), np.concatenate([real_y, aug_y])),
        }
        for g, info in syn.items():
            sx, sy = info.pop("images"), info.pop("labels")
            sets[f"real+{g}"] = (np.concatenate([real_x, sx]), np.concatenate([real_y, sy]))
            cx, cy = _copies(augmenter, sx, sy, int(cfg.synthetic_copies), int(cfg.data_seed) + 1)
            sets[f"real+{g}+classical"] = (np.concatenate([real_x, aug_x, sx, cx]),
                                           np.concatenate([real_y, aug_y, sy, cy]))
            info["cas"] = _run_methods({f"{g} only": (sx, sy)}, (test_x, test_y), dm.num_classes, seeds, recipe,
                                       cache, shots)[f"{g} only"]
        if wanted:
            sets = {k: v for k, v in sets.items() if k in wanted}

        # 4. Classifier runs.
        results[str(shots)] = _run_methods(sets, (test_x, test_y), dm.num_classes, seeds, recipe, cache, shots)
        generators[str(shots)] = syn
        plot_x[str(shots)] = shots if shots is not None else round(len(real_x) / dm.num_classes)

    # 5. Report.
    out = {
        "results": results,
        "generators": generators,
        "shots": shots_list,
        "seeds": seeds,
        "data_seed": int(cfg.data_seed),
        "dataset": dataset,
        "classifier_recipe": {**_full_recipe(recipe)},
        "augment": OmegaConf.to_container(cfg.augment, resolve=True),
        "synthetic_copies": int(cfg.synthetic_copies),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    md = report_markdown(out)
    atomic_write_text(root / "results.md", md)
    plot_accuracy_vs_shots({plot_x[s]: r for s, r in results.items()},
                           root / "accuracy_vs_shots.png",
                           title=f"fixed-recipe classifier, mean ± std over {len(seeds)} seeds")
    out["files"] = {"eval_json": str(root / "eval.json"), "table": str(root / "results.md"),
                    "chart": str(root / "accuracy_vs_shots.png")}
    atomic_write_json(root / "eval.json", out)
    return out


def _full_recipe(recipe: dict) -> dict:
    from imgaug_gen.metrics.downstream import RECIPE

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in {**RECIPE, **recipe}.items()}


def report_markdown(ev: Mapping[str, Any]) -> str:
    """The markdown report of an eval.json: one summary table (methods x shots) and one table per shots."""
    from imgaug_gen.metrics.downstream import results_table_markdown

    results = ev["results"]
    shots = list(results)
    methods: list[str] = []
    for s in shots:
        methods += [m for m in results[s] if m not in methods]
    lines = [f"Test accuracy (%) of the fixed-recipe classifier, mean ± std over seeds {ev['seeds']}; "
             f"{ev['dataset'].get('n_test', '?')} held-out real test images.", "",
             "| method | " + " | ".join(f"{s} shots" for s in shots) + " |",
             "|---|" + "---:|" * len(shots)]
    for m in methods:
        cells = []
        for s in shots:
            r = results[s].get(m)
            cells.append("—" if r is None else f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    gains = [m for m in methods if m.endswith("+classical") and m != "real+classical"]
    if gains and all("real+classical" in results[s] for s in shots):
        lines += ["", "Gain of synthetic data over classical augmentation alone (accuracy points, "
                  "`real+<g>+classical` − `real+classical`, mean over seeds):", "",
                  "| method | " + " | ".join(f"{s} shots" for s in shots) + " |", "|---|" + "---:|" * len(shots)]
        for m in gains:
            cells = ["—" if m not in results[s] else
                     f"{100 * (results[s][m]['mean'] - results[s]['real+classical']['mean']):+.1f}" for s in shots]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for s in shots:
        lines += ["", f"### {s} shots per class", "", results_table_markdown(results[s]).rstrip()]
        gens = ev.get("generators", {}).get(s, {})
        if gens:
            lines += ["", "| generator | synthetic images | FID | KID | precision | recall | CAS (%) |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
            for g, info in gens.items():
                gm = info.get("generate") or {}
                cas = info.get("cas") or {}
                fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
                lines.append(f"| {g} | {info.get('n_synthetic', '—')} | {fmt(gm.get('fid'), '.2f')} | "
                             f"{fmt(gm.get('kid_mean'), '.4f')} | {fmt(gm.get('precision'), '.3f')} | "
                             f"{fmt(gm.get('recall'), '.3f')} | "
                             f"{fmt(100 * cas['mean'] if cas else None, '.1f')} |")
    return "\n".join(lines) + "\n"
