"""The downstream evaluation job behind ``python evaluate.py``: does the classifier get better?

For each ``shots`` value and each few-shot subset (``data_seeds``: one draw of ``shots`` real
images per class each), the fixed-recipe classifier of :mod:`imgaug_gen.metrics.downstream` is
trained once per classifier seed on each method's training set and scored on two fixed splits of
the data that no generator or classifier ever trains on: the **validation** split (recipes are
chosen there) and the **test** split (reported):

* ``real``                   -- the few-shot real images;
* ``real+classical``         -- plus ``augment.copies_per_image`` classical copies of each (``augment``);
* ``real+<g>+classical@<P>`` -- the ``real+classical`` set plus generator entry ``<g>``'s synthetic
  images (and ``synthetic_copies`` classical copies of each), consumed under policy ``<P>``
  (``policies``: concat / replace / weighted, soft targets, distillation; see
  :mod:`imgaug_gen.data.mixed` -- the same sampler and loss a user trains with). The teacher of a
  distilling policy is the ``real+classical`` classifier of the same subset and seed.

Every generator entry trains its generator on exactly that subset with the real ``train.py`` job
(``train:``), reuses another entry's run (``run_of:``) or an existing run (``run_dir:``), and writes
its images with the real ``generate.py`` job; ``folder:`` takes an existing output instead.

Statistics: every method's gain over ``real+classical`` is paired per (subset, seed) with a 95 %
cluster-bootstrap interval (:mod:`imgaug_gen.metrics.stats`). With ``selection: val`` the
**headline** is the generative method with the best mean validation gain over all shots values,
tested once on the test split; the full grid is reported beside it.

Steps:
1. Check the config (every key, every entry, every policy) before any heavy work.
2. Per shots x subset: the real subset, its classical copies, the validation and test splits.
3. Per generator entry: train (or reuse) -> generate -> read the written folder.
4. Train / score the classifier on every set x policy x seed (cached in ``OUT/classifier_runs.jsonl``).
5. Statistics, selection and report: ``OUT/eval.json``, ``OUT/results.md``, ``OUT/accuracy_vs_shots.png``.

A re-run with the same command reuses finished runs, folders and classifier results.
"""

from __future__ import annotations

import contextlib
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
from imgaug_gen.io import FolderLock, overlaps
from imgaug_gen.runtime import prepare_process

log = logging.getLogger(__name__)

__all__ = ["check_evaluate_config", "evaluate", "method_names"]

_ENTRY_SOURCES = ("train", "run_of", "run_dir", "folder")
_SEED_STRIDE = 1_000_003
BASELINE = "real+classical"
#: with `classifier.init`: the same two sets on the transferred classifier
TRANSFER_BASELINE = "transfer+classical"


def _entries(cfg: DictConfig, policies: Mapping[str, Any]) -> dict[str, dict]:
    gens = OmegaConf.to_container(cfg.get("generators") or {}, resolve=True)  # typed by schemas.Evaluate
    out = {}
    for name, e in gens.items():
        if e is None or not e.get("enabled", True):
            continue
        where = f"generators.{name}"
        given = [k for k in _ENTRY_SOURCES if e.get(k) is not None]
        require("/" not in str(name) and "@" not in str(name) and not str(name).startswith("."),
                f"`{where}`: the entry name is used as a folder name; use letters, digits, '_' or '-'.")
        pols = e.get("policies")
        require(pols is None or (isinstance(pols, list) and len(pols) > 0 and all(p in policies for p in pols)),
                f"`{where}.policies` = {pols!r}; give null (every entry of `policies`) or a list of names from "
                f"{sorted(policies)}.")
        out[str(name)] = {"source": given[0], **e, "policies": list(pols or policies)}
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


def _policies(cfg: DictConfig) -> dict[str, Any]:
    from imgaug_gen.data.mixed import MixPolicy

    raw = OmegaConf.to_container(cfg.get("policies") or {}, resolve=True)
    require(isinstance(raw, dict) and len(raw) > 0,
            f"`policies` = {raw!r}; give a mapping {{name: {{name: concat|replace|weighted, p: ...}}}} with at "
            "least one entry.")
    out = {}
    for name, p in raw.items():
        require("@" not in str(name) and "/" not in str(name),
                f"`policies.{name}`: the name is used in method names; use letters, digits, '_', '.' or '-'.")
        out[str(name)] = MixPolicy.from_config(p, key=f"policies.{name}")
    return out


def _shots_list(cfg: DictConfig) -> list:
    """``shots`` as a list (checked by the schema: distinct positive ints or null = all)."""
    return list(OmegaConf.to_container(cfg.shots, resolve=True))


def _wanted_methods(cfg: DictConfig) -> list[str] | None:
    m = cfg.get("methods")
    require(m is None or OmegaConf.is_list(m), f"`methods` = {m!r}; give null (all) or a list of method names.")
    return None if m is None else [str(x) for x in m]


def method_name(generator: str, policy: str) -> str:
    return f"real+{generator}+classical@{policy}"


