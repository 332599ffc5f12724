"""Shared machinery of the image DataModules.

An :class:`ImageDataModule` holds a small labelled image set in memory as uint8
``[N, H, W, C]`` arrays. Subclasses only *load* images (:meth:`_load`); this base
class validates the common arguments, makes the fixed stratified test split
(``split_seed``), draws the few-shot training subset (``shots`` per class,
``seed``) and builds the dataloaders.

Training batches come from :class:`StepBatchSampler`, a pure function of the
batch index, wrapped in a :class:`ResumableDataLoader` whose ``state_dict`` Lightning
stores in its checkpoints, so a resumed run sees exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
import re
import zlib
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, Sequence, Union

import numpy as np
import pytorch_lightning as pl
import torch
from pydantic import Field
from torch.utils.data import DataLoader, Dataset

from imgaug_gen.data.samplers import DEFAULT_NUM_BATCHES, ResumableDataLoader, StepBatchSampler
from imgaug_gen.errors import ConfigError, require

log = logging.getLogger("imgaug_gen.data")


class ImageArrayDataset(Dataset):
    """uint8 ``[N, H, W, C]`` images + int64 labels -> ``(float32 [C, H, W] in [-1, 1], int64)``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i].permute(2, 0, 1).to(torch.float32).div_(127.5).sub_(1.0)
        return x, self.labels[i]


# --------------------------------------------------------------------------- data module


@dataclass
class LoadedImages:
    """What a subclass's :meth:`ImageDataModule._load` returns."""

    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int64 [N]
    class_names: list[str]
    ids: list[str]  # stable, unique, filename-safe
    paths: list[Optional[str]]


def class_seed(name: str) -> int:
    """A stable 32-bit number for a class name (independent of the other classes)."""
    return zlib.crc32(name.encode("utf-8"))


def sanitize_id(text: str) -> str:
    """Make ``text`` usable as one file name: no separators, spaces or control characters."""
    out = re.sub(r"[^\w.\-]+", "_", text).strip("._")
    return out or "x"


Fraction = Annotated[float, Field(ge=0, lt=1)]  # a share in [0, 1)


