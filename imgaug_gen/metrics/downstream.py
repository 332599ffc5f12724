"""The downstream proof: a fixed-recipe classifier trained on real / synthetic / mixed sets.

One recipe for every method, so accuracy differences come from the training images alone:
a small CNN (:class:`SmallCNN`), inputs resized to ``input_size`` (32 px) inside the model
and converted to the training set's channel count, AdamW + one-cycle schedule, label
smoothing, a random integer shift as the only train-time augmentation, and a **fixed number
of optimisation steps** (``steps``) rather than epochs by default: adding synthetic images
then does not also buy more gradient updates, so real-only and real+synthetic get the same
compute (pass ``epochs`` to train for whole passes instead). Everything is seeded and runs
deterministically on CPU; the global torch RNG is left untouched.

* :func:`train_and_test` -- accuracy of one (train set, seed).
* :func:`classification_accuracy_score` -- CAS: train on synthetic only, test on real.
* :func:`compare_methods` -- several training sets x several seeds -> mean / std / accs.
* :func:`results_table_markdown`, :func:`plot_accuracy_vs_shots` -- report them.

Timing: ~2-4 s per call for a few hundred 16x16 images on 2 CPU cores with the defaults.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imgaug_gen.errors import require
from imgaug_gen.metrics.features import _to_float01, fit_classifier_steps, images_to_tensor, validate_images

__all__ = [
    "RECIPE",
    "SmallCNN",
    "classification_accuracy_score",
    "compare_methods",
    "plot_accuracy_vs_shots",
    "results_table_markdown",
    "summarise_accuracies",
    "train_and_test",
]

#: The fixed recipe (every keyword of :func:`train_and_test` not given takes these values).
RECIPE: dict[str, Any] = {
    "input_size": 32,
    "widths": (16, 32, 64),
    "steps": 300,
    "epochs": None,
    "batch_size": 64,
    "lr": 3e-3,
    "weight_decay": 5e-4,
    "label_smoothing": 0.05,
    "max_shift": 2,   # pixels at input_size; 0 disables the train-time shift
}


class SmallCNN(nn.Module):
    """conv-BN-ReLU blocks with 2x max-pooling between them, global average pooling, linear head."""

    def __init__(self, num_classes: int, in_channels: int = 1, widths: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c = w
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _prepare(images: np.ndarray, channels: int, size: int) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float [N, channels, size, size] in [-1, 1]."""
    x = images_to_tensor(images)
    return torch.cat([(_to_float01(b, channels, size) - 0.5) / 0.5 for b in x.split(512)])


