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

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imgaug_gen.errors import require
from imgaug_gen.metrics.accuracy_report import plot_accuracy_vs_shots, results_table_markdown
from imgaug_gen.metrics.domain import fit_classifier_steps
from imgaug_gen.metrics.features import images_to_tensor, to_float01, validate_images

__all__ = [
    "RECIPE",
    "load_features",
    "save_classifier",
    "SmallCNN",
    "classification_accuracy_score",
    "compare_methods",
    "check_recipe",
    "plot_accuracy_vs_shots",
    "predict_logits",
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
    "max_shift": 2,  # pixels at input_size; 0 disables the train-time shift
    "init": None,  # a classifier of this recipe trained on other classes (save_classifier): its features start
    # the network, the head is new (transfer); None: from scratch
    "init_lr_scale": 1.0,  # with an init: the transferred feature layers learn at lr x this, the new head at lr
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
    return torch.cat([(to_float01(b, channels, size) - 0.5) / 0.5 for b in x.split(512)])


def _check_set(images: Any, labels: Any, num_classes: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    images = validate_images(images, f"{name}_images")
    y = np.asarray(labels)
    require(
        y.ndim == 1 and y.shape[0] == images.shape[0] and np.issubdtype(y.dtype, np.integer),
        f"`{name}_labels` must be an integer array of shape [{images.shape[0]}], "
        f"got dtype {y.dtype} and shape {tuple(y.shape)}.",
    )
    require(
        y.min() >= 0 and y.max() < num_classes,
        f"`{name}_labels` must lie in [0, {num_classes - 1}], got values in [{y.min()}, {y.max()}].",
    )
    return images, y.astype(np.int64)


def check_recipe(overrides: Mapping[str, Any], key: str = "recipe") -> dict[str, Any]:
    """:data:`RECIPE` with ``overrides`` applied, checked; errors name ``key.<keyword>``."""
    unknown = sorted(set(overrides) - set(RECIPE))
    require(not unknown, f"`{key}` has unknown keyword(s) {unknown}; allowed: {sorted(RECIPE)}.")
    r = {**RECIPE, **{k: v for k, v in overrides.items()}}
    require(
        r["epochs"] is not None or (isinstance(r["steps"], int) and r["steps"] > 0),
        f"`{key}.steps` = {r['steps']!r}; give a positive int (or `epochs`).",
    )
    require(
        r["epochs"] is None or (isinstance(r["epochs"], int) and r["epochs"] > 0),
        f"`{key}.epochs` = {r['epochs']!r}; give a positive int or None (then `steps` counts).",
    )
    require(
        isinstance(r["batch_size"], int) and r["batch_size"] > 0,
        f"`{key}.batch_size` = {r['batch_size']!r}; give a positive int.",
    )
    require(
        isinstance(r["input_size"], int) and r["input_size"] >= 8,
        f"`{key}.input_size` = {r['input_size']!r}; give an int >= 8 (the classifier's input size in pixels).",
    )
    require(
        r["init"] is None or isinstance(r["init"], (str, os.PathLike)),
        f"`{key}.init` = {r['init']!r}; give the path of a saved classifier (save_classifier) or null.",
    )
    require(
        isinstance(r["init_lr_scale"], (int, float)) and 0 <= r["init_lr_scale"] <= 1,
        f"`{key}.init_lr_scale` = {r['init_lr_scale']!r}; give a number in [0, 1] (0 freezes the transferred "
        "features, 1 trains them at `lr` like the head).",
    )
    return r


def _policy_feed(
    xtr: torch.Tensor,
    ytr: np.ndarray,
    synthetic: tuple,
    policy: Any,
    train_groups,
    teacher_logits,
    num_classes: int,
    r: Mapping[str, Any],
    seed: int,
):
    """Real + synthetic training items under ``policy``: the tensors, the epoch size, the batch size,
    the batch-index function of :class:`MixedBatchSampler` and the :func:`mixed_loss` of a batch."""
    from imgaug_gen.data.mixed import MixedBatchSampler, MixPolicy, mixed_loss

    n_real, channels, size = len(ytr), int(xtr.shape[1]), int(r["input_size"])
    pol = MixPolicy.from_config(policy)
    syn_images, syn_y = _check_set(synthetic[0], synthetic[1], num_classes, "synthetic")
    syn_groups = synthetic[2] if len(synthetic) > 2 else None
    n = n_real + len(syn_y) if pol.name == "concat" else n_real
    bs = min(int(r["batch_size"]), n)
    sampler = MixedBatchSampler(
        ytr, syn_y, pol, bs, real_groups=train_groups, syn_groups=syn_groups, seed=seed, world_size=1, rank=0
    )
    if len(syn_y):
        xtr = torch.cat([xtr, _prepare(syn_images, channels, size)])
    ytr = np.concatenate([ytr, syn_y])
    teacher = None
    if pol.distill > 0:
        t = torch.as_tensor(np.asarray(teacher_logits), dtype=torch.float32) if teacher_logits is not None else None
        require(
            t is not None and t.shape == (len(syn_y), num_classes),
            f"`teacher_logits` must be [{len(syn_y)}, {num_classes}] for policy {pol.tag}.",
        )
        teacher = torch.cat([torch.zeros(n_real, num_classes), t])
    ytr_all, smoothing = torch.from_numpy(ytr), float(r["label_smoothing"])

    def batches(step: int) -> torch.Tensor:
        return torch.as_tensor(sampler.batch(step), dtype=torch.long)

    def loss_fn(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return mixed_loss(
            logits,
            ytr_all[idx],
            idx >= n_real,
            pol,
            None if teacher is None else teacher[idx],
            real_smoothing=smoothing,
        )

    return xtr, ytr, n, bs, batches, loss_fn


def train_and_test(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    seed: int = 0,
    *,
    synthetic: tuple | None = None,
    policy: Any = None,
    train_groups: Sequence[int] | None = None,
    teacher_logits: Any = None,
    eval_sets: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    return_details: bool = False,
    return_model: bool = False,
    **recipe: Any,
) -> float | dict[str, Any]:
    """Train the fixed-recipe classifier on the train set and return its test accuracy.

    Images: uint8 ``[N, H, W, C]`` (any size, C = 1 or 3; test images are converted to the
    training channel count). ``recipe`` keywords override :data:`RECIPE` (``steps``, ``epochs``,
    ``batch_size``, ``lr``, ``max_shift``, ...). Same seed and data -> same accuracy.

    Synthetic images are consumed under a policy (:class:`~imgaug_gen.data.mixed.MixPolicy`;
    default ``concat``): ``synthetic=(images, labels[, groups])`` where ``groups[j]`` is the real
    image that synthetic image ``j`` edits (``-1``: sampled from noise), in the id space of
    ``train_groups`` (the real image each training item is a view of; default: each item is its own
    real image, e.g. pass the original's index for classical copies). ``teacher_logits``
    ``[n_synthetic, K]`` feed ``policy.distill``.

    With ``return_details=True``: ``{"accuracy", "train_accuracy", "steps", "n_train", "seed",
    "eval": {name: accuracy on eval_sets[name]}}`` (plus ``"model"`` with ``return_model=True``).
    """
    require(
        isinstance(num_classes, (int, np.integer)) and num_classes >= 2,
        f"`num_classes` must be an int >= 2, got {num_classes!r}.",
    )
    train_images, ytr = _check_set(train_images, train_labels, num_classes, "train")
    test_images, yte = _check_set(test_images, test_labels, num_classes, "test")
    r = check_recipe(recipe)
    channels, size = int(train_images.shape[-1]), int(r["input_size"])
    n_real = train_images.shape[0]
    xtr = _prepare(train_images, channels, size)
    xtr, ytr, n, bs, batches, loss_fn = _training_feed(
        xtr, ytr, synthetic, policy, train_groups, teacher_logits, num_classes, r, int(seed)
    )
    steps = int(r["epochs"]) * math.ceil(n / bs) if r["epochs"] is not None else int(r["steps"])

    xte = _prepare(test_images, channels, size)
    ytr_t, yte_t = torch.from_numpy(ytr), torch.from_numpy(yte)
    model = _fit_small_cnn(xtr, ytr_t, int(num_classes), channels, r, steps, bs, int(seed), batches, loss_fn)
    acc = _accuracy(model, xte, yte_t)
    if not return_details:
        return acc
    evals = {}
    for name, (ex, ey) in (eval_sets or {}).items():
        ex, ey = _check_set(ex, ey, num_classes, name)
        evals[name] = _accuracy(model, _prepare(ex, channels, size), torch.from_numpy(ey))
    out = {
        "accuracy": acc,
        "train_accuracy": _accuracy(model, xtr[:n_real], ytr_t[:n_real]),
        "steps": steps,
        "n_train": int(len(ytr)),
        "seed": int(seed),
        "eval": evals,
    }
    if return_model:
        out["model"] = model
    return out


def _training_feed(
    xtr: torch.Tensor,
    ytr: np.ndarray,
    synthetic: tuple | None,
    policy: Any,
    train_groups,
    teacher_logits,
    num_classes: int,
    r: Mapping[str, Any],
    seed: int,
):
    """The training tensors, epoch size, batch size and batch / loss functions (None: plain real images)."""
    if synthetic is not None:
        return _policy_feed(xtr, ytr, synthetic, policy, train_groups, teacher_logits, num_classes, r, seed)
    require(policy is None and teacher_logits is None, "`policy` / `teacher_logits` need `synthetic` images.")
    n = len(ytr)
    return xtr, ytr, n, min(int(r["batch_size"]), n), None, None


def _fit_small_cnn(
    xtr: torch.Tensor,
    ytr_t: torch.Tensor,
    num_classes: int,
    channels: int,
    r: Mapping[str, Any],
    steps: int,
    bs: int,
    seed: int,
    batches,
    loss_fn,
) -> SmallCNN:
    """A :class:`SmallCNN` of the recipe, seeded, trained for ``steps`` steps and left in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(num_classes, channels, tuple(r["widths"]))
    params: list = list(model.parameters())
    if r["init"] is not None:
        load_features(model, r["init"], r)
        params = [
            {"params": list(model.features.parameters()), "lr": r["lr"] * float(r["init_lr_scale"])},
            {"params": list(model.head.parameters()), "lr": r["lr"]},
        ]
    model.train()
    fit_classifier_steps(
        model,
        params,
        xtr,
        ytr_t,
        steps=steps,
        batch_size=bs,
        lr=r["lr"],
        weight_decay=r["weight_decay"],
        max_shift=int(r["max_shift"]),
        label_smoothing=float(r["label_smoothing"]),
        gen=gen,
        batches=batches,
        loss_fn=loss_fn,
    )
    model.eval()
    return model


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The fraction of ``x`` that ``model`` classifies as ``y`` (in batches of 512, no gradients)."""
    with torch.no_grad():
        return float(torch.cat([model(b).argmax(1) for b in x.split(512)]).eq(y).float().mean())


def save_classifier(model: SmallCNN, path: str | os.PathLike, **recipe: Any) -> Path:
    """Save a :func:`train_and_test` model (``return_model=True``) as the ``init`` of later runs of the same
    recipe (safetensors; the recipe and class count in its metadata)."""
    from imgaug_gen.io import atomic_save_safetensors

    r = check_recipe(recipe)
    meta = {
        "widths": json.dumps(list(r["widths"])),
        "input_size": str(int(r["input_size"])),
        "in_channels": str(int(model.features[0].in_channels)),
        "num_classes": str(int(model.head.out_features)),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(path, model.state_dict(), metadata=meta)
    return path


def load_features(model: SmallCNN, init: str | os.PathLike, recipe: Mapping[str, Any]) -> None:
    """Transfer: ``model``'s feature layers from the classifier saved at ``init`` (same recipe: widths,
    input size and channels must match); its head stays the freshly initialised one."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(init)
    require(
        path.is_file(),
        f"`classifier.init` = {str(init)!r} is not a file; give a classifier saved with "
        "imgaug_gen.metrics.downstream.save_classifier (or `classifier.init: {classes: [...]}` in "
        "evaluate.py to train one).",
    )
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    want = {
        "widths": json.dumps(list(recipe["widths"])),
        "input_size": str(int(recipe["input_size"])),
        "in_channels": str(int(model.features[0].in_channels)),
    }
    for k, v in want.items():
        require(
            meta.get(k) == v,
            f"`classifier.init` = {str(init)!r} was trained with {k}={meta.get(k)!r}; this "
            f"recipe has {k}={v}. Train the init with the same classifier recipe and channels.",
        )
    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    require(
        not unexpected and set(missing) == {"head.weight", "head.bias"},
        f"`classifier.init` = {str(init)!r} does not hold this recipe's network (missing {missing[:3]}, "
        f"unexpected {unexpected[:3]}).",
    )


def predict_logits(model: nn.Module, images: np.ndarray, input_size: int | None = None) -> torch.Tensor:
    """Logits ``[N, K]`` of a :func:`train_and_test` model (``return_model=True``) on uint8 images."""
    images = validate_images(images)
    channels = model.features[0].in_channels
    x = _prepare(images, channels, int(input_size or RECIPE["input_size"]))
    model.eval()
    with torch.no_grad():
        return torch.cat([model(b) for b in x.split(512)]) if len(x) else torch.zeros(0, model.head.out_features)


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
        require(
            isinstance(pair, (tuple, list)) and len(pair) == 2, f"`methods[{name!r}]` must be an (images, labels) pair."
        )
        images, labels = pair
        accs = [
            float(train_and_test(images, labels, test_images, test_labels, num_classes, int(s), **recipe))
            for s in seeds
        ]
        out[name] = {**summarise_accuracies(accs, seeds), "n_train": int(np.asarray(images).shape[0])}
    return out


def summarise_accuracies(accs: Sequence[float], seeds: Sequence[int]) -> dict[str, Any]:
    """``{"mean", "std", "accs", "seeds"}`` of per-seed accuracies (``std``: sample std, 0 for one seed)."""
    accs = [float(a) for a in accs]
    return {
        "mean": float(np.mean(accs)),
        "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
        "accs": accs,
        "seeds": [int(s) for s in seeds],
    }