class ImageDataModule(pl.LightningDataModule):
    """Base DataModule: in-memory uint8 images, fixed test split, seeded few-shot subset.

    After :meth:`setup` (idempotent; all validation happens there) it exposes
    ``num_classes``, ``class_names``, ``image_shape`` ``(C, H, W)`` and the array
    accessors. Arrays returned by the accessors are copies.
    """

    #: batches per Lightning epoch of ``train_dataloader``; large so one epoch spans a run.
    train_num_batches: int = DEFAULT_NUM_BATCHES
    #: the labelled folder (none for built-in data) and how an unlabelled folder is read; the folder module sets its own
    root: Optional[str] = None
    resize: str = "resize"
    on_corrupt: str = "error"

    def __init__(
        self,
        *,
        image_size: Annotated[int, Field(ge=8, le=4096)] = 32,
        channels: Literal[1, 3] = 3,
        shots: Optional[Annotated[int, Field(ge=1, le=10**7)]] = None,
        seed: int = 0,
        batch_size: Annotated[int, Field(ge=1, le=65536)] = 64,
        num_workers: Annotated[int, Field(ge=0, le=1024)] = 0,
        test_fraction: Fraction = 0.2,
        val_fraction: Fraction = 0.0,
        split_seed: int = 0,
        class_names: Optional[Sequence[str]] = None,
        classes: Optional[Annotated[list[Union[int, str]], Field(min_length=2)]] = None,
        unlabeled: Optional[Literal["rest"]] = None,
        unlabeled_root: Optional[str] = None,
        unlabeled_share: Annotated[float, Field(ge=0, le=1)] = 0.5,
    ) -> None:
        # the annotations are the `data` block's schema (checked in setup by schemas.check_args)
        self._args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.class_names_override = None if class_names is None else list(class_names)
        self.image_size = image_size
        self.channels = channels
        self.shots = shots
        self.seed = seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.test_fraction = test_fraction
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.classes = None if classes is None else list(classes)
        self.unlabeled, self.unlabeled_root, self.unlabeled_share = unlabeled, unlabeled_root, unlabeled_share
        self._pool = None
        self._pseudo = None
        self._ready = False

    def record_args(self) -> dict[str, Any]:
        """The constructor arguments a run records (generator ``config.json``: ``data.args``), from
        which :func:`imgaug_gen.data.kinds.build_data` rebuilds this data module."""
        from omegaconf import OmegaConf

        def plain(v):
            if OmegaConf.is_config(v):
                return OmegaConf.to_container(v, resolve=True)
            return list(v) if isinstance(v, tuple) else v

        args = {k: plain(v) for k, v in self._args.items()}
        if args.get("unlabeled_root") is not None:
            import os

            args["unlabeled_root"] = os.path.abspath(os.path.expanduser(str(args["unlabeled_root"])))
        return args

    # ---- to implement -----------------------------------------------------------
    def _check_args(self) -> None:
        """Subclass-specific argument checks (run before any loading)."""

    def _load(self) -> LoadedImages:
        raise NotImplementedError

    # ---- setup --------------------------------------------------------------------
    def _check_common_args(self) -> None:
        from imgaug_gen.schemas import check_args

        check_args(type(self), "data", self._args)
        names = self.class_names_override
        if names is not None:
            from imgaug_gen.io import safe_class_dir, unique_class_dirs

            for i, n in enumerate(names):
                require(isinstance(n, str), f"`data.class_names[{i}]` = {n!r}; give a string.")
                try:
                    safe_class_dir(n)
                except ConfigError as e:
                    raise ConfigError(f"`data.class_names[{i}]`: {e}") from None
            require(len(set(names)) == len(names), f"`data.class_names` = {names} repeats a name.")
            unique_class_dirs(names, "`data.class_names`")
        tf, vf = self.test_fraction, self.val_fraction
        require(
            float(vf) + float(tf) < 1.0,
            f"`data.val_fraction` + `data.test_fraction` = {vf!r} + {tf!r} leaves no training images; "
            "keep their sum below 1, e.g. `data.val_fraction=0.2`.",
        )
        from imgaug_gen.data.unlabeled import check_pool_args

        check_pool_args(self.unlabeled, self.unlabeled_root, self.root)

    def setup(self, stage: Optional[str] = None) -> None:
        if self._ready:
            return
        # 1. Check arguments (cheap, before touching any file)
        self._check_common_args()
        self._check_args()
        # 2. Load every labelled image (subclass), keep the classes asked for
        data = self._select_classes(self._load())
        require(
            len(data.class_names) >= 2,
            f"Found {len(data.class_names)} class(es) {data.class_names}; at least 2 classes are "
            "needed for class-conditional generation. Add another class folder.",
        )
        # 3. Fixed stratified test split, then the few-shot subset of the rest
        test_idx, val_idx, train_idx = self._split(data)
        shot_idx = self._subsample(data, train_idx)

        if self.class_names_override is not None:
            require(
                len(self.class_names_override) == len(data.class_names),
                f"`data.class_names` has {len(self.class_names_override)} names for the "
                f"{len(data.class_names)} classes found {data.class_names}; give one per class, in that order.",
            )
            data.class_names = list(self.class_names_override)  # display names; subsets do not change
        self.class_names = list(data.class_names)
        self.num_classes = len(self.class_names)
        self.image_shape = (int(self.channels), int(self.image_size), int(self.image_size))
        self._data = data
        self._test_idx = test_idx
        self._val_idx = val_idx
        self._ref_idx = train_idx
        self._train_idx = shot_idx
        # 4. The unlabelled pool (``data.unlabeled`` / ``data.unlabeled_root``), without any labelled image
        self._pool = self._build_pool(data, test_idx, val_idx, train_idx, shot_idx)
        self._ready = True
        counts = np.bincount(data.labels[shot_idx], minlength=self.num_classes)
        log.info(
            "%s: %d classes, %d training images (%s per class), %d reference, %d validation, %d test, shape %s",
            type(self).__name__,
            self.num_classes,
            len(shot_idx),
            "all" if self.shots is None else self.shots,
            len(train_idx),
            len(val_idx),
            len(test_idx),
            self.image_shape,
        )
        if len(test_idx) == 0:
            log.warning(
                "The test split is empty (`data.test_fraction`=%s; each class gives floor(n * fraction) "
                "images); validation metrics will be skipped.",
                self.test_fraction,
            )
        log.debug("training images per class: %s", dict(zip(self.class_names, counts.tolist())))

    def _build_pool(self, data: LoadedImages, test_idx, val_idx, train_idx, shot_idx):
        from imgaug_gen.data.unlabeled import build_pool, read_pool_folder

        if self.unlabeled is None and self.unlabeled_root is None:
            return None
        rest = np.setdiff1d(train_idx, shot_idx)
        # a folder pool must not hold any labelled image; `rest` is the training split outside the shots
        labelled = shot_idx if self.unlabeled == "rest" else train_idx
        read = lambda: read_pool_folder(
            self.unlabeled_root, int(self.channels), int(self.image_size), self.resize, self.on_corrupt
        )
        splits = {"labelled": labelled, "validation": val_idx, "test": test_idx}
        pool = build_pool(self.unlabeled or "folder", data.images, data.ids, data.paths, splits, rest, read)
        log.info(
            "unlabelled pool (%s): %d images, %.0f %% of each training batch",
            self.unlabeled or self.unlabeled_root,
            len(pool),
            100 * float(self.unlabeled_share),
        )
        return pool

    def _select_classes(self, data: LoadedImages) -> LoadedImages:
        """``data.classes``: only these classes, relabelled 0.. in the order given. An entry is a class
        name (a folder's name; the digits' "0" .. "9") or an index into the sorted classes (the digit
        itself). Each class keeps its own test / validation split (drawn per class name), so a subset's
        splits are the full data's."""
        if self.classes is None:
            return data
        picked: list[int] = []
        for i, c in enumerate(self.classes):
            if isinstance(c, str) and c in data.class_names:
                idx = data.class_names.index(c)
            elif isinstance(c, int) and not isinstance(c, bool) and 0 <= c < len(data.class_names):
                idx = c
            else:
                raise ConfigError(
                    f"`data.classes[{i}]` = {c!r} is not a class of this data; its classes are "
                    f"{data.class_names} (give names, or indices 0..{len(data.class_names) - 1})."
                )
            require(idx not in picked, f"`data.classes` = {self.classes} names class {data.class_names[idx]!r} twice.")
            picked.append(idx)
        keep = np.isin(data.labels, picked)
        remap = {old: new for new, old in enumerate(picked)}
        keep_idx = np.flatnonzero(keep)
        return LoadedImages(
            images=data.images[keep_idx],
            labels=np.asarray([remap[int(v)] for v in data.labels[keep_idx]], dtype=np.int64),
            class_names=[data.class_names[i] for i in picked],
            ids=[data.ids[i] for i in keep_idx],
            paths=[data.paths[i] for i in keep_idx],
        )

    def _split(self, data: LoadedImages) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Fixed per-class (test, validation, rest) split from ``split_seed`` alone: the test split
        is the same whatever ``val_fraction`` is, and neither depends on ``seed`` or ``shots``."""
        test, val, train = [], [], []
        for c, name in enumerate(data.class_names):
            idx = np.flatnonzero(data.labels == c)
            rng = np.random.default_rng([int(self.split_seed), class_seed(name)])
            perm = idx[rng.permutation(len(idx))]
            n_test = int(np.floor(len(idx) * float(self.test_fraction)))
            n_val = int(np.floor(len(idx) * float(self.val_fraction)))
            test.append(np.sort(perm[:n_test]))
            val.append(np.sort(perm[n_test : n_test + n_val]))
            train.append(np.sort(perm[n_test + n_val :]))
        return tuple(np.concatenate(part).astype(np.int64) for part in (test, val, train))

    def _subsample(self, data: LoadedImages, train_idx: np.ndarray) -> np.ndarray:
        if self.shots is None:
            return train_idx
        out = []
        for c, name in enumerate(data.class_names):
            idx = train_idx[data.labels[train_idx] == c]
            require(
                len(idx) >= self.shots,
                f"`data.shots`={self.shots} but class {name!r} has only {len(idx)} training "
                f"image(s) after holding out the test split (`data.test_fraction`="
                f"{self.test_fraction}). Lower `data.shots` to at most {len(idx)}, set "
                "`data.shots=null` to use all images, or add images to that class.",
            )
            # A permutation prefix: with the same seed, shots=5 is a subset of shots=10.
            rng = np.random.default_rng([int(self.seed), class_seed(name)])
            out.append(np.sort(idx[rng.permutation(len(idx))[: self.shots]]))
        return np.concatenate(out).astype(np.int64)

    # ---- accessors ----------------------------------------------------------------
    def _require_setup(self) -> None:
        if not self._ready:
            raise RuntimeError(f"{type(self).__name__}.setup() must be called first")

    def _arrays(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._require_setup()
        return self._data.images[idx], self._data.labels[idx].astype(np.int64)

    def train_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The few-shot training set: uint8 ``[N, H, W, C]`` and int64 labels ``[N]``."""
        return self._arrays(self._train_idx)

    def reference_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All labelled images outside the test and validation splits (ignores ``shots``)."""
        return self._arrays(self._ref_idx)

    def val_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The fixed validation split (``val_fraction``, ``split_seed``; empty by default): for
        choosing recipes, disjoint from the test split and from every few-shot subset."""
        return self._arrays(self._val_idx)

    def test_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The fixed held-out test split (``test_fraction``, ``split_seed``)."""
        return self._arrays(self._test_idx)

    def add_pseudo_labels(self, index: np.ndarray, labels: np.ndarray) -> None:
        """Move the pool images ``index`` into the labelled training batches with a teacher's ``labels``
        (``train_dataloader`` only: :meth:`train_arrays` stays the real shots)."""
        self._require_setup()
        require(self._pool is not None, "there is no unlabelled pool to pseudo-label; set `data.unlabeled`.")
        index, labels = np.asarray(index, dtype=np.int64), np.asarray(labels, dtype=np.int64)
        require(
            bool(np.all((labels >= 0) & (labels < self.num_classes))),
            f"pseudo-labels outside 0..{self.num_classes - 1}",
        )
        self._pseudo = (self._pool.images[index], labels)
        self._pool = self._pool.subset(np.setdiff1d(np.arange(len(self._pool)), index))

    def unlabeled_arrays(self) -> np.ndarray:
        """The unlabelled pool, uint8 ``[M, H, W, C]`` (``M = 0`` when none is configured)."""
        self._require_setup()
        if self._pool is None:
            return np.zeros((0, *self._data.images.shape[1:]), dtype=np.uint8)
        return self._pool.images.copy()

    def unlabeled_records(self) -> list[dict]:
        """One ``{id, path, sha1}`` per pool image, in the order of :meth:`unlabeled_arrays`."""
        self._require_setup()
        return [] if self._pool is None else self._pool.records()

    def train_records(self) -> list[dict]:
        """One record per training image, in the order of :meth:`train_arrays`."""
        self._require_setup()
        d = self._data
        return [
            {
                "id": d.ids[i],
                "label": int(d.labels[i]),
                "class_name": d.class_names[int(d.labels[i])],
                "path": d.paths[i],
            }
            for i in self._train_idx.tolist()
        ]

    # ---- dataloaders --------------------------------------------------------------
    def train_dataloader(self) -> ResumableDataLoader:
        self._require_setup()
        images, labels = self.train_arrays()
        if self._pseudo is not None:
            images, labels = np.concatenate([images, self._pseudo[0]]), np.concatenate([labels, self._pseudo[1]])
        if self._pool is not None and len(self._pool) and float(self.unlabeled_share) > 0:
            from imgaug_gen.data.unlabeled import UNLABELED, pool_batch_sampler

            sampler = pool_batch_sampler(
                len(labels),
                len(self._pool),
                self.batch_size,
                float(self.unlabeled_share),
                seed=int(self.seed),
                num_batches=self.train_num_batches,
            )
            images = np.concatenate([images, self._pool.images])
            labels = np.concatenate([labels, np.full(len(self._pool), UNLABELED, dtype=np.int64)])
        else:
            sampler = StepBatchSampler(
                len(labels), self.batch_size, seed=int(self.seed), num_batches=self.train_num_batches
            )
        return ResumableDataLoader(
            ImageArrayDataset(images, labels),
            batch_sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # Its own generator: creating an iterator must not draw from the global RNG,
            # or a resumed run would continue with a shifted random stream.
            generator=torch.Generator().manual_seed(int(self.seed)),
        )

    def val_dataloader(self) -> DataLoader:
        self._require_setup()
        images, labels = self.test_arrays()
        return DataLoader(
            ImageArrayDataset(images, labels),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