def _check_set(images: Any, labels: Any, num_classes: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    images = validate_images(images, f"{name}_images")
    y = np.asarray(labels)
    require(y.ndim == 1 and y.shape[0] == images.shape[0] and np.issubdtype(y.dtype, np.integer),
            f"`{name}_labels` must be an integer array of shape [{images.shape[0]}], "
            f"got dtype {y.dtype} and shape {tuple(y.shape)}.")
    require(y.min() >= 0 and y.max() < num_classes,
            f"`{name}_labels` must lie in [0, {num_classes - 1}], got values in [{y.min()}, {y.max()}].")
    return images, y.astype(np.int64)


def _recipe(overrides: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(overrides) - set(RECIPE))
    require(not unknown, f"unknown recipe keyword(s) {unknown}; allowed: {sorted(RECIPE)}.")
    r = {**RECIPE, **{k: v for k, v in overrides.items()}}
    require(r["epochs"] is not None or (isinstance(r["steps"], int) and r["steps"] > 0),
            f"`steps` = {r['steps']!r}; give a positive int (or `epochs`).")
    require(r["epochs"] is None or (isinstance(r["epochs"], int) and r["epochs"] > 0),
            f"`epochs` = {r['epochs']!r}; give a positive int or None (then `steps` counts).")
    require(isinstance(r["batch_size"], int) and r["batch_size"] > 0, f"`batch_size` = {r['batch_size']!r}.")
    return r


def train_and_test(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    seed: int = 0,
    *,
    return_details: bool = False,
    **recipe: Any,
) -> float | dict[str, Any]:
    """Train the fixed-recipe classifier on the train set and return its test accuracy.

    Images: uint8 ``[N, H, W, C]`` (any size, C = 1 or 3; test images are converted to the
    training channel count). ``recipe`` keywords override :data:`RECIPE` (``steps``, ``epochs``,
    ``batch_size``, ``lr``, ``max_shift``, ...). Same seed and data -> same accuracy.
    With ``return_details=True``: ``{"accuracy", "train_accuracy", "steps", "n_train", "seed"}``.
    """
    require(isinstance(num_classes, (int, np.integer)) and num_classes >= 2,
            f"`num_classes` must be an int >= 2, got {num_classes!r}.")
    train_images, ytr = _check_set(train_images, train_labels, num_classes, "train")
    test_images, yte = _check_set(test_images, test_labels, num_classes, "test")
    r = _recipe(recipe)
    channels, size = int(train_images.shape[-1]), int(r["input_size"])
    n = train_images.shape[0]
    bs = min(int(r["batch_size"]), n)
    steps = int(r["epochs"]) * math.ceil(n / bs) if r["epochs"] is not None else int(r["steps"])

    xtr, xte = _prepare(train_images, channels, size), _prepare(test_images, channels, size)
    ytr_t, yte_t = torch.from_numpy(ytr), torch.from_numpy(yte)
    gen = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = SmallCNN(int(num_classes), channels, tuple(r["widths"]))
    model.train()
    fit_classifier_steps(model, list(model.parameters()), xtr, ytr_t, steps=steps, batch_size=bs, lr=r["lr"],
                         weight_decay=r["weight_decay"], max_shift=int(r["max_shift"]),
                         label_smoothing=float(r["label_smoothing"]), gen=gen)
    model.eval()
    with torch.no_grad():
        acc = float(torch.cat([model(b).argmax(1) for b in xte.split(512)]).eq(yte_t).float().mean())
        if not return_details:
            return acc
        tr_acc = float(torch.cat([model(b).argmax(1) for b in xtr.split(512)]).eq(ytr_t).float().mean())
    return {"accuracy": acc, "train_accuracy": tr_acc, "steps": steps, "n_train": n, "seed": int(seed)}


def classification_accuracy_score(
    syn_images: np.ndarray,
    syn_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    seed: int = 0,
    **recipe: Any,
) -> float:
    """CAS (Ravuri & Vinyals 2019): accuracy on *real* test images of the fixed-recipe classifier
    trained on *synthetic images only*. Compare with the same recipe trained on real images."""
    return float(train_and_test(syn_images, syn_labels, test_images, test_labels, num_classes, seed, **recipe))


def compare_methods(
    methods: Mapping[str, tuple[np.ndarray, np.ndarray]],
    test_images: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    seeds: Sequence[int] = (0, 1, 2),
    **recipe: Any,
) -> dict[str, dict[str, Any]]:
    """Train the fixed recipe on each method's ``(images, labels)`` once per seed; test on the real test set.

    Returns ``{name: {"mean", "std", "accs", "seeds", "n_train"}}`` (``std``: sample standard
    deviation over seeds, 0 for one seed), in the input order.
    """
    require(len(methods) > 0, "`methods` is empty; pass {name: (images, labels)}.")
    require(len(seeds) > 0, "`seeds` is empty; pass e.g. [0, 1, 2].")
    out: dict[str, dict[str, Any]] = {}
    for name, pair in methods.items():
        require(isinstance(pair, (tuple, list)) and len(pair) == 2,
                f"`methods[{name!r}]` must be an (images, labels) pair.")
        images, labels = pair
        accs = [float(train_and_test(images, labels, test_images, test_labels, num_classes, int(s), **recipe))
                for s in seeds]
        out[name] = {**summarise_accuracies(accs, seeds), "n_train": int(np.asarray(images).shape[0])}
    return out


def summarise_accuracies(accs: Sequence[float], seeds: Sequence[int]) -> dict[str, Any]:
    """``{"mean", "std", "accs", "seeds"}`` of per-seed accuracies (``std``: sample std, 0 for one seed)."""
    accs = [float(a) for a in accs]
    return {"mean": float(np.mean(accs)), "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
            "accs": accs, "seeds": [int(s) for s in seeds]}


def results_table_markdown(results: Mapping[str, Mapping[str, Any]], baseline: str | None = None,
                           percent: bool = True) -> str:
    """A markdown table of :func:`compare_methods` results: method, train images, mean ± std,
    per-seed accuracies, and the difference to ``baseline`` (default: the first method)."""
    require(len(results) > 0, "`results` is empty.")
    names = list(results)
    baseline = names[0] if baseline is None else baseline
    require(baseline in results, f"`baseline` = {baseline!r} is not one of {names}.")
    scale, unit = (100.0, " (%)") if percent else (1.0, "")
    fmt = "{:.1f}" if percent else "{:.4f}"
    base = results[baseline]["mean"]
    lines = [f"| method | train images | accuracy{unit} mean ± std | per seed | Δ vs {baseline} |",
             "|---|---:|---:|---|---:|"]
    for name in names:
        r = results[name]
        per = ", ".join(fmt.format(a * scale) for a in r.get("accs", []))
        delta = "—" if name == baseline else ("+" if r["mean"] >= base else "") + fmt.format((r["mean"] - base) * scale)
        n_train = r.get("n_train", "")
        lines.append(f"| {name} | {n_train} | {fmt.format(r['mean'] * scale)} ± {fmt.format(r['std'] * scale)} "
                     f"| {per} | {delta} |")
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_shots(results_by_shots: Mapping[Any, Mapping[str, Mapping[str, Any]]],
                           path: str | os.PathLike, title: str | None = None) -> Path:
    """Accuracy (mean ± std error bars) against shots per class, one line per method; writes a PNG.

    ``results_by_shots``: ``{shots: compare_methods(...)}``. Returns the written path.
    """
    # The object-oriented API: no pyplot state, and the caller's backend (e.g. a notebook's inline) stays.
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
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.subplots()
    try:
        for i, m in enumerate(methods):
            xs = [float(s) for s in shots if m in results_by_shots[s]]
            ys = [100 * results_by_shots[s][m]["mean"] for s in shots if m in results_by_shots[s]]
            es = [100 * results_by_shots[s][m]["std"] for s in shots if m in results_by_shots[s]]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=m)
        ax.set_xlabel("real images per class (shots)")
        ax.set_ylabel("test accuracy (%)")
        if len(shots) > 1 and float(shots[-1]) / max(float(shots[0]), 1e-9) >= 8:
            ax.set_xscale("log")
        ax.set_xticks([float(s) for s in shots])
        ax.set_xticklabels([str(s) for s in shots])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        if title:
            ax.set_title(title)
        fig.tight_layout()
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        fig.clear()
    return path
