"""The contract every generator kind follows, and the registry of kinds.

A generator is what training leaves behind in ``RUN/generator/`` and what
``generate.py`` loads: a plain ``nn.Module`` that turns class labels and
per-image seeds into uint8 images. It is saved as ``config.json`` plus
``*.safetensors`` files, so loading it never executes pickled code, and it is
loaded through :func:`load_generator`, which reads ``kind`` from the config and
dispatches to the registered class. Adding a kind is one decorated class; the
front ends never name kinds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from imgaug_gen.errors import ConfigError

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

_REGISTRY: dict[str, type["ConditionalGenerator"]] = {}
#: Package entry-point group naming each kind's generator class (``kind = "module:Class"``). The
#: built-in kinds are declared in pyproject.toml like any plug-in, and imported only when a folder of
#: that kind is loaded, so ``import imgaug_gen`` stays cheap (no diffusers import for a GAN).
ENTRY_POINT_GROUP = "imgaug_gen.generators"


def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def register_generator(kind: str):
    """Class decorator: make ``kind`` loadable by :func:`load_generator`."""

    def wrap(cls):
        cls.kind = kind
        _REGISTRY[kind] = cls
        return cls

    return wrap


def generator_class(kind: str) -> type["ConditionalGenerator"]:
    """The class of ``kind``: registered in this process, or declared under the entry-point group
    ``imgaug_gen.generators`` by an installed package (imported then; it must register ``kind``)."""
    if kind not in _REGISTRY:
        eps = _entry_points()
        if kind in eps:
            cls = eps[kind].load()
            if _REGISTRY.get(kind) is not cls:
                raise ConfigError(f"the entry point `{kind} = {eps[kind].value}` ({ENTRY_POINT_GROUP}) does not name a "
                                  f"class registered as `{kind}`; decorate it with @register_generator({kind!r}).")
        else:
            known = sorted(set(_REGISTRY) | set(eps))
            raise ConfigError(f"Unknown generator kind `{kind}`; known kinds: {known}. A plug-in kind must be "
                              f"installed with an entry point in the `{ENTRY_POINT_GROUP}` group.")
    return _REGISTRY[kind]


def per_image_seeds(seed: int, start: int, count: int) -> list[int]:
    """The seed of image ``i`` of a job seeded ``seed``: independent of batching,
    sharding and resumption, so image ``i`` is the same whoever makes it."""
    return [int(np.random.SeedSequence([int(seed), i]).generate_state(1, np.uint32)[0])
            for i in range(start, start + count)]


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] float NCHW -> uint8 NHWC (round to nearest)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def from_uint8_nhwc(images: np.ndarray, device=None) -> torch.Tensor:
    """uint8 NHWC -> [-1, 1] float NCHW."""
    t = torch.as_tensor(np.ascontiguousarray(images), device=device)
    return t.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def read_run_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``generator/config.json`` (kind, format version)."""
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        hint = ""
        if (path / "generator" / CONFIG_NAME).is_file():
            hint = f" Did you mean the run's generator folder `{path / 'generator'}`?"
        raise ConfigError(
            f"`{path}` holds no saved generator (no {CONFIG_NAME}).{hint} Pass the folder written by "
            "train.py (`run_dir=RUN`, which contains `RUN/generator/`)."
        )
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"`{cfg_file}` is not valid JSON ({e}); the run folder is damaged.") from e
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ConfigError(
            f"`{cfg_file}` has format_version={version!r}, this imgaug_gen reads versions <= "
            f"{FORMAT_VERSION}. Upgrade imgaug_gen to load it."
        )
    if "kind" not in config:
        raise ConfigError(f"`{cfg_file}` names no generator `kind`; the run folder is damaged.")
    return config


def load_generator(path: str | os.PathLike, device: str | torch.device = "cpu",
                   expect_kind: str | None = None) -> "ConditionalGenerator":
    """Load any saved generator kind from ``path`` (a ``RUN/generator`` folder)."""
    config = read_run_config(path)
    if expect_kind is not None and config["kind"] != expect_kind:
        raise ConfigError(f"`{path}` holds a `{config['kind']}` generator, not `{expect_kind}`.")
    cls = generator_class(config["kind"])
    return cls.from_pretrained(path, device=device)


