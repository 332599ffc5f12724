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

import contextlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Mapping, Optional, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from imgaug_gen.errors import BUILD_ERRORS, ConfigError
from imgaug_gen.generators.seeds import per_image_seeds, seeds_at  # noqa: F401  (the contract's seeds)
from imgaug_gen.registry import KindRegistry

#: 2: the training data is recorded as a data kind (``{"kind", "args"}``); format 1 named a Hydra
#: ``_target_`` there, which is never called from a loaded file (``python -m imgaug_gen.upgrade RUN``).
FORMAT_VERSION = 2
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: a generator's config.json is small; a larger file is refused before it is parsed
MAX_CONFIG_BYTES = 16 * 2**20
#: format-1 ``data._target_`` values that ``python -m imgaug_gen.upgrade`` rewrites as data kinds
LEGACY_DATA_TARGETS = {
    "imgaug_gen.data.DigitsDataModule": "digits",
    "imgaug_gen.data.digits.DigitsDataModule": "digits",
    "imgaug_gen.data.LabeledFolderDataModule": "folder",
    "imgaug_gen.data.folder.LabeledFolderDataModule": "folder",
}


# -- what a generator folder's config.json may hold ------------------------------------------------
Int = Annotated[int, Field(ge=0, le=2**53)]


class DataRecord(BaseModel):
    """The data a run trained on: a registered data kind and its arguments (``imgaug_gen.data.kinds``)."""

    model_config = ConfigDict(extra="forbid")
    kind: str = Field(min_length=1, max_length=200)
    args: dict[str, Any]


class GeneratorConfig(BaseModel):
    """The keys every kind's config.json holds. A kind's ``config_schema`` adds its own; the built-in
    kinds refuse any other key (a plug-in kind that declares no schema gets this one, open)."""

    model_config = ConfigDict(extra="allow")
    kind: str = Field(min_length=1, max_length=200)
    format_version: int = Field(ge=1, le=FORMAT_VERSION)
    num_classes: int = Field(ge=1, le=100_000)
    class_names: list[Annotated[str, Field(min_length=1, max_length=1000)]]
    image_shape: tuple[
        Annotated[int, Field(ge=1, le=4)], Annotated[int, Field(ge=1, le=16384)], Annotated[int, Field(ge=1, le=16384)]
    ]
    data: Optional[DataRecord] = None
    run_dir: Optional[str] = None
    trained_steps: Optional[Int] = None

    @model_validator(mode="after")
    def _classes(self):
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"`class_names` has {len(self.class_names)} names for num_classes={self.num_classes}")
        from imgaug_gen.io import unique_class_dirs

        try:
            unique_class_dirs(self.class_names, "`class_names`")
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return self


class StrictGeneratorConfig(GeneratorConfig):
    model_config = ConfigDict(extra="forbid")


def _find_targets(value: Any, where: str = "") -> list[tuple[str, Any]]:
    """Every ``_target_`` key in a JSON value, with its path."""
    found = []
    if isinstance(value, Mapping):
        for k, v in value.items():
            path = f"{where}.{k}" if where else str(k)
            if k == "_target_":
                found.append((path, v))
            else:
                found += _find_targets(v, path)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _find_targets(v, f"{where}[{i}]")
    return found


#: Package entry-point group naming each kind's generator class (``kind = "module:Class"``). The
#: built-in kinds are declared in pyproject.toml like any plug-in, and imported only when a folder of
#: that kind is loaded, so ``import imgaug_gen`` stays cheap (no diffusers import for a GAN).
ENTRY_POINT_GROUP = "imgaug_gen.generators"
KINDS = KindRegistry(ENTRY_POINT_GROUP, "kind", "generator kind", "register_generator")


def register_generator(kind: str):
    """Class decorator: make ``kind`` loadable by :func:`load_generator`."""
    return KINDS.register(kind)


