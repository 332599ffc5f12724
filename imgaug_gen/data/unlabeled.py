"""The unlabelled pool of an :class:`~imgaug_gen.data.base.ImageDataModule`: images without labels that
generators may train on (a DDPM's null class) and teachers may pseudo-label.

Two sources, one per key:

* ``data.unlabeled=rest`` -- the training-split images outside the few-shot subset, labels dropped (never
  a validation or test image);
* ``data.unlabeled_root=PATH`` -- a folder of images in any layout (sub-folders are walked, their names
  mean nothing), read with the decoding, conversion, resizing and corrupt-file rules of ``data.root``.

Either way an image whose pixels (after conversion and resizing) equal a labelled, validation or test
image's is dropped, and the drops are counted in the log, so the pool never leaks an evaluated image into
training. Training batches then hold ``data.unlabeled_share`` pool images each (label
:data:`UNLABELED`), drawn by the consumption policies' ``weighted`` sampler (:func:`pool_batch_sampler`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from imgaug_gen.errors import ConfigError, require

log = logging.getLogger("imgaug_gen.data")

#: the label of a pool image in a training batch (a DDPM trains it as its null class)
UNLABELED = -1


def content_hash(image: np.ndarray) -> str:
    """sha1 of a decoded uint8 image's shape and pixels: equal for the same picture in any file format."""
    a = np.ascontiguousarray(image)
    return hashlib.sha1(repr(a.shape).encode() + a.tobytes()).hexdigest()


@dataclass
class Pool:
    """Unlabelled images (uint8 ``[M, H, W, C]``) with their ids, paths (None for built-in data) and hashes."""

    images: np.ndarray
    ids: list[str]
    paths: list[Optional[str]]
    hashes: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, idx) -> "Pool":
        idx = [int(i) for i in idx]
        return Pool(
            self.images[idx], [self.ids[i] for i in idx], [self.paths[i] for i in idx], [self.hashes[i] for i in idx]
        )

    def records(self) -> list[dict[str, Any]]:
        return [{"id": i, "path": p, "sha1": h} for i, p, h in zip(self.ids, self.paths, self.hashes)]


# --------------------------------------------------------------------------- 1. arguments


def check_pool_args(unlabeled: Optional[str], unlabeled_root: Optional[str], data_root: Optional[str]) -> None:
    """Cheap checks before any image is read: one source at most; the folder exists, is a folder, and is
    neither ``data.root`` nor inside it nor around it."""
    if unlabeled is not None and unlabeled_root is not None:
        raise ConfigError(
            f"`data.unlabeled` = {unlabeled!r} and `data.unlabeled_root` = {unlabeled_root!r} are both set; "
            "give one pool: the rest of the training split, or a folder."
        )
    if unlabeled_root is None:
        return
    require(
        str(unlabeled_root).strip() != "", "`data.unlabeled_root` is empty; pass a folder of images, or leave it unset."
    )
    root = Path(os.path.expanduser(str(unlabeled_root)))
    require(
        root.is_dir(),
        f"`data.unlabeled_root` = {str(unlabeled_root)!r} is not an existing folder (resolved to "
        f"{str(root.absolute())!r}); pass the folder that holds your unlabelled images.",
    )
    if data_root not in (None, ""):
        from imgaug_gen.io import overlaps

        labelled = os.path.expanduser(str(data_root))
        require(
            not overlaps(root, labelled),
            f"`data.unlabeled_root` = {str(unlabeled_root)!r} and `data.root` = {str(data_root)!r} are the same "
            "folder, or one lies inside the other: the labelled images (and their validation and test splits) "
            "would be read as unlabelled. Keep the unlabelled images in a folder of their own.",
        )


# --------------------------------------------------------------------------- 2. reading