class ConditionalGenerator(nn.Module):
    """Base class: ``sample`` (noise -> images) and optionally ``edit`` (img2img).

    Subclasses set ``self.config`` (a JSON-able dict holding at least
    ``num_classes``, ``class_names`` and ``image_shape`` = (C, H, W)) and
    implement :meth:`_sample_batch` (and :meth:`_edit_batch` if they can edit).
    """

    kind: ClassVar[str] = "base"
    supports_edit: ClassVar[bool] = False
    #: the keyword options ``sample`` / ``edit`` accept (generate.py's ``sample_kwargs``); any other is refused
    sample_kwargs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = dict(config)

    # -- facts ---------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return int(self.config["num_classes"])

    @property
    def class_names(self) -> list[str]:
        return list(self.config["class_names"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.config["image_shape"])

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    # -- the contract ----------------------------------------------------------
    def _check_labels(self, labels: Sequence[int]) -> torch.Tensor:
        labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        if labels.ndim != 1:
            raise ConfigError(f"`labels` must be 1-D, got shape {tuple(labels.shape)}.")
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ConfigError(
                f"`labels` must lie in [0, {self.num_classes - 1}] for this generator "
                f"({self.class_names}); got min={int(labels.min())}, max={int(labels.max())}."
            )
        return labels

    @staticmethod
    def _check_seeds(seeds, n: int) -> list[int]:
        if isinstance(seeds, (int, np.integer)):
            return per_image_seeds(int(seeds), 0, n)
        seeds = [int(s) for s in seeds]
        if len(seeds) != n:
            raise ConfigError(f"`seeds` has {len(seeds)} entries for {n} labels; give one per image or one int.")
        return seeds

    @torch.no_grad()
    def sample(self, labels: Sequence[int], seeds: int | Sequence[int] = 0,
               batch_size: int = 64, **kwargs) -> np.ndarray:
        """Images for ``labels``: uint8 [N, H, W, C].

        ``seeds`` is one seed per image (or an int from which per-image seeds are
        derived); image ``i`` depends only on its label and its seed, not on the
        batch it is made in.
        """
        self._check_sample_kwargs(kwargs)
        labels = self._check_labels(labels)
        seeds = self._check_seeds(seeds, len(labels))
        was_training = self.training
        self.eval()
        try:
            out = [self._sample_batch(labels[i:i + batch_size].to(self.device),
                                      seeds[i:i + batch_size], **kwargs)
                   for i in range(0, len(labels), batch_size)]
        finally:
            self.train(was_training)
        c, h, w = self.image_shape
        return np.concatenate(out) if out else np.zeros((0, h, w, c), np.uint8)

    @torch.no_grad()
    def edit(self, images: np.ndarray, labels: Sequence[int], strength: float | Sequence[float] = 0.5,
             seeds: int | Sequence[int] = 0, batch_size: int = 32, **kwargs) -> np.ndarray:
        """img2img: a label-preserving edit of each real image (uint8 NHWC in and out).

        ``strength`` in (0, 1]: how far the image is noised before it is denoised
        with its class label (SDEdit); one value or one per image.
        """
        if not self.supports_edit:
            raise ConfigError(
                f"`mode=img2img` needs a generator that can edit images; a `{self.kind}` generator "
                "cannot. Use `mode=sample`, or train `model=ddpm` or `model=sd_lora`."
            )
        labels = self._check_labels(labels)
        images = np.asarray(images)
        c, h, w = self.image_shape
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != len(labels):
            raise ConfigError(f"`images` must be uint8 [N,H,W,C] with N={len(labels)}; got "
                              f"{images.dtype} {images.shape}.")
        strengths = np.broadcast_to(np.asarray(strength, dtype=np.float64), (len(labels),))
        if len(strengths) and (strengths.min() <= 0 or strengths.max() > 1):
            raise ConfigError(f"`strength` must lie in (0, 1]; got {strengths.min()}..{strengths.max()}.")
        seeds = self._check_seeds(seeds, len(labels))
        self._check_sample_kwargs(kwargs)
        was_training = self.training
        self.eval()
        try:
            out = [self._edit_batch(images[i:i + batch_size], labels[i:i + batch_size].to(self.device),
                                    strengths[i:i + batch_size].tolist(), seeds[i:i + batch_size], **kwargs)
                   for i in range(0, len(labels), batch_size)]
        finally:
            self.train(was_training)
        return np.concatenate(out) if out else np.zeros((0, h, w, c), np.uint8)

    def prompt_for(self, label: int) -> str | None:
        """The text prompt of class ``label`` for prompt-conditioned kinds (recorded in the manifest); None here."""
        return None

    def _check_sample_kwargs(self, kwargs: Mapping[str, Any]) -> None:
        unknown = sorted(set(kwargs) - set(self.sample_kwargs))
        if unknown:
            raise ConfigError(f"`sample_kwargs` has unknown keys {unknown} for a `{self.kind}` generator; allowed: "
                              f"{list(self.sample_kwargs)} (remove the others).")

    def _sample_batch(self, labels: torch.Tensor, seeds: list[int], **kwargs) -> np.ndarray:
        raise NotImplementedError

    def _edit_batch(self, images: np.ndarray, labels: torch.Tensor, strengths: list[float],
                    seeds: list[int], **kwargs) -> np.ndarray:
        raise NotImplementedError

    # -- persistence -------------------------------------------------------------
    def full_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "format_version": FORMAT_VERSION, **self.config}

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` atomically into ``path``."""
        from imgaug_gen.io import atomic_write_json, atomic_save_safetensors

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._save_weights(path)
        atomic_write_json(path / CONFIG_NAME, self.full_config())
        return path

    def _save_weights(self, path: Path) -> None:
        from imgaug_gen.io import atomic_save_safetensors

        atomic_save_safetensors(path / WEIGHTS_NAME, self.state_dict())

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu"):
        """Load a saved generator of this class (use :func:`load_generator` for any kind)."""
        config = read_run_config(path)
        if config["kind"] != cls.kind:
            raise ConfigError(
                f"`{path}` holds a `{config['kind']}` generator; load it with "
                f"`imgaug_gen.load_generator` (or the `{config['kind']}` class), not `{cls.__name__}`."
            )
        config = {k: v for k, v in config.items() if k not in ("kind", "format_version")}
        model = cls._build(config, Path(path))
        return model.to(device).eval()

    @classmethod
    def _build(cls, config: dict[str, Any], path: Path) -> "ConditionalGenerator":
        """Construct from config and load weights from ``path``."""
        from safetensors.torch import load_file

        model = cls(config)
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise ConfigError(f"`{weights}` is missing; the generator folder is incomplete.")
        model.load_state_dict(load_file(str(weights)))
        return model