def method_names(entries: Mapping[str, Mapping], with_init: bool = False) -> list[str]:
    """The methods, in report order, for these generator entries (``{name: {"policies": [...]}}``)."""
    names = baseline_methods(with_init)
    for g, e in entries.items():
        names += [method_name(g, p) for p in e["policies"]]
    return names


def check_evaluate_config(cfg: DictConfig) -> tuple[dict[str, dict], dict[str, Any]]:
    """Validate an evaluate config (the schema :class:`imgaug_gen.schemas.Evaluate`, then the rules that
    need the policies, the filesystem or the recipe); returns the enabled generator entries and the policies."""
    from imgaug_gen.schemas import Evaluate, validate

    require(cfg.get("out_dir") not in (None, "", "???"), "`out_dir` is required: python evaluate.py out_dir=EVAL_DIR.")
    validate(cfg, Evaluate, "evaluate")
    root = (cfg.get("data") or {}).get("root")
    if root not in (None, "", "???"):
        root = str(Path(str(root)).expanduser())
        require(not (Path(root).exists() and overlaps(cfg.out_dir, root)),
                f"`out_dir` = {str(cfg.out_dir)!r} and `data.root` = {root!r} overlap (one is, contains or lies inside "
                "the other): the evaluation's runs and folders would land among your images. Choose an `out_dir` "
                "outside `data.root`.")
    if len(cfg.seeds) < 3:
        log.warning("only %d classifier seed(s): the intervals are not meaningful (use seeds=[0,1,2,3,4])", len(cfg.seeds))
    if cfg.selection == "val":
        vf = cfg.data.get("val_fraction", 0.0)
        require(isinstance(vf, (int, float)) and vf > 0,
                f"`selection=val` needs a validation split, but `data.val_fraction` = {vf!r}. Set "
                "`data.val_fraction=0.2` (held out per class, never trained on), or `selection=none` to report the "
                "grid without choosing. A folder too small to spare a validation split leaves only cross-validation "
                "on the few-shot images, which evaluate.py does not do: its generators train on those images.")
    from imgaug_gen.metrics.downstream import check_recipe

    check_recipe({k: v for k, v in (OmegaConf.to_container(cfg.classifier, resolve=True) or {}).items() if k != "init"},
                 key="classifier")
    policies = _policies(cfg)
    entries = _entries(cfg, policies)
    init = (cfg.classifier or {}).get("init")
    require(init is None or isinstance(init, str) or (OmegaConf.is_dict(init) and set(init) <= {"classes", "steps"}
                                                      and init.get("classes")),
            f"`classifier.init` = {init!r}; give null, the path of a saved classifier, or {{classes: [...]}} (the "
            "data's other classes, on which evaluate.py trains the init once).")
    if OmegaConf.is_dict(init):
        mine = (cfg.data or {}).get("classes")
        overlap = sorted(set(map(str, init.classes)) & set(map(str, mine or [])))
        require(mine is not None and not overlap,
                f"`classifier.init.classes` = {list(init.classes)} and `data.classes` = {mine}: the init must learn "
                "from other classes than the evaluated ones (set `data.classes` to the evaluated classes, disjoint "
                "from the init's).")
    known = method_names(entries, init is not None)
    bad = sorted(set(_wanted_methods(cfg) or []) - set(known))
    require(not bad, f"`methods` names unknown method(s) {bad}; known: {known} (null = all).")
    return entries, policies


# -- data ---------------------------------------------------------------------------------------------------------

def _datamodule(cfg: DictConfig, shots: int | None, data_seed: int):
    from imgaug_gen.config import instantiate_checked

    data = OmegaConf.to_container(cfg.data, resolve=True)
    data.update(shots=shots, seed=int(data_seed))
    dm = instantiate_checked(OmegaConf.create(data))
    dm.setup()
    return dm, data


