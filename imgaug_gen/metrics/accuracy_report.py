"""Reports of downstream accuracies (:func:`~imgaug_gen.metrics.downstream.compare_methods` results): a
markdown table and a plot of accuracy against shots per class."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from imgaug_gen.errors import require
from imgaug_gen.io import atomic_path


def results_table_markdown(
    results: Mapping[str, Mapping[str, Any]], baseline: str | None = None, percent: bool = True
) -> str:
    """A markdown table of :func:`~imgaug_gen.metrics.downstream.compare_methods` results: method, train
    images, mean ± std, per-seed accuracies, and the difference to ``baseline`` (default: the first method)."""
    require(len(results) > 0, "`results` is empty.")
    names = list(results)
    baseline = names[0] if baseline is None else baseline
    require(baseline in results, f"`baseline` = {baseline!r} is not one of {names}.")
    scale, unit = (100.0, " (%)") if percent else (1.0, "")
    fmt = "{:.1f}" if percent else "{:.4f}"
    base = results[baseline]["mean"]
    lines = [
        f"| method | train images | accuracy{unit} mean ± std | per seed | Δ vs {baseline} |",
        "|---|---:|---:|---|---:|",
    ]
    for name in names:
        r = results[name]
        per = ", ".join(fmt.format(a * scale) for a in r.get("accs", []))
        delta = "—" if name == baseline else ("+" if r["mean"] >= base else "") + fmt.format((r["mean"] - base) * scale)
        n_train = r.get("n_train", "")
        lines.append(
            f"| {name} | {n_train} | {fmt.format(r['mean'] * scale)} ± {fmt.format(r['std'] * scale)} "
            f"| {per} | {delta} |"
        )
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_shots(
    results_by_shots: Mapping[Any, Mapping[str, Mapping[str, Any]]], path: str | os.PathLike, title: str | None = None
) -> Path:
    """Accuracy against shots per class, one line per method; writes a PNG.

    ``results_by_shots``: ``{shots: compare_methods(...)}`` (error bars: ± std), or evaluate.py's
    results whose entries carry ``ci95`` (error bars: the 95 % interval of the mean) and ``gain``
    (a second panel: the paired gain over the baseline with its 95 % interval). Returns the path.
    """
    # The object-oriented API: no pyplot state, and the caller's backend (e.g. a notebook's inline) stays.
    import matplotlib
    from matplotlib.figure import Figure

    require(len(results_by_shots) > 0, "`results_by_shots` is empty.")
    shots = sorted(results_by_shots, key=lambda s: float(s))
    methods: list[str] = []
    for s in shots:
        for m in results_by_shots[s]:
            if m not in methods:
                methods.append(m)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with_gains = any("gain" in r for s in shots for r in results_by_shots[s].values())
    fig = Figure(figsize=(11 if with_gains else 6, 4), dpi=120)
    axes = fig.subplots(1, 2 if with_gains else 1, squeeze=False)[0]
    # more methods than the 10 default colours: 20 paired colours and a marker per group of 10
    palette = (
        [f"C{i}" for i in range(10)]
        if len(methods) <= 10
        else [matplotlib.colormaps["tab20"](i % 20) for i in range(len(methods))]
    )
    try:
        for i, m in enumerate(methods):
            style = {"color": palette[i], "marker": "osD^v"[(i // 10) % 5] if len(methods) > 10 else "o"}
            got = [s for s in shots if m in results_by_shots[s]]
            rs = [results_by_shots[s][m] for s in got]
            xs = [float(s) * (1 + 0.012 * (i - len(methods) / 2)) for s in got]  # dodge overlapping bars
            ys = np.array([100 * r["mean"] for r in rs])
            if all("ci95" in r for r in rs):
                err = np.array([[y - 100 * r["ci95"][0], 100 * r["ci95"][1] - y] for y, r in zip(ys, rs)]).T
            else:
                err = np.array([100 * r["std"] for r in rs])
            axes[0].errorbar(xs, ys, yerr=err, capsize=3, label=m, **style)
            if with_gains and all("gain" in r for r in rs):
                g = [r["gain"] for r in rs]
                gy = np.array([100 * v["mean"] for v in g])
                gerr = np.array([[y - 100 * v["lo"], 100 * v["hi"] - y] for y, v in zip(gy, g)]).T
                axes[1].errorbar(xs, gy, yerr=gerr, capsize=3, label=m, **style)
        axes[0].set_ylabel("test accuracy (%)")
        if with_gains:
            axes[1].axhline(0.0, color="k", lw=0.8)
            axes[1].set_ylabel("gain over the baseline (points, 95 % CI)")
        for ax in axes:
            ax.set_xlabel("real images per class (shots)")
            if len(shots) > 1 and float(shots[-1]) / max(float(shots[0]), 1e-9) >= 8:
                ax.set_xscale("log")
            ax.set_xticks([float(s) for s in shots])
            ax.set_xticklabels([str(s) for s in shots])
            ax.minorticks_off()
            ax.grid(True, alpha=0.3)
        axes[0].legend(fontsize=7)
        if title:
            fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        fig.clear()
    return path
