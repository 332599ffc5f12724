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
  distilling policy is the ``real+classical`` classifier of the same subset and seed;
* with ``classifier.init`` (a classifier of the same recipe trained on other classes), ``transfer`` and
  ``transfer+classical``, and every generative method starts from that init (its head new);
* with an unlabelled pool in the data (``data.unlabeled`` / ``data.unlabeled_root``), ``real+pseudo+classical``
  -- the ``real+classical`` set plus the pool images its teacher labels with a validation-chosen confidence --
  and ``real+pseudo+<g>+classical@<P>`` on top of it (:mod:`imgaug_gen.jobs.evaluate.pseudo`).

Every generator entry trains its generator on exactly that subset with the real ``train.py`` job
(``train:``), reuses another entry's run (``run_of:``) or an existing run (``run_dir:``), and writes
its images with the real ``generate.py`` job; ``folder:`` takes an existing output instead.

Statistics: the baseline of each shots value is the non-generative recipe with the best validation
accuracy; every method's gain over it is paired per (subset, seed) with a 95 % cluster-bootstrap interval
(:mod:`imgaug_gen.metrics.stats`). With ``selection: val`` the **headline** is the generative method with
the best mean validation gain over all shots values, tested once on the test split; the full grid is
reported beside it.

Steps (the headers in the code carry the same numbers):
1. Check the config (every key, every entry, every policy) before any heavy work; claim the units.
2. Per shots x subset: the real subset, its classical copies, the validation and test splits.
3. Per generator entry: train (or reuse) -> generate -> read the written folder.
4. Train / score the classifier on every set x policy x seed (cached in ``OUT/classifier_runs.jsonl``).
5. Statistics, selection and report: ``OUT/eval.json``, ``OUT/results.md``, ``OUT/accuracy_vs_shots.png``.

A re-run with the same command reuses finished runs, folders and classifier results.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from imgaug_gen.errors import require
from imgaug_gen.io import FolderLock
from imgaug_gen.jobs.evaluate.classifiers import Classifiers, ResultCache, TrainingSet, runs_for_subset
from imgaug_gen.jobs.evaluate.config import (
    BASELINE,
    check_evaluate_config,
    control_methods,
    method_name,
    method_names,
    pseudo_settings,
    shots_list,
    wanted_methods,
)
from imgaug_gen.jobs.evaluate.pseudo import (
    PseudoJob,
    load_pool,
    pseudo_runs,
    reference_gains,
    summarise_pseudo,
    wants_pseudo,
)
from imgaug_gen.jobs.evaluate.report import chart_methods, full_recipe, generator_summary, report_markdown
from imgaug_gen.jobs.evaluate.selection import select_headline, summarise
from imgaug_gen.jobs.evaluate.sources import classical_copies, resolve_init, subset_datamodule, synthetic_sets
from imgaug_gen.runtime import prepare_process

log = logging.getLogger(__name__)

__all__ = ["BASELINE", "check_evaluate_config", "evaluate", "method_name", "method_names", "report_markdown"]