def _copies(augmenter, images: np.ndarray, labels: np.ndarray, groups: np.ndarray, copies: int,
            seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``copies`` classical copies of every image (copy k of image i seeded (seed, k, i)), with the
    labels and groups of their originals."""
    from imgaug_gen.generators.base import per_image_seeds

    if augmenter is None or copies == 0 or len(images) == 0:
        return images[:0], labels[:0], groups[:0]
    out = [augmenter.apply_batch(images, per_image_seeds(seed + _SEED_STRIDE * k, 0, len(images)))[0]
           for k in range(copies)]
    return np.concatenate(out), np.tile(labels, copies), np.tile(groups, copies)


def _folder_synthetic(folder: Path, num_classes: int, image_shape: tuple,
                      real_ids: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """The folder's synthetic images, labels, groups (index of the edited real image in ``real_ids``,
    -1 for samples) and metrics.json."""
    from imgaug_gen.export import load_folder_images, read_manifest

    records = [r for r in read_manifest(folder) if r.get("source") == "synthetic"]
    require(len(records) > 0, f"`{folder}` holds no synthetic images (manifest source=synthetic).")
    images = load_folder_images(folder, records)
    labels = np.asarray([r["label"] for r in records], dtype=np.int64)
    require(images.shape[1:] == tuple(image_shape),
            f"`{folder}`: synthetic images are {images.shape[1:]}, the evaluation data is {tuple(image_shape)} "
            "(HWC); set `data.image_size` / `data.channels` to the generator's.")
    require(labels.max() < num_classes, f"`{folder}`: labels exceed the data's {num_classes} classes.")
    where = {rid: i for i, rid in enumerate(real_ids)}
    groups = np.asarray([where.get(r.get("source_id"), -1) for r in records], dtype=np.int64)
    metrics_path = folder / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    return images, labels, groups, metrics


# -- generators ---------------------------------------------------------------------------------------------------

def _run_is_complete(run_dir: Path) -> bool:
    return (run_dir / "generator" / "config.json").is_file() and (run_dir / "evaluation_done.json").is_file()


def _train_entry(cfg: DictConfig, name: str, entry: dict, shots: int | None, data: dict, run_dir: Path,
                 data_seed: int) -> dict:
    """Train the entry's generator on this few-shot subset (skipped when already done with the same config)."""
    from imgaug_gen.config import compose_config
    from imgaug_gen.io import atomic_write_json
    from imgaug_gen.training import train

    overrides = [*entry["train"], f"run_dir={run_dir}", f"seed={int(data_seed)}"]
    tcfg = compose_config("train", overrides)
    # Validation FID during training costs time nobody reads here (evaluate.py scores the written folder):
    # off unless the entry's own overrides name it.
    if tcfg.get("callbacks") and tcfg.callbacks.get("fidelity") and not any("fidelity" in o for o in entry["train"]):
        tcfg.callbacks.fidelity = None
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
    info = {"fingerprint": fingerprint, "train_seconds": round(time.perf_counter() - t0, 1),
            "train_metrics": metrics, "overrides": overrides, "reused": False}
    atomic_write_json(done, info)
    return info


def _generate_entry(name: str, entry: dict, run_dir: Path, out: Path, fresh_run: bool, data_seed: int) -> dict:
    from imgaug_gen.config import compose_config
    from imgaug_gen.pipeline import generate

    overrides = [f"run_dir={run_dir}", f"out_dir={out}", "include_real=false", "progress=false",
                 f"seed={int(data_seed)}"] + list(entry.get("generate") or [])
    if fresh_run:
        overrides.append("overwrite=true")  # the generator changed: its old images are stale
    log.info("[%s] generating: %s", name, " ".join(overrides))
    t0 = time.perf_counter()
    metrics = generate(compose_config("generate", overrides))
    metrics["generate_seconds"] = round(time.perf_counter() - t0, 1)
    return metrics


def _check_run_data(run_dir: Path, shots: int | None, data: Mapping[str, Any], where: str) -> None:
    """An existing run must have trained on this very subset: same shots, subset seed and splits (a
    generator that saw validation or test images would leak them into the scores)."""
    from imgaug_gen.generators.base import read_run_config

    recorded = (read_run_config(run_dir / "generator").get("data") or {}).get("args") or {}
    require(recorded.get("shots") == shots,
            f"`{where}` = {str(run_dir)!r} was trained with data.shots={recorded.get('shots')!r}, but this "
            f"evaluation uses shots={shots!r}: its generator saw other real images. Evaluate it with "
            f"shots=[{recorded.get('shots')}], or use `train:` to train one per shots value.")
    for key in ("seed", "val_fraction", "test_fraction", "split_seed"):
        mine, theirs = data.get(key, 0.0 if key == "val_fraction" else None), recorded.get(key, 0.0 if key ==
                                                                                          "val_fraction" else None)
        require(mine == theirs,
                f"`{where}` = {str(run_dir)!r} was trained with data.{key}={theirs!r}, this evaluation's subset has "
                f"{mine!r}: its generator trained on other images (possibly validation or test ones). Set "
                f"`data_seeds=[{recorded.get('seed')}]` / `data.{key}={theirs!r}` to match, or use `train:`.")


def _synthetic_sets(cfg: DictConfig, entries: dict[str, dict], shots: int | None, data_seed: int, data: dict,
                    root: Path, dm) -> dict[str, dict]:
    """Per generator entry: its synthetic images for this (shots, subset), trained / written on demand."""
    runs: dict[str, tuple[Path, bool]] = {}
    out: dict[str, dict] = {}
    tag = f"shots{shots if shots is not None else 'all'}_d{data_seed}"
    real_x, _ = dm.train_arrays()
    real_ids = [r["id"] for r in dm.train_records()]
    heldout = dm.val_arrays()[0] if len(dm.val_arrays()[0]) else dm.test_arrays()[0]
    for name, e in entries.items():  # trained runs first, so `run_of` can use them
        if e["source"] == "train":
            run_dir = root / "runs" / name / tag
            info = _train_entry(cfg, name, e, shots, data, run_dir, data_seed)
            runs[name] = (run_dir, not info["reused"])
            out[name] = {"run_dir": str(run_dir), "train_seconds": info["train_seconds"], "reused_run": info["reused"]}
        elif e["source"] == "run_dir":
            run_dir = Path(e["run_dir"]).resolve()
            _check_run_data(run_dir, shots, data, f"generators.{name}.run_dir")
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
            info["generate"] = {k: v for k, v in _generate_entry(name, e, run_dir, folder, fresh, data_seed).items()
                                if k in ("fid", "kid_mean", "kid_std", "precision", "recall", "density", "coverage", "features",
                                         "n_synthetic", "generate_seconds", "filter", "mean_confidence")}
        images, labels, groups, metrics = _folder_synthetic(folder, dm.num_classes, real_x.shape[1:], real_ids)
        info.update(folder=str(folder), images=images, labels=labels, groups=groups, n_synthetic=int(len(images)))
        if "generate" not in info and metrics:
            info["generate"] = {k: metrics.get(k) for k in ("fid", "kid_mean", "precision", "recall", "density",
                                                              "coverage", "features")}
        info.update(_memorisation(images, real_x, heldout))
    return out


