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
from typing import Annotated, Any, Iterator, Literal, Optional, Sequence, Union

import numpy as np
import pytorch_lightning as pl
import torch
from pydantic import Field
from torch.utils.data import BatchSampler, DataLoader, Dataset

from imgaug_gen.errors import ConfigError, require

log = logging.getLogger("imgaug_gen.data")

DEFAULT_NUM_BATCHES = 10**7


# --------------------------------------------------------------------------- sampling


def dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def take_from_epochs(epoch_order, n_items: int, start: int, count: int) -> np.ndarray:
    """Positions ``[start, start + count)`` of the stream ``epoch_order(0), epoch_order(1), ...``
    (each an array of ``n_items`` item indices): batches that wrap across epochs."""
    pos = np.arange(start, start + count, dtype=np.int64)
    epochs, offsets = np.divmod(pos, n_items)
    out = np.empty(count, dtype=np.int64)
    for e in np.unique(epochs):
        mask = epochs == e
        out[mask] = epoch_order(int(e))[offsets[mask]]
    return out


class EpochBatches(BatchSampler):
    """The epoch protocol of the step-indexed samplers: ``batch(b)`` gives global batch ``b``; an
    epoch is ``num_batches`` batches, and iteration resumes at ``start_batch`` (set by
    :class:`ResumableDataLoader`) up to the end of that epoch."""

    num_batches: int
    start_batch: int

    def batch(self, b: int) -> list[int]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[list[int]]:
        start = int(self.start_batch)
        end = (start // self.num_batches + 1) * self.num_batches
        for b in range(start, end):
            yield self.batch(b)

    def __len__(self) -> int:
        return self.num_batches


class StepBatchSampler(EpochBatches):
    """Deterministic, resumable, endless batch sampler.

    The stream of item indices is the concatenation of permutations
    ``perm(seed, 0), perm(seed, 1), ...`` of ``range(n_items)``; global batch ``b`` is
    positions ``[b * B, (b + 1) * B)`` of that stream with ``B = batch_size * world_size``
    (so batch ``b`` lies in epoch ``(b * B) // n_items``, and batches wrap across epochs:
    nothing is dropped and any ``batch_size`` works, even one larger than ``n_items``).
    Rank ``r`` takes the disjoint slice ``[r * batch_size, (r + 1) * batch_size)`` of
    each global batch, so ``batch_size`` is per rank.

    Iteration starts at batch ``start_batch`` and runs to the end of the pass
    (``num_batches`` batches per pass) that contains it; ``len()`` is always
    ``num_batches``. A ``start_batch`` beyond ``num_batches`` continues in a later pass
    (fresh permutations), which is how :class:`ResumableDataLoader` keeps going across
    Lightning epochs.

    ``rank``/``world_size`` default to ``torch.distributed`` when it is initialised,
    else ``0``/``1``. ``sampler`` exists only so that Lightning can inject its
    ``DistributedSampler`` under DDP (``use_distributed_sampler=True``): its ``rank``
    and ``num_replicas`` are adopted, its order is not used.
    """

    def __init__(
        self,
        n_items: int,
        batch_size: int,
        seed: int = 0,
        num_batches: int = DEFAULT_NUM_BATCHES,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        sampler: Any = None,
        drop_last: bool = False,
    ) -> None:
        # BatchSampler.__init__ is not called on purpose: there is no inner sampler.
        if n_items < 1:
            raise ValueError(f"`n_items` must be >= 1, got {n_items}")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
        if num_batches < 1:
            raise ValueError(f"`num_batches` must be >= 1, got {num_batches}")
        if sampler is not None and hasattr(sampler, "num_replicas") and hasattr(sampler, "rank"):
            rank, world_size = int(sampler.rank), int(sampler.num_replicas)
        if rank is None or world_size is None:
            d_rank, d_world = dist_rank_world()
            rank = d_rank if rank is None else rank
            world_size = d_world if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"`rank` must be in [0, world_size={world_size}), got {rank}")
        self.n_items = int(n_items)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.num_batches = int(num_batches)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.sampler = sampler
        self.drop_last = False  # nothing is ever dropped; kept for BatchSampler look-alikes
        self.start_batch = 0
        self._perm_cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._perm_cache.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_items)
            if len(self._perm_cache) >= 4:
                self._perm_cache.pop(next(iter(self._perm_cache)))
            self._perm_cache[epoch] = perm
        return perm

    def batch(self, b: int) -> list[int]:
        """Item indices of (this rank's slice of) global batch ``b``."""
        start = b * self.batch_size * self.world_size + self.rank * self.batch_size
        return take_from_epochs(self._perm, self.n_items, start, self.batch_size).tolist()


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`StepBatchSampler` that knows how far it got.

    It counts the batches its iterators actually yielded (in the main process, so
    worker prefetching does not count) and exposes ``state_dict()`` /
    ``load_state_dict()``; Lightning (``_Stateful`` protocol: both methods) saves that
    state in ``checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]`` and
    restores it before the first ``iter()`` of a resumed run. Every new ``iter()``
    continues from the batch after the last one yielded.
    """

    def __init__(self, dataset: Dataset, batch_sampler: StepBatchSampler, **kwargs: Any) -> None:
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self._batches_done = 0

    def __iter__(self) -> Iterator[Any]:
        self.batch_sampler.start_batch = self._batches_done
        return self._counting(super().__iter__())

    def _counting(self, it: Iterator[Any]) -> Iterator[Any]:
        for batch in it:
            self._batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"batches_done": int(self._batches_done)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._batches_done = int(state_dict["batches_done"])
        self.batch_sampler.start_batch = self._batches_done


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
        self._ready = False

    def record_args(self) -> dict[str, Any]:
        """The constructor arguments a run records (generator ``config.json``: ``data.args``), from
        which :func:`imgaug_gen.data.kinds.build_data` rebuilds this data module."""
        from omegaconf import OmegaConf

        def plain(v):
            if OmegaConf.is_config(v):
                return OmegaConf.to_container(v, resolve=True)
            return list(v) if isinstance(v, tuple) else v

        return {k: plain(v) for k, v in self._args.items()}

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
