"""Feature extractors for the fidelity metrics (FID / KID).

Every extractor is a :class:`FeatureExtractor`: an ``nn.Module`` that takes
``uint8`` images ``[N, C, H, W]`` (``C`` = 1 or 3, values 0..255, any size) and
returns ``float32`` features ``[N, num_features]``. That is the contract of a
custom ``feature`` module in torchmetrics' ``FrechetInceptionDistance`` /
``KernelInceptionDistance`` with ``normalize=False``, so an extractor can be
handed to them directly. Extractors are frozen: ``train()`` is a no-op and
their parameters need no gradient.

Four kinds, chosen with ``metrics.features``:

* ``domain`` (the offline default): :class:`~imgaug_gen.metrics.domain.DomainFeatures`, a small CNN
  classifier trained on the real training images by
  :func:`~imgaug_gen.metrics.domain.fit_domain_features`; its 128-d penultimate activations are the
  features. The trained weights are cached on disk by a hash of the data and
  the training recipe, so every run on the same data uses the same features.
* ``inception``, ``dinov2``, ``clip``: pretrained networks from *local* weights
  (``metrics.inception_weights`` / ``dinov2_weights`` / ``clip_weights``), in
  :mod:`imgaug_gen.metrics.pretrained`: the standard FID Inception (scores comparable
  with papers), FD-DINOv2 and FD-CLIP. Nothing is downloaded at run time.

Scores computed with different extractors are not comparable; every result
names its extractor (``FeatureExtractor.name``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imgaug_gen.errors import ConfigError, require

__all__ = ["FEATURE_KINDS", "FeatureExtractor", "build_feature_extractor", "images_to_tensor", "validate_images"]

#: Allowed values of ``metrics.features``.
FEATURE_KINDS = ("domain", "inception", "dinov2", "clip")


# --------------------------------------------------------------------------- #
# Input handling
# --------------------------------------------------------------------------- #
def validate_images(images: Any, name: str = "images") -> np.ndarray:
    """Check that ``images`` is a uint8 array ``[N, H, W, C]`` with ``C`` in (1, 3)."""
    require(
        isinstance(images, np.ndarray),
        f"`{name}` must be a numpy uint8 array [N, H, W, C], got {type(images).__name__}.",
    )
    require(
        images.dtype == np.uint8,
        f"`{name}` must have dtype uint8 (values 0..255), got dtype {images.dtype}; "
        "convert with `(x * 255).round().clip(0, 255).astype(np.uint8)` for floats in [0, 1].",
    )
    require(
        images.ndim == 4 and images.shape[-1] in (1, 3),
        f"`{name}` must have shape [N, H, W, C] with C = 1 or 3, got shape {tuple(images.shape)}.",
    )
    require(images.shape[0] > 0, f"`{name}` is empty (shape {tuple(images.shape)}); pass at least one image.")
    return images


def _validate_labels(labels: Any, n: int, num_classes: int, name: str = "labels") -> np.ndarray:
    require(
        isinstance(num_classes, (int, np.integer)) and num_classes >= 2,
        f"`num_classes` must be an int >= 2, got {num_classes!r}.",
    )
    labels = np.asarray(labels)
    require(
        labels.ndim == 1 and labels.shape[0] == n and np.issubdtype(labels.dtype, np.integer),
        f"`{name}` must be an integer array of shape [{n}] (one label per image), "
        f"got dtype {labels.dtype} and shape {tuple(labels.shape)}.",
    )
    lo, hi = int(labels.min()), int(labels.max())
    require(
        lo >= 0 and hi < num_classes,
        f"`{name}` must lie in [0, {num_classes - 1}] for num_classes={num_classes}, got values in [{lo}, {hi}].",
    )
    return labels.astype(np.int64)


def images_to_tensor(images_nhwc: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, C]`` numpy -> uint8 ``[N, C, H, W]`` tensor (what the extractors take)."""
    images_nhwc = validate_images(images_nhwc)
    return torch.from_numpy(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2).contiguous()