#: a synthetic image is a near-copy when it is nearer to a training image than all but this share of fresh
#: real images are: by construction, held-out real images have a copy rate of this share
COPY_QUANTILE = 0.05


def _memorisation(synthetic: np.ndarray, real: np.ndarray, heldout: np.ndarray) -> dict[str, float | None]:
    """Near-copies of the training images among the synthetic ones (pixel L2, the quality filter's
    nearest-real distance):

    * ``memorisation``: share nearer to a training image than the training images are to each other
      (the median of their leave-one-out nearest-neighbour distances). With 5-10 images per class
      the training images are far apart and almost anything scores near 1.
    * ``copy_rate``: share nearer to a training image than the 5 % quantile of *held-out real* images'
      nearest-training distances (validation images; test images when there is no validation split:
      a diagnostic, never used to choose). Fresh real data scores 0.05 by construction; a generator
      that adds new images of the class scores near it, one that copies scores well above.
    """
    from imgaug_gen.filtering import nearest_real_distance

    def flat(x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), -1).astype(np.float32)

    r = flat(real)
    d_real, _ = nearest_real_distance(r, r, metric="l2", exclude_self=True)
    d_syn, _ = nearest_real_distance(flat(synthetic), r, metric="l2")
    out: dict[str, float | None] = {"memorisation": float(np.mean(d_syn < np.median(d_real))), "copy_rate": None}
    if len(heldout):
        d_fresh, _ = nearest_real_distance(flat(heldout), r, metric="l2")
        out["copy_rate"] = float(np.mean(d_syn < np.quantile(d_fresh, COPY_QUANTILE)))
    return out


# -- classifier runs ----------------------------------------------------------------------------------------------

def _digest(*parts: Any) -> str:
    """sha1 of arrays (their bytes) and JSON-able values, in order."""
    h = hashlib.sha1()
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(np.ascontiguousarray(p).tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"|")
    return h.hexdigest()


class _ResultCache:
    """Classifier results keyed by a hash of everything that decides them; one JSON line each."""

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

    def get(self, key: str) -> dict | None:
        return self.rows.get(key)

    def put(self, row: dict) -> None:
        self.rows[row["key"]] = row
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


class _Classifiers:
    """Trains (or reads back) the fixed-recipe classifier of one (shots, subset): every method, every seed,
    scored on the test and validation splits. With ``init`` (``classifier.init``) the ``transfer`` methods
    and every generative method start from that classifier's features; ``real`` / ``real+classical`` stay
    from scratch. The teacher of a distilling policy is the same seed's ``transfer+classical`` classifier
    (``real+classical`` without an init), (re)trained deterministically only when a distilling run is not
    cached."""

    def __init__(self, cache: _ResultCache, recipe: dict, num_classes: int, test, val, shots, data_seed: int,
                 init: str | None = None):
        from imgaug_gen.io import tree_hash

        self.cache, self.recipe, self.num_classes = cache, recipe, num_classes
        self.test, self.val, self.shots, self.data_seed = test, val, shots, int(data_seed)
        self.split_key = _digest(test[0], test[1], val[0], val[1])
        self.init, self.init_key = init, (tree_hash(init) if init else None)
        self.teacher = TRANSFER_BASELINE if init else BASELINE
        self._teachers: dict[int, Any] = {}

    def run(self, method: str, seed: int, real: tuple, synthetic: tuple | None = None, policy=None,
            keep_model: bool = False, transfer: bool = False) -> dict:
        from imgaug_gen.metrics.downstream import predict_logits, train_and_test

        transfer = transfer and self.init is not None
        pol = None if policy is None else policy.to_dict()
        key = _digest(*real, *(synthetic or ()), pol, self.recipe, int(seed), self.split_key,
                      *([self.init_key] if transfer else []))
        row = self.cache.get(key)
        if row is not None and not (keep_model and seed not in self._teachers):
            return row
        kwargs: dict[str, Any] = {"init": self.init} if transfer else {}
        if synthetic is not None:
            kwargs.update(synthetic=synthetic, policy=policy, train_groups=real[2])
            if policy.distill > 0:
                if seed not in self._teachers:  # `real` is the (+classical) set the teacher learns from
                    self.run(self.teacher, seed, real, keep_model=True, transfer=True)
                kwargs["teacher_logits"] = predict_logits(self._teachers[seed], synthetic[0],
                                                          self.recipe.get("input_size"))
        t0 = time.perf_counter()
        d = train_and_test(real[0], real[1], self.test[0], self.test[1], self.num_classes, int(seed),
                           eval_sets={"val": self.val} if len(self.val[0]) else None, return_details=True,
                           return_model=keep_model, **kwargs, **self.recipe)
        if keep_model:
            self._teachers[seed] = d["model"]
        if row is None:
            row = {"key": key, "shots": self.shots, "data_seed": self.data_seed, "method": method, "seed": int(seed),
                   "accuracy": d["accuracy"], "val_accuracy": d["eval"].get("val"),
                   "n_train": d["n_train"], "seconds": round(time.perf_counter() - t0, 2)}
            self.cache.put(row)
        return row


