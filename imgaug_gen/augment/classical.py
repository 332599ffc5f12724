"""Classical (albumentations) augmentation, built from config, seeded and recorded.

Config node (``conf/augment/*.yaml``)::

    name: light                 # none | light | strong | custom (informational; `transforms` is what runs)
    apply_to: synthetic         # synthetic: transform the generated images | all: also add augmented copies of reals
    copies_per_image: 1         # apply_to=all: augmented copies of each real image
    transforms:                 # any albumentations transform by class name, with its arguments
      - {name: Affine, p: 0.8, rotate: [-10, 10]}
      - name: OneOf             # OneOf / SomeOf / Sequential nest a `transforms` list
        p: 0.3
        transforms: [{name: GaussianBlur, blur_limit: [3, 3]}, {name: GaussNoise, std_range: [0.02, 0.08]}]

:func:`build_augmenter` returns ``None`` for an empty ``transforms`` list (``augment=none``).
:meth:`Augmenter.apply` takes one uint8 ``[H, W, C]`` image (C = 1 or 3) and a seed and
returns the transformed image (same shape, uint8) and a JSON-serialisable record of what
was applied (``{"seed", "transforms": [{"name", "params"}]}``) for the manifest. The same
seed always gives the same bytes, so :meth:`Augmenter.replay` (or
``Augmenter.from_dict(to_dict()).apply(image, seed)``) reproduces any recorded image.

Seeding: albumentations' ``Compose(seed=s)`` gives *every* transform a generator seeded
with the same ``s``, so all transforms would draw the same numbers (and with equal ``p``
either all or none would fire). Each transform here gets its own seed derived from
``(s, position in the tree)`` instead, so draws are independent yet fully determined by ``s``.

The presets contain no horizontal flip: a mirrored digit (or letter) is a different or
invalid class. Add ``{name: HorizontalFlip, p: 0.5}`` in a custom config for data where
mirroring preserves the label.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from imgaug_gen.errors import ConfigError, require

__all__ = ["APPLY_TO", "Augmenter", "build_augmenter", "to_jsonable"]

#: Allowed values of ``augment.apply_to``.
APPLY_TO = ("synthetic", "all")
#: Transforms that hold a nested ``transforms`` list.
_CONTAINERS = ("OneOf", "SomeOf", "Sequential")
#: Arrays in the recorded params with more elements than this are summarised by their shape
#: (noise maps, elastic displacement fields); they are reproduced from the seed instead.
_MAX_RECORDED_ARRAY = 32
_SEED_SPACE = 2**31 - 1
#: Drawn parameters left out of the record (duplicates of others, or constants of the config).
_UNRECORDED = frozenset({"shape", "bbox_matrix", "matrix_bbox", "fill_mask", "mask_interpolation", "output_shape"})

_FIX = (
    "give `name` as an albumentations transform class (e.g. Affine, RandomBrightnessContrast, "
    "GaussNoise, CoarseDropout; see https://albumentations.ai/docs/) and only that transform's arguments"
)


def _albumentations():
    import albumentations as A

    return A


def to_jsonable(x: Any, digits: int | None = None) -> Any:
    """numpy scalars/arrays, tuples and nested containers -> plain JSON types.

    Arrays with more than 32 elements become ``{"array_shape": [...], "dtype": ...}``;
    with ``digits`` floats are rounded to that many decimals (to keep manifests small).
    """
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v, digits) for v in x]
    if isinstance(x, np.ndarray):
        if x.size > _MAX_RECORDED_ARRAY:
            return {"array_shape": list(x.shape), "dtype": str(x.dtype)}
        return to_jsonable(x.tolist(), digits)
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (np.floating, float)):
        v = float(x)
        if not np.isfinite(v):
            return str(v)
        return round(v, digits) if digits is not None else v
    if x is None or isinstance(x, (int, str)):
        return x
    return repr(x)


def _plain(node: Any) -> Any:
    """DictConfig/ListConfig -> dict/list (resolved); anything else unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(node, (DictConfig, ListConfig)):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return node


