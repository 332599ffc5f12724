"""The ``domain`` feature space: a small CNN classifier trained on the real training images, whose
penultimate activations are the features; its weights are cached on disk by a hash of the images, the
labels and the training recipe, so every run on the same data uses the same features. Also the fixed-step
classifier training loop the downstream recipe shares."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imgaug_gen.errors import require
from imgaug_gen.io import atomic_write_bytes
from imgaug_gen.metrics.features import (
    FeatureExtractor,
    _validate_labels,
    images_to_tensor,
    to_float01,
    validate_images,
)

log = logging.getLogger(__name__)

#: Bump when the domain network or its training recipe changes, so that cached
#: weights trained by older code are not reused.
DOMAIN_CODE_VERSION = "domain-cnn-v1"

#: Training recipe of the domain classifier (part of the cache key).
DEFAULT_DOMAIN_STEPS = 300
DEFAULT_DOMAIN_BATCH_SIZE = 64
DEFAULT_DOMAIN_LR = 3e-3
DEFAULT_DOMAIN_WEIGHT_DECAY = 1e-4
DEFAULT_DOMAIN_MAX_SHIFT = 2
DOMAIN_INPUT_SIZE = 32
DOMAIN_WIDTHS = (32, 64, 128)
DOMAIN_FEATURE_DIM = 128


# --------------------------------------------------------------------------- #
# Domain features: a small CNN trained on the real images
# --------------------------------------------------------------------------- #
class DomainFeatures(FeatureExtractor):
    """Small CNN classifier whose penultimate activations are the features.

    Inputs are converted to the training channel count (``in_channels``: 1->3
    replication or RGB->luminance) and resized to ``input_size`` (bilinear,
    antialiased) inside the module, so any uint8 image size works.

    Attributes set by :func:`fit_domain_features`: ``cache_key`` (content
    hash), ``loaded_from_cache`` (True when the weights came from disk),
    ``train_accuracy``.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        input_size: int = DOMAIN_INPUT_SIZE,
        widths: tuple[int, ...] = DOMAIN_WIDTHS,
        feature_dim: int = DOMAIN_FEATURE_DIM,
    ) -> None:
        super().__init__()
        require(in_channels in (1, 3), f"`in_channels` must be 1 or 3, got {in_channels!r}.")
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.input_size = int(input_size)
        self.widths = tuple(int(w) for w in widths)
        self.num_features = int(feature_dim)
        self.name = f"domain-cnn-{self.num_features}"
        self.cache_key: str | None = None
        self.loaded_from_cache = False
        self.train_accuracy: float | None = None

        blocks: list[nn.Module] = []
        c_in = self.in_channels
        for i, w in enumerate(self.widths):
            blocks += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i < len(self.widths) - 1:
                blocks.append(nn.MaxPool2d(2))
            c_in = w
        self.body = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(c_in, self.num_features), nn.ReLU(inplace=True))
        self.head = nn.Linear(self.num_features, self.num_classes)

    def config(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "input_size": self.input_size,
            "widths": list(self.widths),
            "feature_dim": self.num_features,
        }

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, C, H, W]`` -> normalised float input of the network."""
        return (to_float01(x, self.in_channels, self.input_size) - 0.5) / 0.5

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.body(x))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._embed(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._embed(self.preprocess(x))

    @torch.no_grad()
    def predict_proba(self, images_nhwc: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Class probabilities ``[N, num_classes]`` (float32) of uint8 images ``[N, H, W, C]``."""
        x = images_to_tensor(images_nhwc)
        out = []
        for i in range(0, x.shape[0], batch_size):
            logits = self._logits(self.preprocess(x[i : i + batch_size].to(self.device)))
            out.append(torch.softmax(logits.float(), dim=-1).cpu())
        return torch.cat(out).numpy()


def _random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by an integer offset in [-max_shift, max_shift] (zero/background fill)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    # inputs are normalised to [-1, 1]: pad with the border value -1 (black background).
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    offs = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offs.tolist())])