def _runs_for_subset(clf: _Classifiers, seeds: list[int], real: tuple, classical: tuple,
                     syn: Mapping[str, dict], entries: Mapping[str, dict], policies: Mapping[str, Any],
                     wanted: list[str] | None, cas_seeds: int) -> list[dict]:
    """Every (method, seed) row of one (shots, subset), CAS rows included."""
    rows = []

    def want(m: str) -> bool:
        return wanted is None or m in wanted

    distills = any(policies[p].distill > 0 for e in entries.values() for p in e["policies"])
    for seed in seeds:
        for m, data, transfer in (("real", real, False), (BASELINE, classical, False),
                                  *((("transfer", real, True), (TRANSFER_BASELINE, classical, True)) if clf.init else ())):
            if want(m) or m == clf.teacher and distills:
                rows.append(clf.run(m, seed, data, transfer=transfer))
        for g, info in syn.items():
            for pname in entries[g]["policies"]:
                m = method_name(g, pname)
                if want(m):
                    rows.append({**clf.run(m, seed, classical, info["mixed"], policies[pname], transfer=True),
                                 "method": m})
    for g, info in syn.items():
        for seed in seeds[:cas_seeds]:
            x, y = info["images"], info["labels"]
            rows.append({**clf.run(f"{g} only", seed, (x, y, np.arange(len(y)))), "method": f"cas:{g}"})
    return rows


# -- statistics and selection -------------------------------------------------------------------------------------

def baseline_methods(with_init: bool) -> list[str]:
    """The non-generative recipes a gain is measured against (the best on validation is the baseline)."""
    return ["real", BASELINE, *(("transfer", TRANSFER_BASELINE) if with_init else ())]


def choose_baseline(by_method: Mapping[str, Mapping[tuple, dict]], with_init: bool) -> dict:
    """The baseline of one shots value: the non-generative recipe with the best mean validation accuracy
    (without a validation split: ``transfer+classical`` with an init, else ``real+classical``)."""
    cands = [m for m in baseline_methods(with_init) if m in by_method]
    fixed = TRANSFER_BASELINE if with_init and TRANSFER_BASELINE in by_method else BASELINE
    val = {m: [r.get("val_accuracy") for r in by_method[m].values()] for m in cands}
    if not cands or any(v is None for vs in val.values() for v in vs):
        return {"method": fixed, "criterion": "fixed (no validation split)"}
    means = {m: float(np.mean(v)) for m, v in val.items()}
    best = max(cands, key=lambda m: means[m])  # first of equals: the simpler recipe
    return {"method": best, "criterion": "best mean validation accuracy of the non-generative recipes",
            "val_means": means}


def _summarise(rows: list[dict], seeds: list[int], with_init: bool = False) -> tuple[dict[str, dict], dict]:
    """Per method: test / validation accuracies per (subset, seed), mean ± std, and the paired gain
    over the chosen baseline (:func:`choose_baseline`) with its 95 % interval (test and validation).
    Returns the summaries and the baseline choice."""
    from imgaug_gen.metrics.stats import paired_gain

    by_method: dict[str, dict[tuple, dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], {})[(r["data_seed"], r["seed"])] = r
    out: dict[str, dict] = {}
    choice = choose_baseline(by_method, with_init)
    baseline = choice["method"]
    base = by_method.get(baseline, {})
    for m, runs in by_method.items():
        pairs = sorted(runs)
        test = [runs[k]["accuracy"] for k in pairs]
        val = [runs[k]["val_accuracy"] for k in pairs if runs[k].get("val_accuracy") is not None]
        res = {"mean": float(np.mean(test)), "std": float(np.std(test, ddof=1)) if len(test) > 1 else 0.0,
               "accs": test, "pairs": [list(k) for k in pairs], "seeds": [k[1] for k in pairs],
               "n_train": runs[pairs[0]]["n_train"], "seconds": round(sum(r.get("seconds", 0) for r in runs.values()), 1)}
        if len(val) == len(test):
            res["val_accs"] = val
            res["val_mean"] = float(np.mean(val))
        res["ci95"] = [paired_gain({k: runs[k]["accuracy"] for k in pairs}, {k: 0.0 for k in pairs})[b]
                       for b in ("lo", "hi")]
        if base and m != baseline and not m.startswith("cas:"):
            res["gain"] = paired_gain({k: r["accuracy"] for k, r in runs.items()},
                                      {k: r["accuracy"] for k, r in base.items()})
            if "val_accs" in res:
                res["val_gain"] = paired_gain({k: r["val_accuracy"] for k, r in runs.items()},
                                              {k: r["val_accuracy"] for k, r in base.items()})
        out[m] = res
    return out, choice