def read_pool_folder(root: str, channels: int, size: int, resize: str, on_corrupt: str) -> Pool:
    """Every image under ``root`` (any layout), decoded as ``data.root``'s are."""
    from imgaug_gen.data.folder import LabeledFolderDataModule, decode_files, decode_image, walk_image_files

    top = Path(os.path.expanduser(str(root))).absolute()
    seen: dict[str, Path] = {os.path.realpath(top): top}
    files = walk_image_files(top, seen)
    images, ids, paths, skipped, used = [], [], [], [], set()
    decode = lambda p: decode_image(p, channels, size, resize)
    for path, arr in decode_files(files, decode, on_corrupt, skipped, "data.on_corrupt"):
        images.append(arr)
        paths.append(str(path))
        rel = path.relative_to(top).with_suffix("").as_posix()
        ids.append(LabeledFolderDataModule._unique_id("unlabeled", rel, path, used))
    if skipped:
        log.warning("skipped %d unreadable image file(s) under %s (`data.on_corrupt=skip`)", len(skipped), top)
    require(
        len(images) > 0,
        f"`data.unlabeled_root` = {str(root)!r} holds no images"
        + (f" ({len(skipped)} unreadable file(s) were skipped)" if skipped else "")
        + "; put your unlabelled images there (any layout), or leave `data.unlabeled_root` unset.",
    )
    stack = np.stack(images).astype(np.uint8, copy=False)
    return Pool(stack, ids, paths, [content_hash(a) for a in stack])


def build_pool(
    source: str, images: np.ndarray, ids: list, paths: list, splits: dict[str, np.ndarray], rest: np.ndarray, read
) -> Pool:
    """The pool of one data module, with every image equal to a labelled one dropped.

    ``splits``: name -> indices into ``images`` of the labelled sets the pool must not hold (the few-shot
    ``labelled`` images, ``validation``, ``test``, and for a folder pool the other ``labelled`` training
    images); ``rest``: the indices ``data.unlabeled=rest`` takes; ``read``: reads the folder pool."""
    if source == "rest":
        pool = Pool(
            images[rest], [ids[i] for i in rest], [paths[i] for i in rest], [content_hash(images[i]) for i in rest]
        )
    else:
        pool = read()
    owner: dict[str, str] = {}
    for name, idx in splits.items():
        for i in idx:
            owner.setdefault(content_hash(images[i]), name)
    keep, dropped, firsts = [], {}, set()
    for k, h in enumerate(pool.hashes):
        why = owner.get(h) or ("repeated" if h in firsts else None)
        if why is None:
            keep.append(k)
            firsts.add(h)
        else:
            dropped[why] = dropped.get(why, 0) + 1
    if dropped:
        log.warning(
            "unlabelled pool: dropped %d image(s) whose pixels equal another image's (%s); kept %d",
            sum(dropped.values()),
            ", ".join(f"{n} {why}" for why, n in sorted(dropped.items())),
            len(keep),
        )
    require(len(keep) > 0, f"the unlabelled pool ({source}) holds no image that is not also a labelled one.")
    return Pool(
        pool.images[keep], [pool.ids[k] for k in keep], [pool.paths[k] for k in keep], [pool.hashes[k] for k in keep]
    )


# --------------------------------------------------------------------------- 3. batches


def pool_batch_sampler(n_labelled: int, n_pool: int, batch_size: int, share: float, seed: int = 0, **kwargs):
    """Batches of ``batch_size`` items, ``round(batch_size * share)`` of them from the pool (items
    ``n_labelled ..``), the rest labelled (items ``0 .. n_labelled - 1``): the consumption policies'
    ``weighted`` sampler (a pure function of the batch index, so resume stays exact). ``share=1`` trains on
    the pool alone (pretraining on unlabelled images)."""
    from imgaug_gen.data.mix_policy import MixPolicy
    from imgaug_gen.data.mix_sampler import MixedBatchSampler

    require(0.0 < float(share) <= 1.0, f"`data.unlabeled_share` = {share!r}; give a share in (0, 1].")
    policy = MixPolicy(name="weighted", p=float(share))
    labels = np.zeros(n_labelled, dtype=np.int64)  # labels only matter to `replace`
    return MixedBatchSampler(labels, np.full(n_pool, UNLABELED), policy, batch_size, seed=seed, **kwargs)