def fit_classifier_steps(
    logits_fn,
    params,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    max_shift: int,
    label_smoothing: float,
    gen: torch.Generator,
    batches=None,
    loss_fn=None,
) -> None:
    """The fixed recipe shared by the feature network and the downstream classifier: AdamW with a
    one-cycle schedule for ``steps`` steps over reshuffled batches, random shifts, label smoothing.
    All randomness comes from ``gen``. ``params`` may be parameter groups with their own ``lr`` (peak).

    ``batches(step) -> index tensor`` replaces the reshuffled batches (a consumption policy's
    sampler), and ``loss_fn(logits, idx) -> loss`` the label-smoothed cross-entropy."""
    n = x.shape[0]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    peaks = [g["lr"] for g in opt.param_groups]  # parameter groups may set their own peak
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=peaks, total_steps=steps, pct_start=0.15)
    perm, pos = torch.randperm(n, generator=gen), 0
    for step in range(steps):
        if batches is not None:
            idx = batches(step)
        else:
            if pos + batch_size > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            idx = perm[pos : pos + batch_size]
            pos += batch_size
        if len(idx) == 1:  # BatchNorm needs 2 samples: duplicate
            idx = idx.repeat(2)
        logits = logits_fn(_random_shift(x[idx], max_shift, gen))
        loss = (
            F.cross_entropy(logits, y[idx], label_smoothing=label_smoothing)
            if loss_fn is None
            else loss_fn(logits, idx)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def _train_domain_classifier(
    model: DomainFeatures,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    seed: int,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    max_shift: int,
) -> float:
    """Train ``model`` in place (fixed seed, fixed steps); return its accuracy on the training set."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x_all = torch.cat([model.preprocess(b) for b in images_to_tensor(images).split(512)])
    y_all = torch.from_numpy(labels)
    n = x_all.shape[0]
    bs = min(batch_size, n)
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    # The extractor's own train() is pinned to eval; switch the layers directly.
    for m in model.modules():
        nn.Module.train(m, True)
    fit_classifier_steps(
        model._logits,
        params,
        x_all,
        y_all,
        steps=steps,
        batch_size=bs,
        lr=lr,
        weight_decay=weight_decay,
        max_shift=max_shift,
        label_smoothing=0.05,
        gen=gen,
    )
    model._freeze()
    with torch.no_grad():
        pred = torch.cat([model._logits(b).argmax(-1) for b in x_all.split(512)])
    return float((pred == y_all).float().mean())


def _domain_cache_key(images: np.ndarray, labels: np.ndarray, recipe: Mapping[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(DOMAIN_CODE_VERSION.encode())
    h.update(json.dumps(dict(recipe), sort_keys=True).encode())
    h.update(f"{images.shape}|{images.dtype}".encode())
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def _save_domain(model: DomainFeatures, cache_dir: Path, key: str, meta: dict[str, Any]) -> None:
    from safetensors.torch import save

    cache_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # weights first, then the json: a present json means a complete entry.
    atomic_write_bytes(cache_dir / f"{key}.safetensors", save(tensors, metadata={"key": key}))
    atomic_write_bytes(cache_dir / f"{key}.json", json.dumps(meta, indent=2, sort_keys=True).encode())


def _load_domain(cache_dir: Path, key: str) -> DomainFeatures | None:
    from safetensors.torch import load_file

    meta_path, weights_path = cache_dir / f"{key}.json", cache_dir / f"{key}.safetensors"
    if not (meta_path.is_file() and weights_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        cfg = meta["config"]
        model = DomainFeatures(
            num_classes=cfg["num_classes"],
            in_channels=cfg["in_channels"],
            input_size=cfg["input_size"],
            widths=tuple(cfg["widths"]),
            feature_dim=cfg["feature_dim"],
        )
        model.load_state_dict(load_file(str(weights_path)), strict=True)
    except Exception:  # a corrupt or stale entry: retrain and overwrite it
        return None
    model._freeze()
    model.cache_key = key
    model.loaded_from_cache = True
    model.train_accuracy = meta.get("train_accuracy")
    return model


def _domain_recipe(
    images: np.ndarray,
    num_classes: int,
    seed: int,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    max_shift: int,
) -> dict[str, Any]:
    """The network config and training recipe of the domain classifier (part of the cache key)."""
    arch = {
        "num_classes": int(num_classes),
        "in_channels": int(images.shape[-1]),
        "input_size": DOMAIN_INPUT_SIZE,
        "widths": list(DOMAIN_WIDTHS),
        "feature_dim": DOMAIN_FEATURE_DIM,
    }
    return {
        **arch,
        "seed": int(seed),
        "steps": int(steps),
        "batch_size": int(batch_size),
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "max_shift": int(max_shift),
    }


def _save_and_reload(
    model: DomainFeatures, cache_path: Path, key: str, recipe: dict[str, Any], images: np.ndarray, t0: float
) -> DomainFeatures:
    """Write a freshly trained network to the cache and return it as a later cache hit builds it."""
    meta = {
        "key": key,
        "code_version": DOMAIN_CODE_VERSION,
        "name": model.name,
        "config": model.config(),
        "recipe": recipe,
        "n_images": int(images.shape[0]),
        "image_shape": list(images.shape[1:]),
        "train_accuracy": model.train_accuracy,
        "train_seconds": round(time.perf_counter() - t0, 3),
    }
    _save_domain(model, cache_path, key, meta)
    # Return the network exactly as a later cache hit builds it: a freshly trained module can
    # differ from the reloaded one in the last float bits (parameter memory layout), and per-image
    # scores of a resumed job must equal those of an uninterrupted one.
    reloaded = _load_domain(cache_path, key)
    if reloaded is not None:
        reloaded.loaded_from_cache = False
        return reloaded
    return model


def fit_domain_features(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    cache_dir: str | os.PathLike | None,
    seed: int = 0,
    steps: int = DEFAULT_DOMAIN_STEPS,
    *,
    batch_size: int = DEFAULT_DOMAIN_BATCH_SIZE,
    lr: float = DEFAULT_DOMAIN_LR,
    weight_decay: float = DEFAULT_DOMAIN_WEIGHT_DECAY,
    max_shift: int = DEFAULT_DOMAIN_MAX_SHIFT,
) -> DomainFeatures:
    """Train (or load from ``cache_dir``) the domain feature network on real images.

    The cache key is the sha256 of the image bytes and shape, the labels, the
    training recipe and :data:`DOMAIN_CODE_VERSION`; entries are
    ``<key>.safetensors`` (weights) + ``<key>.json`` (network config, recipe,
    train accuracy), each written to a temporary name and renamed. A hit loads
    without training (``model.loaded_from_cache`` is True). ``cache_dir=None``
    disables the disk cache. Training is deterministic for a given seed.
    """
    images = validate_images(images)
    labels = _validate_labels(labels, images.shape[0], num_classes)
    require(isinstance(steps, int) and steps > 0, f"`metrics.domain_steps` must be a positive int, got {steps!r}.")
    require(
        images.shape[0] >= 2, f"`images` needs at least 2 images to train the domain features, got {images.shape[0]}."
    )
    recipe = _domain_recipe(images, num_classes, seed, steps, batch_size, lr, weight_decay, max_shift)
    key = _domain_cache_key(images, labels, recipe)
    cache_path = Path(cache_dir).expanduser() / "domain_features" if cache_dir is not None else None
    if cache_path is not None:
        hit = _load_domain(cache_path, key)
        if hit is not None:
            return hit

    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DomainFeatures(num_classes=num_classes, in_channels=recipe["in_channels"])
        acc = _train_domain_classifier(
            model,
            images,
            labels,
            seed=seed,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            max_shift=max_shift,
        )
    model.cache_key = key
    model.loaded_from_cache = False
    model.train_accuracy = acc
    log.info(
        "domain feature network trained: %d images, %d steps, %.1f s, train accuracy %.3f%s",
        images.shape[0],
        steps,
        time.perf_counter() - t0,
        acc,
        f"; cached in {cache_path}" if cache_path is not None else "",
    )
    if cache_path is not None:
        return _save_and_reload(model, cache_path, key, recipe, images, t0)
    return model