def _build_transform(spec: Any, where: str):
    A = _albumentations()
    require(
        isinstance(spec, Mapping) and isinstance(spec.get("name"), str),
        f"`{where}` = {spec!r} must be a mapping with a `name` key, e.g. {{name: Affine, p: 0.5, rotate: [-10, 10]}}.",
    )
    spec = dict(spec)
    name = spec.pop("name")
    cls = getattr(A, name, None)
    is_container = name in _CONTAINERS
    if cls is None or not isinstance(cls, type) or not (is_container or issubclass(cls, A.BasicTransform)):
        import difflib

        known = [n for n in dir(A) if isinstance(getattr(A, n), type) and issubclass(getattr(A, n), A.BasicTransform)]
        close = difflib.get_close_matches(name, known + list(_CONTAINERS), n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise ConfigError(f"`{where}.name` = {name!r} is not an albumentations transform.{hint} Fix: {_FIX}.")
    if is_container:
        children = spec.pop("transforms", None)
        require(
            isinstance(children, Sequence) and not isinstance(children, str) and len(children) > 0,
            f"`{where}` ({name}) needs a non-empty `transforms` list of transforms to choose from.",
        )
        spec["transforms"] = [_build_transform(c, f"{where}.transforms[{j}]") for j, c in enumerate(children)]
    else:
        require(
            "transforms" not in spec,
            f"`{where}` ({name}) takes no `transforms` list; only {list(_CONTAINERS)} nest transforms.",
        )
        spec["strict"] = True  # unknown argument names raise instead of warning
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls(**spec)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - pydantic ValidationError / ValueError / TypeError
        args = {k: v for k, v in spec.items() if k not in ("strict", "transforms")}
        msg = " ".join(str(e).split())
        msg = re.sub(r" ?For further information visit \S+", "", msg).replace("for InitSchema ", "")
        if len(msg) > 600:
            msg = msg[:600] + " ..."
        raise ConfigError(
            f"`{where}` ({name}) has a bad argument: {msg} (given {args}). "
            f"Fix: pass only arguments of albumentations.{name} with valid values "
            f"(see `help(albumentations.{name})`)."
        ) from e


def _seed_tree(transform: Any, seed: int, path: tuple[int, ...] = ()) -> None:
    """Give each node its own generator seeded from (seed, path); parents before children."""
    node_seed = int(np.random.SeedSequence([int(seed), 7919, *path]).generate_state(1, np.uint32)[0]) % _SEED_SPACE
    transform.set_random_seed(node_seed)  # a container propagates this to its children ...
    if isinstance(transform, _albumentations().BaseCompose):
        for j, child in enumerate(transform.transforms):
            _seed_tree(child, seed, (*path, j))  # ... which then get their own


class Augmenter:
    """A seeded albumentations ``Compose`` over single uint8 images ``[H, W, C]``."""

    def __init__(
        self, transforms: list[Any], *, name: str = "custom", apply_to: str = "synthetic", copies_per_image: int = 1
    ) -> None:
        A = _albumentations()
        require(apply_to in APPLY_TO, f"`augment.apply_to` = {apply_to!r}; allowed: {list(APPLY_TO)}.")
        require(
            isinstance(copies_per_image, (int, np.integer))
            and not isinstance(copies_per_image, bool)
            and copies_per_image >= 1,
            f"`augment.copies_per_image` = {copies_per_image!r}; give an int >= 1.",
        )
        self.name = str(name)
        self.apply_to = apply_to
        self.copies_per_image = int(copies_per_image)
        self.compose = A.Compose(list(transforms), p=1.0, save_applied_params=True)

    # -- construction -----------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Augmenter:
        """Rebuild from :meth:`to_dict` output (exact replay of recorded seeds)."""
        A = _albumentations()
        d = dict(d)
        comp = A.from_dict({k: v for k, v in d.items() if k in ("__version__", "transform")})
        return cls(
            list(comp.transforms),
            name=d.get("name", "custom"),
            apply_to=d.get("apply_to", "synthetic"),
            copies_per_image=int(d.get("copies_per_image", 1)),
        )

    def to_dict(self) -> dict[str, Any]:
        """``albumentations.to_dict`` of the Compose plus the config keys (JSON-serialisable)."""
        A = _albumentations()
        d = to_jsonable(A.to_dict(self.compose))
        return {"name": self.name, "apply_to": self.apply_to, "copies_per_image": self.copies_per_image, **d}

    def __repr__(self) -> str:
        names = [type(t).__name__ for t in self.compose.transforms]
        return f"Augmenter(name={self.name!r}, apply_to={self.apply_to!r}, transforms={names})"

    # -- application -----------------------------------------------------------------
    def apply(self, image: np.ndarray, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
        """Transform one uint8 ``[H, W, C]`` image with ``seed``.

        Returns ``(image, applied)``: the image has the input's shape and dtype;
        ``applied`` = ``{"seed": seed, "transforms": [{"name": ..., "params": {...}}, ...]}``
        lists the transforms that fired, in order, with their drawn parameters (large arrays
        such as noise maps are summarised by shape; the seed reproduces them).
        """
        require(
            isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] in (1, 3),
            f"`image` must be a uint8 array [H, W, C] with C = 1 or 3, got "
            f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}.",
        )
        require(
            isinstance(seed, (int, np.integer)) and not isinstance(seed, bool), f"`seed` must be an int, got {seed!r}."
        )
        seed = int(seed)
        _seed_tree(self.compose, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.compose(image=np.ascontiguousarray(image))
        result = out["image"]
        if result.ndim == 2 and image.shape[-1] == 1:
            result = result[..., None]
        if result.shape != image.shape:
            raise ConfigError(
                f"`augment.transforms` changed the image shape from {image.shape} to {result.shape}; "
                "the augmenter must keep the size (use e.g. RandomResizedCrop with size=[H, W], "
                "not RandomCrop/Resize)."
            )
        if result.dtype != np.uint8:
            result = np.clip(np.rint(result), 0, 255).astype(np.uint8)
        applied = [
            {"name": n, "params": to_jsonable({k: v for k, v in p.items() if k not in _UNRECORDED}, digits=6)}
            for n, p in out.get("applied_transforms", [])
        ]
        return np.ascontiguousarray(result), {"seed": seed, "transforms": applied}

    def apply_batch(self, images: np.ndarray, seeds: Sequence[int]) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """:meth:`apply` over uint8 ``[N, H, W, C]`` with one seed per image."""
        require(
            isinstance(images, np.ndarray) and images.ndim == 4,
            f"`images` must be a uint8 array [N, H, W, C], got shape {getattr(images, 'shape', None)}.",
        )
        require(
            len(seeds) == images.shape[0],
            f"`seeds` must hold one seed per image: {len(seeds)} seeds for {images.shape[0]} images.",
        )
        outs, records = [], []
        for img, s in zip(images, seeds):
            o, r = self.apply(img, int(s))
            outs.append(o)
            records.append(r)
        return (np.stack(outs) if outs else images.copy()), records

    def replay(self, image: np.ndarray, applied: Mapping[str, Any]) -> np.ndarray:
        """Reproduce a recorded augmentation (``applied`` from :meth:`apply` / the manifest)."""
        require(
            isinstance(applied, Mapping) and "seed" in applied,
            f"`applied` must be the record returned by `Augmenter.apply` (with a `seed`), got {applied!r}.",
        )
        return self.apply(image, int(applied["seed"]))[0]

    def check(self, image_shape: Sequence[int]) -> None:
        """Raise :class:`ConfigError` naming ``augment.transforms[i]`` if a transform fails on, or
        changes the shape of, images of ``image_shape`` (``[H, W, C]``). Each transform runs with p=1."""
        A = _albumentations()
        shape = tuple(int(s) for s in image_shape)
        require(
            len(shape) == 3 and shape[-1] in (1, 3), f"`image_shape` must be [H, W, C] with C = 1 or 3, got {shape}."
        )
        probe = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        for i, t in enumerate(self.compose.transforms):
            t1 = copy.deepcopy(t)
            t1.p = 1.0
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    comp = A.Compose([t1], p=1.0, seed=0)
                    out = comp(image=probe.copy())["image"]
            except Exception as e:  # noqa: BLE001
                raise ConfigError(
                    f"`augment.transforms[{i}]` ({type(t).__name__}) fails on images of shape {shape}: "
                    f"{type(e).__name__}: {' '.join(str(e).split())[:300]}. Fix its arguments or remove it."
                ) from e
            if out.ndim == 2 and shape[-1] == 1:
                out = out[..., None]
            if out.shape != shape:
                raise ConfigError(
                    f"`augment.transforms[{i}]` ({type(t).__name__}) changes the image shape from {shape} to "
                    f"{out.shape}; the augmenter must keep the size (use e.g. RandomResizedCrop with "
                    f"size=[{shape[0]}, {shape[1]}]) or remove it."
                )


def build_augmenter(cfg: Any, image_shape: Sequence[int] | None = None) -> Augmenter | None:
    """The :class:`Augmenter` of an ``augment`` config node, or ``None`` when it has no transforms.

    ``cfg``: mapping / DictConfig with ``name``, ``transforms`` (list of ``{name: <albumentations
    class>, p: ..., **kwargs}``), optional ``apply_to`` (synthetic | all, default synthetic) and
    ``copies_per_image`` (default 1). With ``image_shape`` (``[H, W, C]``) every transform is also
    dry-run once (:meth:`Augmenter.check`). Every problem raises :class:`ConfigError` naming the key
    (``augment.transforms[i]``).
    """
    if cfg is None:
        return None
    cfg = _plain(cfg)
    require(isinstance(cfg, Mapping), f"`augment` must be a config mapping (name, transforms, ...), got {cfg!r}.")
    allowed = {"name", "transforms", "apply_to", "copies_per_image"}
    unknown = sorted(set(cfg) - allowed)
    require(not unknown, f"`augment` has unknown key(s) {unknown}; allowed: {sorted(allowed)}.")
    name = cfg.get("name", "custom")
    require(
        isinstance(name, str) and name != "", f"`augment.name` = {name!r}; give a string (none|light|strong|custom)."
    )
    transforms = cfg.get("transforms") or []
    require(
        isinstance(transforms, Sequence) and not isinstance(transforms, str),
        f"`augment.transforms` = {transforms!r} must be a list of {{name: <albumentations transform>, ...}}.",
    )
    apply_to = cfg.get("apply_to", "synthetic")
    copies = cfg.get("copies_per_image", 1)
    require(apply_to in APPLY_TO, f"`augment.apply_to` = {apply_to!r}; allowed: {list(APPLY_TO)}.")
    require(
        isinstance(copies, int) and not isinstance(copies, bool) and copies >= 1,
        f"`augment.copies_per_image` = {copies!r}; give an int >= 1.",
    )
    if len(transforms) == 0:
        return None
    built = [_build_transform(t, f"augment.transforms[{i}]") for i, t in enumerate(transforms)]
    aug = Augmenter(built, name=name, apply_to=apply_to, copies_per_image=copies)
    if image_shape is not None:
        aug.check(image_shape)
    return aug