def _evaluate_subset(
    cfg: DictConfig,
    entries: dict,
    policies: dict,
    shots,
    data_seed: int,
    root: Path,
    cache: "ResultCache",
    recipe: dict,
    wanted,
    seeds: list[int],
    init: str | None = None,
) -> tuple[list, dict, dict, dict | None]:
    """One (shots, subset): its real and classical sets, its generators' synthetic sets, every classifier
    run. Returns the result rows, the generator facts, the dataset facts and the pseudo-label facts (None
    without an unlabelled pool)."""
    from imgaug_gen.augment.classical import build_augmenter

    # 2. Real subset, its classical copies, the fixed validation and test splits.
    dm, data = subset_datamodule(cfg, shots, data_seed)
    real_x, real_y = dm.train_arrays()
    test, val = dm.test_arrays(), dm.val_arrays()
    require(len(test[0]) > 0, "the data has no test split; set `data.test_fraction` > 0.")
    augmenter = build_augmenter(cfg.augment, real_x.shape[1:])
    real = TrainingSet(real_x, real_y, np.arange(len(real_y)))
    classical = real.plus(classical_copies(augmenter, real, int(cfg.augment.copies_per_image), data_seed))
    dataset = {
        "class_names": list(dm.class_names),
        "n_test": int(len(test[0])),
        "n_val": int(len(val[0])),
        "image_shape": list(real_x.shape[1:]),
        "data": {k: v for k, v in data.items() if k != "seed"},
    }
    # 3. Synthetic sets (+ classical copies of each synthetic image, same groups).
    facts, sets = synthetic_sets(cfg, entries, shots, data_seed, data, root, dm)

    def with_copies(images: TrainingSet) -> TrainingSet:
        return images.plus(classical_copies(augmenter, images, int(cfg.synthetic_copies), data_seed + 1))

    for s in sets.values():
        s.mixed = with_copies(s.images)
    # 4. Classifier runs (then, with an unlabelled pool, the pseudo-label ones: imgaug_gen.jobs.evaluate.pseudo).
    # the copies controls (when asked for, or a method of their policy is): the shots as the synthetic images,
    # with the same classical copies a generator's images get
    wanted_controls = {
        m: policies[p]
        for m, p in control_methods(cfg, entries, policies).items()
        if wanted is None or m in wanted or any(w.endswith(f"@{p}") for w in wanted)
    }
    copies = with_copies(real) if wanted_controls else None
    controls = {m: (copies, policy) for m, policy in wanted_controls.items()}
    clf = Classifiers(cache, recipe, dm.num_classes, test, val, shots, data_seed, init)
    rows = runs_for_subset(
        clf, seeds, real, classical, sets, entries, policies, wanted, int(cfg.cas_seeds), controls=controls
    )
    settings = pseudo_settings(cfg)
    pool = load_pool(dm, real_x.shape[1:]) if settings and wants_pseudo(entries, wanted) else None
    if pool is None:
        return rows, facts, dataset, None
    tag = f"shots{shots if shots is not None else 'all'}_d{data_seed}"
    job = PseudoJob.build(clf, classical, len(real), pool, augmenter, settings, list(dm.class_names), root, tag)
    pseudo_rows, pseudo_facts = pseudo_runs(job, seeds, sets, entries, policies, wanted)
    return rows + pseudo_rows, facts, dataset, pseudo_facts


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the downstream evaluation configured by ``conf/evaluate.yaml``; returns the eval.json content."""
    # 1. Check the config; claim every (shots, subset) unit of the output folder this job computes, so a
    # second copy of the job stops at once, while jobs on disjoint units (a benchmark's parallel workers,
    # a cluster array over shots) share one folder.
    entries, policies = check_evaluate_config(cfg)
    root = Path(cfg.out_dir).resolve()
    with contextlib.ExitStack() as stack:
        for shots in shots_list(cfg):
            for data_seed in cfg.data_seeds:
                name = f"evaluate.shots{shots if shots is not None else 'all'}_d{int(data_seed)}.lock"
                stack.enter_context(FolderLock(root, name, "evaluate.py job"))
        return _evaluate(cfg, entries, policies, root)


def _evaluate(cfg: DictConfig, entries: dict, policies: dict, root: Path) -> dict[str, Any]:
    """Steps 2-5 (step 1 is :func:`evaluate`'s): every shots value's subsets and statistics, then the report."""
    from imgaug_gen.io import atomic_write_text

    prepare_process()
    recipe = OmegaConf.to_container(cfg.classifier, resolve=True) or {}
    init = resolve_init(cfg, recipe.pop("init", None), recipe, root)
    wanted = wanted_methods(cfg)
    all_shots = shots_list(cfg)
    seeds = [int(s) for s in cfg.seeds]
    data_seeds = [int(s) for s in cfg.data_seeds]
    cache = ResultCache(root / "classifier_runs.jsonl")
    atomic_write_text(root / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    t_start = time.perf_counter()

    results: dict[str, dict] = {}
    baselines: dict[str, dict] = {}
    generators: dict[str, dict] = {}
    dataset: dict[str, Any] = {}
    plot_x: dict[str, int] = {}
    pseudo: dict[str, dict] = {}
    controls = list(control_methods(cfg, entries, policies))
    for shots in all_shots:
        rows: list[dict] = []
        generators[str(shots)], pseudo_subsets = {}, {}
        for data_seed in data_seeds:
            subset_rows, subset_gens, dataset, subset_pseudo = _evaluate_subset(
                cfg, entries, policies, shots, data_seed, root, cache, recipe, wanted, seeds, init
            )
            rows += subset_rows
            for g, info in subset_gens.items():
                generators[str(shots)].setdefault(g, {})[str(data_seed)] = info
            if subset_pseudo is not None:
                pseudo_subsets[str(data_seed)] = subset_pseudo
            n_classes = len(dataset["class_names"])

        # 5. Statistics per shots.
        results[str(shots)], baselines[str(shots)] = _shots_statistics(
            rows, seeds, init, entries, wanted, generators[str(shots)], shots, controls
        )
        if pseudo_subsets:
            settings = pseudo_settings(cfg)
            pseudo[str(shots)] = summarise_pseudo(pseudo_subsets, settings["thresholds"], settings["copies"])
        plot_x[str(shots)] = shots if shots is not None else round(dataset.get("n_train", 0) / n_classes)

    # 5. Selection and report.
    selected = select_headline(results) if cfg.selection == "val" else None
    out = {
        "results": results,
        "baselines": baselines,
        "selected": selected,
        "classifier_init": init,
        "generators": generators,
        "shots": all_shots,
        "seeds": seeds,
        "data_seeds": data_seeds,
        "policies": {k: v.to_dict() for k, v in policies.items()},
        "dataset": dataset,
        "classifier_recipe": {**full_recipe(recipe)},
        "augment": OmegaConf.to_container(cfg.augment, resolve=True),
        "synthetic_copies": int(cfg.synthetic_copies),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    if pseudo:  # only with an unlabelled pool: eval.json without one is unchanged
        out["pseudo"] = pseudo
    _write_report(out, root, entries, plot_x)
    return out


def _shots_statistics(
    rows: list[dict], seeds: list[int], init: str | None, entries: dict, wanted, gens: dict, shots, controls: list[str]
) -> tuple[dict, dict]:
    """Step 5 for one shots value: the methods' results and the baseline; ``gens`` becomes the generators' facts."""
    summary, baseline = summarise(rows, seeds, init is not None)
    for g, per_subset in gens.items():
        cas = summary.pop(f"cas:{g}", None)
        gens[g] = generator_summary(per_subset, cas)
    names = method_names(entries, init is not None, pseudo=True, controls=controls)  # pseudo ones: with a pool only
    if wanted:
        summary = {k: summary[k] for k in names if (k in wanted or k == baseline["method"]) and k in summary}
    results = {k: summary[k] for k in names if k in summary}
    reference_gains(rows, results)  # with pseudo-label rows only: gains over real+classical and real+pseudo+classical
    for m, r in results.items():
        g = r.get("gain")
        log.info(
            "shots=%s %-44s test %.2f ± %.2f %%%s",
            shots,
            m,
            100 * r["mean"],
            100 * r["std"],
            "" if g is None else f"  gain {100 * g['mean']:+.2f} [{100 * g['lo']:+.2f}, {100 * g['hi']:+.2f}]",
        )
    return results, baseline


def _write_report(out: dict[str, Any], root: Path, entries: dict, plot_x: dict[str, int]) -> None:
    """Step 5's files: ``results.md``, ``accuracy_vs_shots.png`` and (with their paths in ``out``) ``eval.json``."""
    from imgaug_gen.io import atomic_write_json, atomic_write_text
    from imgaug_gen.metrics.downstream import plot_accuracy_vs_shots

    results = out["results"]
    md = report_markdown(out)
    atomic_write_text(root / "results.md", md)
    shown = chart_methods(results, out["selected"], entries)
    plot_accuracy_vs_shots(
        {plot_x[s]: {m: r[m] for m in shown if m in r} for s, r in results.items()},
        root / "accuracy_vs_shots.png",
        title=f"{len(out['data_seeds'])} subsets x {len(out['seeds'])} seeds, 95 % intervals",
    )
    out["files"] = {
        "eval_json": str(root / "eval.json"),
        "table": str(root / "results.md"),
        "chart": str(root / "accuracy_vs_shots.png"),
    }
    atomic_write_json(root / "eval.json", out)