def generator_class(kind: str) -> type["ConditionalGenerator"]:
    """The class of ``kind``: registered in this process, or declared under the entry-point group
    ``imgaug_gen.generators`` by an installed package (imported then; it must register ``kind``)."""
    return KINDS.get(kind)


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
    if cfg_file.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"`{cfg_file}` is {cfg_file.stat().st_size} bytes; a generator config is at most "
            f"{MAX_CONFIG_BYTES} bytes. The folder is damaged or not a generator folder."
        )
    try:
        config = json.loads(cfg_file.read_bytes())
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, or nesting too deep
        raise ConfigError(
            f"`{cfg_file}` is not valid JSON ({type(e).__name__}: {str(e)[:200]}); the run folder is damaged."
        ) from None
    if not isinstance(config, dict):
        raise ConfigError(
            f"`{cfg_file}` holds a JSON {type(config).__name__}, not an object; the run folder is damaged."
        )
    version = config.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise ConfigError(
            f"`{cfg_file}` has format_version={version!r}, this imgaug_gen reads versions <= "
            f"{FORMAT_VERSION}. Upgrade imgaug_gen to load it."
        )
    targets = _find_targets(config)
    if targets:
        key, value = targets[0]
        legacy = key == "data._target_" and value in LEGACY_DATA_TARGETS and version == 1
        hint = (
            f" It was written by an older imgaug_gen; upgrade it once with `python -m imgaug_gen.upgrade {path}`."
            if legacy
            else " Remove it: only your own command-line configs may name classes to build."
        )
        raise ConfigError(
            f"`{cfg_file}`: `{key}` = {str(value)[:200]!r}. A generator folder is data and is never "
            f"allowed to name code to run (Hydra `_target_`).{hint}"
        )
    if not isinstance(config.get("kind"), str):
        raise ConfigError(f"`{cfg_file}` names no generator `kind`; the run folder is damaged.")
    from imgaug_gen.schemas import validate

    validate(config, GeneratorConfig, "generator", source=str(cfg_file))
    return config


def load_generator(
    path: str | os.PathLike, device: str | torch.device = "cpu", expect_kind: str | None = None
) -> "ConditionalGenerator":
    """Load any saved generator kind from ``path`` (a ``RUN/generator`` folder)."""
    config = read_run_config(path)
    if expect_kind is not None and config["kind"] != expect_kind:
        raise ConfigError(f"`{path}` holds a `{config['kind']}` generator, not `{expect_kind}`.")
    cls = generator_class(config["kind"])
    return cls.from_pretrained(path, device=device)


def safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes in a safetensors file, read from its header alone (no tensor
    data is read): what a config must build before the weights are loaded."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= min(100 * 2**20, path.stat().st_size - 8):
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
        return {k: tuple(int(d) for d in v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise ConfigError(
            f"`{path}` is not a valid safetensors file ({type(e).__name__}: {e}); the generator folder is damaged."
        ) from None


def check_state_matches(module: nn.Module, shapes: Mapping[str, tuple[int, ...]], weights: Path) -> None:
    """The module built from config.json must have exactly the weight file's tensors and shapes."""
    mine = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing, unexpected = sorted(set(mine) - set(shapes)), sorted(set(shapes) - set(mine))
    wrong = sorted(k for k in set(mine) & set(shapes) if mine[k] != shapes[k])
    if missing or unexpected or wrong:
        detail = (
            f"missing {missing[:3]}"
            if missing
            else f"unexpected {unexpected[:3]}"
            if unexpected
            else f"{wrong[0]}: config.json builds {mine[wrong[0]]}, the file holds {shapes[wrong[0]]}"
        )
        raise ConfigError(
            f"`{weights}` does not match `{weights.parent / CONFIG_NAME}` ({detail}); the generator "
            "folder was edited or is damaged."
        )


class ConditionalGenerator(nn.Module):
    """Base class: ``sample`` (noise -> images) and optionally ``edit`` (img2img).

    Subclasses set ``self.config`` (a JSON-able dict holding at least
    ``num_classes``, ``class_names`` and ``image_shape`` = (C, H, W)) and
    implement :meth:`_sample_batch` (and :meth:`_edit_batch` if they can edit).
    """

    kind: ClassVar[str] = "base"
    #: the keys of this kind's config.json (checked before anything is built from it)
    config_schema: ClassVar[type[BaseModel]] = GeneratorConfig
    supports_edit: ClassVar[bool] = False
    #: ``sample`` / ``edit`` may run on several threads at once (no state shared between calls but the
    #: weights, read only); generate.py then renders several batches at once on a CPU device
    concurrent_sampling: ClassVar[bool] = False
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

    @contextlib.contextmanager
    def _eval_mode(self):
        """Every submodule in eval mode inside, each back in its own mode after. Only the modules in training
        mode are switched (``Module.eval()`` walks and re-sets every module, twice per call, which costs
        more than a small generator's batch)."""
        training = [m for m in self.modules() if m.training]
        for m in training:
            m.training = False
        try:
            yield
        finally:
            for m in training:
                m.training = True

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
    def sample(
        self, labels: Sequence[int], seeds: int | Sequence[int] = 0, batch_size: int = 64, **kwargs
    ) -> np.ndarray:
        """Images for ``labels``: uint8 [N, H, W, C].

        ``seeds`` is one seed per image (or an int from which per-image seeds are
        derived); image ``i`` depends only on its label and its seed, not on the
        batch it is made in.
        """
        self._check_sample_kwargs(kwargs)
        labels = self._check_labels(labels)
        seeds = self._check_seeds(seeds, len(labels))
        with self._eval_mode():
            out = [
                self._sample_batch(labels[i : i + batch_size].to(self.device), seeds[i : i + batch_size], **kwargs)
                for i in range(0, len(labels), batch_size)
            ]
        c, h, w = self.image_shape
        return np.concatenate(out) if out else np.zeros((0, h, w, c), np.uint8)

    @torch.no_grad()
    def edit(
        self,
        images: np.ndarray,
        labels: Sequence[int],
        strength: float | Sequence[float] = 0.5,
        seeds: int | Sequence[int] = 0,
        batch_size: int = 32,
        **kwargs,
    ) -> np.ndarray:
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
            raise ConfigError(
                f"`images` must be uint8 [N,H,W,C] with N={len(labels)}; got {images.dtype} {images.shape}."
            )
        strengths = np.broadcast_to(np.asarray(strength, dtype=np.float64), (len(labels),))
        if len(strengths) and (strengths.min() <= 0 or strengths.max() > 1):
            raise ConfigError(f"`strength` must lie in (0, 1]; got {strengths.min()}..{strengths.max()}.")
        seeds = self._check_seeds(seeds, len(labels))
        self._check_sample_kwargs(kwargs)
        with self._eval_mode():
            out = [
                self._edit_batch(
                    images[i : i + batch_size],
                    labels[i : i + batch_size].to(self.device),
                    strengths[i : i + batch_size].tolist(),
                    seeds[i : i + batch_size],
                    **kwargs,
                )
                for i in range(0, len(labels), batch_size)
            ]
        return np.concatenate(out) if out else np.zeros((0, h, w, c), np.uint8)

    def prompt_for(self, label: int) -> str | None:
        """The text prompt of class ``label`` for prompt-conditioned kinds (recorded in the manifest); None here."""
        return None

    def _check_sample_kwargs(self, kwargs: Mapping[str, Any]) -> None:
        unknown = sorted(set(kwargs) - set(self.sample_kwargs))
        if unknown:
            raise ConfigError(
                f"`sample_kwargs` has unknown keys {unknown} for a `{self.kind}` generator; allowed: "
                f"{list(self.sample_kwargs)} (remove the others)."
            )

    def check_runs(self) -> None:
        """Run the network once on a batch of one (called on the meta device while loading, so a config
        that builds a network that cannot run is refused at load time, not at the first sample).
        Kinds override it; the default checks nothing."""

    def _sample_batch(self, labels: torch.Tensor, seeds: list[int], **kwargs) -> np.ndarray:
        raise NotImplementedError

    def _edit_batch(
        self, images: np.ndarray, labels: torch.Tensor, strengths: list[float], seeds: list[int], **kwargs
    ) -> np.ndarray:
        raise NotImplementedError

    # -- persistence -------------------------------------------------------------
    def full_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "format_version": FORMAT_VERSION, **self.config}

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` atomically into ``path``."""
        from imgaug_gen.io import atomic_write_json

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
        from imgaug_gen.schemas import validate

        config = read_run_config(path)
        if config["kind"] != cls.kind:
            raise ConfigError(
                f"`{path}` holds a `{config['kind']}` generator; load it with "
                f"`imgaug_gen.load_generator` (or the `{config['kind']}` class), not `{cls.__name__}`."
            )
        cfg_file = Path(path) / CONFIG_NAME
        validate(config, cls.config_schema, f"{cls.kind} generator", source=str(cfg_file))
        config = {k: v for k, v in config.items() if k not in ("kind", "format_version")}
        try:
            model = cls._build(config, Path(path))
        except ConfigError:
            raise
        except BUILD_ERRORS as e:  # a value the schema let through that the kind refuses
            raise ConfigError(
                f"`{cfg_file}` does not describe a loadable `{cls.kind}` generator "
                f"({type(e).__name__}: {str(e)[:300]}); the folder was edited or is damaged."
            ) from None
        return model.to(device).eval()

    @classmethod
    def _build(cls, config: dict[str, Any], path: Path) -> "ConditionalGenerator":
        """Construct from config and load weights from ``path``: the network is first built on the
        meta device (no memory) and checked against the weight file's header, so a config that names
        a huge or different network is refused before anything is allocated."""
        from safetensors.torch import load_file

        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise ConfigError(f"`{weights}` is missing; the generator folder is incomplete.")
        shapes = safetensors_shapes(weights)
        with torch.device("meta"):
            probe = cls(config)
            check_state_matches(probe, shapes, weights)
            probe.check_runs()  # one forward of the network on meta tensors: shapes only, no memory
        model = cls(config)
        model.load_state_dict(load_file(str(weights)))
        return model
