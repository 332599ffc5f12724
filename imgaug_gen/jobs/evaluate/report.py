"""The report of an evaluation: generator facts, the chart's methods, ``results.md``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from imgaug_gen.jobs.evaluate.config import (
    BASELINE,
    PSEUDO_BASELINE,
    TRANSFER_BASELINE,
    baseline_methods,
    is_control,
    method_name,
)


def generator_summary(per_subset: Mapping[str, dict], cas: dict | None) -> dict:
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
    if "trained_at" in first:  # the oldest subset's run (None: one was trained before the field existed)
        times = [s.get("trained_at") for s in subsets]
        out["trained_at"] = None if None in times else min(times)
    return out


def chart_methods(
    results: Mapping[str, Mapping[str, dict]], selected: dict | None, entries: Mapping[str, dict]
) -> list[str]:
    """The non-generative recipes, the headline, and each generator's best policy on validation (or its first)."""
    first = next(iter(results.values()))
    shown = [m for m in baseline_methods(True, pseudo=True) if m in first] + [m for m in first if is_control(m)]
    for g, e in entries.items():
        ms = [method_name(g, p) for p in e["policies"] if method_name(g, p) in first]
        if ms:
            shown.append(max(ms, key=lambda m: np.mean([r.get(m, {}).get("val_mean", 0.0) for r in results.values()])))
    if selected and selected["method"] not in shown:
        shown.append(selected["method"])
    return shown


def full_recipe(recipe: dict) -> dict:
    from imgaug_gen.metrics.downstream import RECIPE

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in {**RECIPE, **recipe}.items()}


def fmt_gain(g: Mapping[str, Any] | None) -> str:
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
    sel = ev.get("selected")
    lines = _intro_lines(ev, shots, base)
    if sel:
        lines += _headline_lines(ev, sel["method"], shots, base)
    lines += _grid_lines(results, methods, shots, sel)
    pols = ev.get("policies") or {}
    if pols:
        from imgaug_gen.data.mixed import MixPolicy

        lines += ["", "Policies: " + "; ".join(f"`{k}` = {MixPolicy(**v).tag}" for k, v in pols.items()) + "."]
    for s in shots:
        lines += _generator_lines(s, ev.get("generators", {}).get(s, {}))
    if ev.get("pseudo"):
        lines += _pseudo_lines(ev["pseudo"])
        lines += _beyond_pseudo_lines(results, methods, shots)
    return "\n".join(lines) + "\n"


def _pseudo_lines(pseudo: Mapping[str, dict]) -> list[str]:
    """Per shots value: the pseudo-label threshold grid (validation and test means, kept images, purity) and
    the threshold each subset chose on validation."""
    lines = []
    for s, p in pseudo.items():
        chosen = ", ".join(f"subset {d}: {t:g}" for d, t in p["chosen"].items())
        paths = [Path(r["records"]) for sub in p["subsets"].values() for r in sub["runs"].values()]
        where = ", ".join(sorted({f"`{q.parent.as_posix()}/{q.stem.rsplit('_s', 1)[0]}_s<seed>.jsonl`" for q in paths}))
        lines += [
            "",
            f"### {s} shots per class: pseudo-labels (`{PSEUDO_BASELINE}`)",
            "",
            f"The same seed's `{p['teacher']}` classifier labels the {p['pool_size']} unlabelled images; those it "
            "labels with confidence >= the threshold join its training set (each its own group"
            + (f", {p['copies']} classical copies each" if p["copies"] else "")
            + f"). Threshold chosen per subset on the validation split: {chosen} (its validation accuracy, the "
            "best of the grid's on that split, is slightly optimistic where it competes for the baseline). The kept "
            f"pseudo-labels, one JSON line each with its confidence, teacher and threshold: {where}.",
            "",
            "| threshold | kept images (mean per run) | validation accuracy | test accuracy | pseudo-label accuracy |",
            "|---:|---:|---:|---:|---:|",
        ]
        for t, g in p["grid"].items():
            mark = " (chosen)" if g["chosen_in"] else ""
            val = "—" if g["val_mean"] is None else f"{100 * g['val_mean']:.1f}"
            pur = "—" if not g["kept_mean"] else "not known" if g["purity"] is None else f"{100 * g['purity']:.1f}"
            lines.append(f"| {t}{mark} | {g['kept_mean']:.0f} | {val} | {100 * g['test_mean']:.1f} | {pur} |")
    return lines


