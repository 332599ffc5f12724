"""Statistics and choices: every method's paired gain over the validation-chosen baseline, and the headline."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from imgaug_gen.jobs.evaluate.config import BASELINE, TRANSFER_BASELINE, baseline_methods, is_control


def choose_baseline(by_method: Mapping[str, Mapping[tuple, dict]], with_init: bool) -> dict:
    """The baseline of one shots value: the non-generative recipe (the copies controls included) with the best
    mean validation accuracy (without a validation split: ``transfer+classical`` with an init, else
    ``real+classical``)."""
    cands = [m for m in baseline_methods(with_init, pseudo=True) if m in by_method]  # pseudo: with a pool only
    cands += [m for m in by_method if is_control(m)]
    fixed = TRANSFER_BASELINE if with_init and TRANSFER_BASELINE in by_method else BASELINE
    val = {m: [r.get("val_accuracy") for r in by_method[m].values()] for m in cands}
    if not cands or any(v is None for vs in val.values() for v in vs):
        return {"method": fixed, "criterion": "fixed (no validation split)"}
    means = {m: float(np.mean(v)) for m, v in val.items()}
    best = max(cands, key=lambda m: means[m])  # first of equals: the simpler recipe
    return {
        "method": best,
        "criterion": "best mean validation accuracy of the non-generative recipes",
        "val_means": means,
    }


def summarise(rows: list[dict], seeds: list[int], with_init: bool = False) -> tuple[dict[str, dict], dict]:
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
        res = {
            "mean": float(np.mean(test)),
            "std": float(np.std(test, ddof=1)) if len(test) > 1 else 0.0,
            "accs": test,
            "pairs": [list(k) for k in pairs],
            "seeds": [k[1] for k in pairs],
            "n_train": runs[pairs[0]]["n_train"],
            "seconds": round(sum(r.get("seconds", 0) for r in runs.values()), 1),
        }
        if len(val) == len(test):
            res["val_accs"] = val
            res["val_mean"] = float(np.mean(val))
        res["ci95"] = [
            paired_gain({k: runs[k]["accuracy"] for k in pairs}, {k: 0.0 for k in pairs})[b] for b in ("lo", "hi")
        ]
        if base and m != baseline and not m.startswith("cas:"):
            res["gain"] = paired_gain(
                {k: r["accuracy"] for k, r in runs.items()}, {k: r["accuracy"] for k, r in base.items()}
            )
            if "val_accs" in res:
                res["val_gain"] = paired_gain(
                    {k: r["val_accuracy"] for k, r in runs.items()}, {k: r["val_accuracy"] for k, r in base.items()}
                )
        out[m] = res
    return out, choice


def select_headline(results: Mapping[str, Mapping[str, dict]]) -> dict | None:
    """The generative method with the best mean validation gain over each shots value's chosen baseline,
    averaged over shots."""
    shots = list(results)
    cands = [
        m
        for m in results[shots[0]]
        if "@" in m and not is_control(m) and all("val_gain" in results[s].get(m, {}) for s in shots)
    ]
    if not cands:
        return None
    score = {m: float(np.mean([results[s][m]["val_gain"]["mean"] for s in shots])) for m in cands}
    best = max(cands, key=lambda m: score[m])  # first of equals: the config's order
    return {
        "method": best,
        "criterion": "mean validation gain over the chosen baseline, averaged over shots",
        "val_gain": score[best],
        "ranking": sorted(score.items(), key=lambda kv: -kv[1]),
    }