def _select(results: Mapping[str, Mapping[str, dict]]) -> dict | None:
    """The generative method with the best mean validation gain over each shots value's chosen baseline,
    averaged over shots."""
    shots = list(results)
    cands = [m for m in results[shots[0]] if "@" in m and all("val_gain" in results[s].get(m, {}) for s in shots)]
    if not cands:
        return None
    score = {m: float(np.mean([results[s][m]["val_gain"]["mean"] for s in shots])) for m in cands}
    best = max(cands, key=lambda m: score[m])  # first of equals: the config's order
    return {"method": best, "criterion": "mean validation gain over the chosen baseline, averaged over shots",
            "val_gain": score[best], "ranking": sorted(score.items(), key=lambda kv: -kv[1])}


# -- the job ------------------------------------------------------------------------------------------------------

def _evaluate_subset(cfg: DictConfig, entries: dict, policies: dict, shots, data_seed: int, root: Path,
                     cache: "_ResultCache", recipe: dict, wanted, seeds: list[int],
                     init: str | None = None) -> tuple[list, dict, dict]:
    """One (shots, subset): its real and classical sets, its generators' synthetic sets, every classifier
    run. Returns the result rows, the generator facts and the dataset facts."""
    from imgaug_gen.augment.classical import build_augmenter

    # 2. Real subset, its classical copies, the fixed validation and test splits.
    dm, data = _datamodule(cfg, shots, data_seed)
    real_x, real_y = dm.train_arrays()
    test, val = dm.test_arrays(), dm.val_arrays()
    require(len(test[0]) > 0, "the data has no test split; set `data.test_fraction` > 0.")
    augmenter = build_augmenter(cfg.augment, real_x.shape[1:])
    groups = np.arange(len(real_y))
    ax, ay, ag = _copies(augmenter, real_x, real_y, groups, int(cfg.augment.copies_per_image), data_seed)
    real = (real_x, real_y, groups)
    classical = (np.concatenate([real_x, ax]), np.concatenate([real_y, ay]), np.concatenate([groups, ag]))
    dataset = {"class_names": list(dm.class_names), "n_test": int(len(test[0])), "n_val": int(len(val[0])),
               "image_shape": list(real_x.shape[1:]), "data": {k: v for k, v in data.items() if k != "seed"}}
    # 3. Synthetic sets (+ classical copies of each synthetic image, same groups).
    syn = _synthetic_sets(cfg, entries, shots, data_seed, data, root, dm)
    for info in syn.values():
        sx, sy, sg = info["images"], info["labels"], info["groups"]
        cx, cy, cg = _copies(augmenter, sx, sy, sg, int(cfg.synthetic_copies), data_seed + 1)
        info["mixed"] = (np.concatenate([sx, cx]), np.concatenate([sy, cy]), np.concatenate([sg, cg]))
    # 4. Classifier runs.
    clf = _Classifiers(cache, recipe, dm.num_classes, test, val, shots, data_seed, init)
    rows = _runs_for_subset(clf, seeds, real, classical, syn, entries, policies, wanted, int(cfg.cas_seeds))
    for info in syn.values():
        for k in ("images", "labels", "groups", "mixed"):
            info.pop(k)
    return rows, syn, dataset


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the downstream evaluation configured by ``conf/evaluate.yaml``; returns the eval.json content."""
    # 1. Check the config; claim every (shots, subset) unit of the output folder this job computes, so a
    # second copy of the job stops at once, while jobs on disjoint units (a benchmark's parallel workers,
    # a cluster array over shots) share one folder.
    entries, policies = check_evaluate_config(cfg)
    root = Path(cfg.out_dir).resolve()
    with contextlib.ExitStack() as stack:
        for shots in _shots_list(cfg):
            for data_seed in cfg.data_seeds:
                name = f"evaluate.shots{shots if shots is not None else 'all'}_d{int(data_seed)}.lock"
                stack.enter_context(FolderLock(root, name, "evaluate.py job"))
        return _evaluate(cfg, entries, policies, root)


def _evaluate(cfg: DictConfig, entries: dict, policies: dict, root: Path) -> dict[str, Any]:
    from imgaug_gen.io import atomic_write_json, atomic_write_text
    from imgaug_gen.metrics.downstream import plot_accuracy_vs_shots

    prepare_process()
    recipe = OmegaConf.to_container(cfg.classifier, resolve=True) or {}
    init = _resolve_init(cfg, recipe.pop("init", None), recipe, root)
    wanted = _wanted_methods(cfg)
    shots_list = _shots_list(cfg)
    seeds = [int(s) for s in cfg.seeds]
    data_seeds = [int(s) for s in cfg.data_seeds]
    cache = _ResultCache(root / "classifier_runs.jsonl")
    atomic_write_text(root / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    t_start = time.perf_counter()

    results: dict[str, dict] = {}
    baselines: dict[str, dict] = {}
    generators: dict[str, dict] = {}
    dataset: dict[str, Any] = {}
    plot_x: dict[str, int] = {}
    for shots in shots_list:
        rows: list[dict] = []
        generators[str(shots)] = {}
        for data_seed in data_seeds:
            subset_rows, subset_gens, dataset = _evaluate_subset(cfg, entries, policies, shots, data_seed, root,
                                                                 cache, recipe, wanted, seeds, init)
            rows += subset_rows
            for g, info in subset_gens.items():
                generators[str(shots)].setdefault(g, {})[str(data_seed)] = info
            n_classes = len(dataset["class_names"])

        # 5. Statistics per shots.
        summary, baselines[str(shots)] = _summarise(rows, seeds, init is not None)
        for g, per_subset in generators[str(shots)].items():
            cas = summary.pop(f"cas:{g}", None)
            generators[str(shots)][g] = _generator_summary(per_subset, cas)
        names = method_names(entries, init is not None)
        if wanted:
            summary = {k: summary[k] for k in names if (k in wanted or k == baselines[str(shots)]["method"])
                       and k in summary}
        results[str(shots)] = {k: summary[k] for k in names if k in summary}
        for m, r in results[str(shots)].items():
            g = r.get("gain")
            log.info("shots=%s %-44s test %.2f ± %.2f %%%s", shots, m, 100 * r["mean"], 100 * r["std"],
                     "" if g is None else f"  gain {100 * g['mean']:+.2f} [{100 * g['lo']:+.2f}, {100 * g['hi']:+.2f}]")
        plot_x[str(shots)] = shots if shots is not None else round(dataset.get("n_train", 0) / n_classes)

    selected = _select(results) if cfg.selection == "val" else None
    out = {
        "results": results,
        "baselines": baselines,
        "selected": selected,
        "classifier_init": init,
        "generators": generators,
        "shots": shots_list,
        "seeds": seeds,
        "data_seeds": data_seeds,
        "policies": {k: v.to_dict() for k, v in policies.items()},
        "dataset": dataset,
        "classifier_recipe": {**_full_recipe(recipe)},
        "augment": OmegaConf.to_container(cfg.augment, resolve=True),
        "synthetic_copies": int(cfg.synthetic_copies),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    md = report_markdown(out)
    atomic_write_text(root / "results.md", md)
    shown = _chart_methods(results, selected, entries)
    plot_accuracy_vs_shots({plot_x[s]: {m: r[m] for m in shown if m in r} for s, r in results.items()},
                           root / "accuracy_vs_shots.png",
                           title=f"{len(data_seeds)} subsets x {len(seeds)} seeds, 95 % intervals")
    out["files"] = {"eval_json": str(root / "eval.json"), "table": str(root / "results.md"),
                    "chart": str(root / "accuracy_vs_shots.png")}
    atomic_write_json(root / "eval.json", out)
    return out


def _resolve_init(cfg: DictConfig, init: Any, recipe: dict, root: Path) -> str | None:
    """``classifier.init`` as the path of a saved classifier: given, or (``{classes: [...]}``) trained once
    here with the same recipe on every training image of those classes (never their validation or test
    images), kept in ``OUT/classifier_init/`` and reused by a re-run."""
    if init is None or isinstance(init, str):
        if init is not None:
            require(Path(init).is_file(), f"`classifier.init` = {init!r} is not a file; give a classifier saved with "
                                          "imgaug_gen.metrics.downstream.save_classifier, or {classes: [...]}.")
        return init
    from imgaug_gen.config import instantiate_checked
    from imgaug_gen.metrics.downstream import save_classifier, train_and_test

    data = OmegaConf.to_container(cfg.data, resolve=True)
    data.update(classes=list(init["classes"]), shots=None, seed=0)
    base_recipe = {**recipe, **({"steps": int(init["steps"])} if init.get("steps") else {})}
    path = root / "classifier_init" / f"{_digest(data, base_recipe)[:16]}.safetensors"
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


def _generator_summary(per_subset: Mapping[str, dict], cas: dict | None) -> dict:
    """One generator's facts over the subsets: FID/KID/precision/recall/memorisation means, CAS."""
    subsets = list(per_subset.values())
    out: dict[str, Any] = {"subsets": dict(per_subset), "n_synthetic": subsets[0].get("n_synthetic")}
    for k in ("fid", "kid_mean", "precision", "recall", "density", "coverage"):
        vals = [s.get("generate", {}).get(k) for s in subsets]
        if all(v is not None for v in vals):
            out[k] = float(np.mean(vals))
    out["memorisation"] = float(np.mean([s["memorisation"] for s in subsets]))
    rates = [s.get("copy_rate") for s in subsets]
    out["copy_rate"] = float(np.mean(rates)) if all(r is not None for r in rates) else None
    if cas is not None:
        out["cas"] = {k: cas[k] for k in ("mean", "std", "accs", "pairs")}
    first = subsets[0]
    for k in ("run_dir", "folder", "reused_run", "train_seconds"):
        if k in first:
            out[k] = first[k]
    return out