def _beyond_pseudo_lines(results: Mapping[str, Mapping[str, dict]], methods: list[str], shots: list[str]) -> list[str]:
    """Every generative method's paired gain over `real+classical` and over `real+pseudo+classical`."""
    given = {ref for res in results.values() for r in res.values() for ref in r.get("gains") or {}}
    refs = [m for m in (BASELINE, TRANSFER_BASELINE, PSEUDO_BASELINE) if m in given]
    gen = [m for m in methods if any((results[s].get(m) or {}).get("gains") for s in shots)]
    if not gen:
        return []
    lines = [
        "",
        "### What the generator adds beyond the pseudo-labels",
        "",
        "Paired test gain (same subset, same seed), mean [95 % cluster-bootstrap interval], over each reference.",
        "",
        "| method | " + " | ".join(f"{s} shots: vs `{ref}`" for s in shots for ref in refs) + " |",
        "|---|" + "---:|" * (len(shots) * len(refs)),
    ]
    for m in gen:
        cells = [fmt_gain(((results[s].get(m) or {}).get("gains") or {}).get(ref)) for s in shots for ref in refs]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def _intro_lines(ev: Mapping[str, Any], shots: list[str], base: dict[str, str]) -> list[str]:
    """The report's opening paragraph: the test set, the subsets and seeds, the baselines, what a gain is."""
    n_sub, n_seeds = len(ev.get("data_seeds", [0])), len(ev["seeds"])
    init = (
        f" `transfer` methods and every generative one start from the classifier `{ev['classifier_init']}`."
        if ev.get("classifier_init")
        else ""
    )
    first = ev["results"][shots[0]] if shots else {}
    controls = [m for m in first if is_control(m)]
    control = (
        " " + ", ".join(f"`{m}`" for m in controls) + ": the distilling policy with the shots themselves as the "
        "synthetic images (self-distillation from the same teacher), a non-generative recipe that competes for "
        "the baseline, so a gain under that policy is the generated images', not the teacher's."
        if controls
        else ""
    )
    return [
        f"Fixed-recipe classifier on {ev['dataset'].get('n_test', '?')} held-out real test images; "
        f"{n_sub} few-shot subset(s) x {n_seeds} classifier seeds per shots value.{init} The baseline of each "
        "shots value is the non-generative recipe with the best validation accuracy ("
        + ", ".join(f"{s} shots: `{base[s]}`" for s in shots)
        + f").{control} Gains are paired differences to the baseline (same "
        "subset, same seed), mean [95 % cluster-bootstrap interval] in accuracy points; * = the interval "
        "excludes 0.",
        "",
    ]


def _headline_lines(ev: Mapping[str, Any], m: str, shots: list[str], base: dict[str, str]) -> list[str]:
    """The headline method ``m`` against the baseline, per shots value."""
    results = ev["results"]
    return [
        f"**Headline (chosen on the validation split, {ev['dataset'].get('n_val', '?')} images; tested once): `{m}`**",
        "",
        "| | " + " | ".join(f"{s} shots" for s in shots) + " |",
        "|---|" + "---:|" * len(shots),
        "| baseline | " + " | ".join(f"`{base[s]}`" for s in shots) + " |",
        "| baseline test accuracy | "
        + " | ".join(f"{100 * results[s][base[s]]['mean']:.1f} ± {100 * results[s][base[s]]['std']:.1f}" for s in shots)
        + " |",
        f"| `{m}` test accuracy | "
        + " | ".join(f"{100 * results[s][m]['mean']:.1f} ± {100 * results[s][m]['std']:.1f}" for s in shots)
        + " |",
        "| gain over the baseline | " + " | ".join(fmt_gain(results[s][m].get("gain")) for s in shots) + " |",
        "",
    ]


def _grid_lines(
    results: Mapping[str, Mapping[str, dict]], methods: list[str], shots: list[str], sel: dict | None
) -> list[str]:
    """The full grid: per method and shots value, test accuracy, gain and validation gain."""
    lines = [
        "| method | " + " | ".join(f"{s} shots: test | gain | val gain" for s in shots) + " |",
        "|---|" + "---:|---:|---:|" * len(shots),
    ]
    for m in methods:
        cells = []
        for s in shots:
            r = results[s].get(m)
            if r is None:
                cells += ["—", "—", "—"]
                continue
            cells += [
                f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}",
                fmt_gain(r.get("gain")),
                "—" if "val_gain" not in r else f"{100 * r['val_gain']['mean']:+.1f}",
            ]
        mark = " (headline)" if sel and m == sel["method"] else ""
        lines.append(f"| {m}{mark} | " + " | ".join(cells) + " |")
    return lines


def _generator_lines(s: str, gens: Mapping[str, dict]) -> list[str]:
    """One shots value's generator table (none without generators)."""
    if not gens:
        return []
    lines = [
        "",
        f"### {s} shots per class: generators (means over subsets)",
        "",
        "| generator | synthetic images | FID | KID | precision | recall | density | coverage | memorisation "
        "| copy rate (fresh real: 0.05) | CAS (%) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for g, info in gens.items():
        cas = info.get("cas") or {}
        fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
        lines.append(
            f"| {g} | {info.get('n_synthetic', '—')} | {fmt(info.get('fid'), '.2f')} | "
            f"{fmt(info.get('kid_mean'), '.4f')} | {fmt(info.get('precision'), '.3f')} | "
            f"{fmt(info.get('recall'), '.3f')} | {fmt(info.get('density'), '.3f')} | "
            f"{fmt(info.get('coverage'), '.3f')} | {fmt(info.get('memorisation'), '.3f')} | "
            f"{fmt(info.get('copy_rate'), '.3f')} | "
            f"{fmt(100 * cas['mean'] if cas else None, '.1f')} |"
        )
    return lines