def to_float01(x: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` -> float ``[N, channels, size, size]`` in [0, 1].

    Grayscale inputs are replicated to 3 channels; RGB inputs to a 1-channel
    network are converted to luminance (ITU-R 601 weights).
    """
    if x.dtype != torch.uint8:
        raise ConfigError(
            f"feature extractors take uint8 images [N, C, H, W] with values 0..255, got dtype {x.dtype}; "
            "pass `normalize=False` uint8 tensors (see `imgaug_gen.metrics.images_to_tensor`)."
        )
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ConfigError(f"feature extractors take images [N, C, H, W] with C = 1 or 3, got shape {tuple(x.shape)}.")
    x = x.float() / 255.0
    if x.shape[1] != channels:
        if channels == 3:
            x = x.expand(-1, 3, -1, -1)
        else:
            w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            x = (x * w).sum(dim=1, keepdim=True)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


# --------------------------------------------------------------------------- #
# Base class
# --------------------------------------------------------------------------- #
class FeatureExtractor(nn.Module):
    """uint8 ``[N, C, H, W]`` -> float32 ``[N, num_features]``; frozen, always in eval mode.

    Subclasses set ``name`` and ``num_features`` and implement :meth:`forward`.
    """

    name: str = "feature-extractor"
    num_features: int = 0

    def train(self, mode: bool = True) -> FeatureExtractor:
        # Frozen: BatchNorm/Dropout must never switch to training behaviour,
        # even when a parent module (a torchmetrics Metric, a LightningModule)
        # is put in training mode.
        return super().train(False)

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.train(False)

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @torch.no_grad()
    def features(self, images_uint8_nhwc: np.ndarray, batch_size: int = 256) -> torch.Tensor:
        """Features of uint8 images ``[N, H, W, C]`` as a float32 CPU tensor ``[N, num_features]``."""
        x = images_to_tensor(images_uint8_nhwc)
        require(
            isinstance(batch_size, int) and batch_size > 0, f"`batch_size` must be a positive int, got {batch_size!r}."
        )
        out = [self(x[i : i + batch_size].to(self.device)).float().cpu() for i in range(0, x.shape[0], batch_size)]
        return torch.cat(out, dim=0)

    def fingerprint(self) -> str:
        """sha256 of the name and weights: identifies the feature space (used in cache keys)."""
        cached = getattr(self, "_fingerprint", None)
        if cached is None:
            h = hashlib.sha256(self.name.encode())
            for key, t in sorted(self.state_dict().items()):
                h.update(key.encode())
                h.update(str(tuple(t.shape)).encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
            cached = h.hexdigest()
            self._fingerprint = cached
        return cached


# --------------------------------------------------------------------------- #
# Config dispatch
# --------------------------------------------------------------------------- #
def _as_dict(cfg_like: Any) -> dict[str, Any]:
    if cfg_like is None:
        return {}
    if isinstance(cfg_like, Mapping):
        return dict(cfg_like)
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf ships with hydra
        DictConfig = None  # type: ignore[assignment]
    if DictConfig is not None and isinstance(cfg_like, DictConfig):
        return OmegaConf.to_container(cfg_like, resolve=True)  # type: ignore[return-value]
    raise ConfigError(f"`metrics` must be a mapping (dict or DictConfig), got {type(cfg_like).__name__}.")


def build_feature_extractor(
    cfg_like: Any,
    reference_images: np.ndarray | None = None,
    reference_labels: np.ndarray | None = None,
    num_classes: int | None = None,
) -> FeatureExtractor:
    """Build the extractor named by ``cfg_like["features"]`` (the ``metrics`` config group).

    Keys used: ``features`` (``domain`` | ``inception`` | ``dinov2`` | ``clip``),
    ``inception_weights``, ``dinov2_weights``, ``clip_weights``, ``cache_dir``,
    ``domain_steps``, ``seed``. ``domain`` needs the real reference images, labels
    and ``num_classes`` to train on (or to find its cached weights); the pretrained
    kinds ignore them.
    """
    from imgaug_gen.schemas import Metrics, validate

    cfg = validate(_as_dict(cfg_like), Metrics, "metrics/default", prefix="metrics")
    if cfg.features != "domain":
        from imgaug_gen.metrics import pretrained

        cls = {
            "inception": pretrained.InceptionFeatures,
            "dinov2": pretrained.DINOv2Features,
            "clip": pretrained.CLIPFeatures,
        }[cfg.features]
        return cls(getattr(cfg, f"{cfg.features}_weights"))

    require(
        reference_images is not None and reference_labels is not None and num_classes is not None,
        "`metrics.features=domain` trains its feature network on the real images: pass "
        "`reference_images`, `reference_labels` and `num_classes` to `build_feature_extractor`.",
    )
    from imgaug_gen.metrics.domain import fit_domain_features

    return fit_domain_features(
        reference_images, reference_labels, int(num_classes), cfg.cache_dir, seed=cfg.seed, steps=cfg.domain_steps
    )