def _chart_methods(results: Mapping[str, Mapping[str, dict]], selected: dict | None,
                   entries: Mapping[str, dict]) -> list[str]:
    """The non-generative recipes, the headline, and each generator's best policy on validation (or its first)."""
    first = next(iter(results.values()))
    shown = [m for m in baseline_methods(True) if m in first]
    for g, e in entries.items():
        ms = [method_name(g, p) for p in e["policies"] if method_name(g, p) in first]
        if ms:
            shown.append(max(ms, key=lambda m: np.mean([r.get(m, {}).get("val_mean", 0.0) for r in results.values()])))
    if selected and selected["method"] not in shown:
        shown.append(selected["method"])
    return shown


def _full_recipe(recipe: dict) -> dict:
    from imgaug_gen.metrics.downstream import RECIPE

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in {**RECIPE, **recipe}.items()}


def _fmt_gain(g: Mapping[str, Any] | None) -> str:
    if not g:
        return "—"
    star = " *" if g["significant"] and g["mean"] > 0 else (" (−)" if g["significant"] else "")
    return f"{100 * g['mean']:+.1f} [{100 * g['lo']:+.1f}, {100 * g['hi']:+.1f}]{star}"


def report_markdown(ev: Mapping[str, Any]) -> str:
    """The markdown report of an eval.json: the baseline chosen per shots, the headline, the grid (test
    accuracy, gain over the baseline with 95 % intervals, validation gain) and per-shots generator facts."""
    results = ev["results"]
    shots = list(results)
    base = {s: (ev.get("baselines") or {}).get(s, {}).get("method", BASELINE) for s in shots}
    methods: list[str] = []
    for s in shots:
        methods += [m for m in results[s] if m not in methods]
    n_sub, n_seeds = len(ev.get("data_seeds", [0])), len(ev["seeds"])
    init = f" `transfer` methods and every generative one start from the classifier `{ev['classifier_init']}`." \
        if ev.get("classifier_init") else ""
    lines = [f"Fixed-recipe classifier on {ev['dataset'].get('n_test', '?')} held-out real test images; "
             f"{n_sub} few-shot subset(s) x {n_seeds} classifier seeds per shots value.{init} The baseline of each "
             "shots value is the non-generative recipe with the best validation accuracy ("
             + ", ".join(f"{s} shots: `{base[s]}`" for s in shots) + "). Gains are paired differences to it (same "
             "subset, same seed), mean [95 % cluster-bootstrap interval] in accuracy points; * = the interval "
             "excludes 0.", ""]
    sel = ev.get("selected")
    if sel:
        m = sel["method"]
        lines += [f"**Headline (chosen on the validation split, {ev['dataset'].get('n_val', '?')} images; tested once): "
                  f"`{m}`**", "", "| | " + " | ".join(f"{s} shots" for s in shots) + " |",
                  "|---|" + "---:|" * len(shots),
                  "| baseline | " + " | ".join(f"`{base[s]}`" for s in shots) + " |",
                  "| baseline test accuracy | " + " | ".join(
                      f"{100 * results[s][base[s]]['mean']:.1f} ± {100 * results[s][base[s]]['std']:.1f}"
                      for s in shots) + " |",
                  f"| `{m}` test accuracy | " + " | ".join(
                      f"{100 * results[s][m]['mean']:.1f} ± {100 * results[s][m]['std']:.1f}" for s in shots) + " |",
                  "| gain over the baseline | " + " | ".join(_fmt_gain(results[s][m].get("gain"))
                                                          for s in shots) + " |", ""]
    lines += ["| method | " + " | ".join(f"{s} shots: test | gain | val gain" for s in shots) + " |",
              "|---|" + "---:|---:|---:|" * len(shots)]
    for m in methods:
        cells = []
        for s in shots:
            r = results[s].get(m)
            if r is None:
                cells += ["—", "—", "—"]
                continue
            cells += [f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}", _fmt_gain(r.get("gain")),
                      "—" if "val_gain" not in r else f"{100 * r['val_gain']['mean']:+.1f}"]
        mark = " (headline)" if sel and m == sel["method"] else ""
        lines.append(f"| {m}{mark} | " + " | ".join(cells) + " |")
    pols = ev.get("policies") or {}
    if pols:
        from imgaug_gen.data.mixed import MixPolicy

        lines += ["", "Policies: " + "; ".join(f"`{k}` = {MixPolicy(**v).tag}" for k, v in pols.items()) + "."]
    for s in shots:
        gens = ev.get("generators", {}).get(s, {})
        if not gens:
            continue
        lines += ["", f"### {s} shots per class: generators (means over subsets)", "",
                  "| generator | synthetic images | FID | KID | precision | recall | density | coverage | memorisation "
                  "| copy rate (fresh real: 0.05) | CAS (%) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for g, info in gens.items():
            cas = info.get("cas") or {}
            fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
            lines.append(f"| {g} | {info.get('n_synthetic', '—')} | {fmt(info.get('fid'), '.2f')} | "
                         f"{fmt(info.get('kid_mean'), '.4f')} | {fmt(info.get('precision'), '.3f')} | "
                         f"{fmt(info.get('recall'), '.3f')} | {fmt(info.get('density'), '.3f')} | "
                         f"{fmt(info.get('coverage'), '.3f')} | {fmt(info.get('memorisation'), '.3f')} | "
                         f"{fmt(info.get('copy_rate'), '.3f')} | "
                         f"{fmt(100 * cas['mean'] if cas else None, '.1f')} |")
    return "\n".join(lines) + "\n"
