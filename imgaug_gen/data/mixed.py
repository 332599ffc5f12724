"""Real + synthetic images served under a consumption policy.

How a classifier *consumes* synthetic images matters as much as which images they are. A
:class:`MixPolicy` says how batches are drawn and what each synthetic image is trained toward:

* ``concat`` -- real and synthetic images in one pool, drawn uniformly (the plain union);
* ``replace`` -- DA-Fusion's recipe: an epoch has the size of the real set; each drawn real image
  is swapped, with probability ``p``, for one of *its own* img2img edits (manifest ``source_id``)
  or a sampled synthetic image of its class;
* ``weighted`` -- separate real and synthetic streams: every batch holds ``round(p * B)`` synthetic
  images and the rest real, the synthetic part's loss weighted by ``synthetic_weight`` (He et al. 2023).

Soft targets apply to the synthetic images under any policy: extra ``label_smoothing`` and/or
distillation from a teacher trained on the real (+classical) set (``distill`` = the weight of the
teacher's temperature-``temperature`` probabilities in the loss, ``0.5·KD(T=2) + 0.5·CE`` at
``distill=0.5``), which also corrects samples the generator drew off-class.

The pieces:

* :class:`MixPolicy` -- the policy, checked once (``MixPolicy.from_config``).
* :class:`MixedBatchSampler` -- deterministic, resumable, endless batches over real items
  ``[0, n_real)`` and synthetic items ``[n_real, n_real + n_syn)`` (a pure function of the batch
  index, like :class:`~imgaug_gen.data.samplers.StepBatchSampler`, so Lightning resumes it exactly).
* :func:`mixed_loss` -- the policy's loss for a batch (per-sample weights, soft targets).
* :class:`MixedFolderDataset` / :class:`MixedDataModule` -- a ``generate.py`` output folder read
  through its manifest, for training *your own* classifier the recommended way.

The downstream evaluation (``evaluate.py``) trains its fixed-recipe classifier through the same
sampler and loss (:func:`imgaug_gen.metrics.downstream.train_and_test`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from imgaug_gen.data.manifest import RecordImages
from imgaug_gen.data.mix_policy import POLICIES, MixPolicy
from imgaug_gen.data.mix_sampler import MixedBatchSampler
from imgaug_gen.data.samplers import ResumableDataLoader
from imgaug_gen.errors import require

log = logging.getLogger(__name__)

__all__ = [
    "POLICIES",
    "MixPolicy",
    "MixedBatchSampler",
    "MixedDataModule",
    "MixedFolderDataset",
    "mixed_loss",
    "policy_targets",
]

# -- targets and loss ------------------------------------------------------------------------------------


def policy_targets(
    labels: torch.Tensor, synthetic: torch.Tensor, num_classes: int, policy: MixPolicy, real_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample label-smoothed one-hot targets ``[N, K]`` and loss weights ``[N]`` of a batch.

    Real images are smoothed by ``real_smoothing``, synthetic ones by the larger of that and
    ``policy.label_smoothing``; synthetic images weigh ``policy.synthetic_weight``, real ones 1."""
    synthetic = synthetic.to(torch.bool)
    syn_eps = max(float(real_smoothing), float(policy.label_smoothing))
    eps = torch.where(synthetic, syn_eps, float(real_smoothing)).float()
    targets = F.one_hot(labels, num_classes).float() * (1 - eps[:, None]) + eps[:, None] / num_classes
    weights = torch.where(synthetic, float(policy.synthetic_weight), 1.0).float()
    return targets, weights


def mixed_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    synthetic: torch.Tensor,
    policy: MixPolicy,
    teacher_logits: torch.Tensor | None = None,
    real_smoothing: float = 0.0,
) -> torch.Tensor:
    """The policy's training loss of a batch: ``mean_i w_i · loss_i``.

    ``loss_i`` is the soft-target cross-entropy (real images: ``real_smoothing``; synthetic images:
    the policy's ``label_smoothing``); for synthetic images with ``policy.distill = a > 0`` it is
    ``(1 - a)·CE + a·T²·KL(softmax(teacher/T) || softmax(logits/T))``. ``w_i`` is 1 for real images and
    ``policy.synthetic_weight`` for synthetic ones. ``synthetic``: bool ``[N]``.
    """
    synthetic = synthetic.to(torch.bool)
    targets, weights = policy_targets(labels, synthetic, logits.shape[1], policy, real_smoothing)
    loss = -(targets * F.log_softmax(logits, dim=1)).sum(1)
    a = float(policy.distill)
    if a > 0:
        require(
            teacher_logits is not None,
            "`policy.distill` > 0 needs teacher logits for the synthetic images; "
            "give a teacher (MixedDataModule(teacher=...)) or set distill=0.",
        )
        t = float(policy.temperature)
        kd = F.kl_div(
            F.log_softmax(logits / t, dim=1),
            F.log_softmax(teacher_logits.float() / t, dim=1),
            reduction="none",
            log_target=True,
        ).sum(1) * (t * t)
        loss = torch.where(synthetic, (1 - a) * loss + a * kd, loss)
    return (weights * loss).mean()


# -- a generate.py folder as a dataset -------------------------------------------------------------------


def _folder_records(out_dir: Path) -> list[dict]:
    from imgaug_gen.data.manifest import read_manifest, record_path

    require(out_dir.is_dir(), f"`out_dir` = {str(out_dir)!r} is not a folder; give a generate.py out_dir.")
    require(
        (out_dir / "manifest.jsonl").is_file(),
        f"`{out_dir}` holds no manifest.jsonl; give a folder written by generate.py (a sharded job writes "
        "manifest.jsonl when its last shard finishes).",
    )
    records = read_manifest(out_dir)  # ConfigError on a torn or non-object line
    require(len(records) > 0, f"`{out_dir / 'manifest.jsonl'}` lists no images.")
    for r in records:  # every file inside the folder, before any is read
        record_path(out_dir, r)
    return records


class MixedFolderDataset(Dataset):
    """A ``generate.py`` output folder read through its manifest, split into real and synthetic items.

    Items ``0 .. n_real-1`` are the folder's real images (``source: real``: originals and classical
    copies), then the synthetic ones (``source: synthetic``); a real image's group is its
    ``source_id`` and an img2img edit's group is the real image it edits, so the ``replace`` policy
    swaps a real image only for its own edits. ``real=(images, labels)`` (uint8 ``[N, H, W, C]``)
    supplies the real images when the folder was written with ``include_real=false``.

    ``__getitem__`` returns ``{"image": float [C, H, W] in [-1, 1] (or transform's output),
    "label": int, "synthetic": bool, "index": int}``. ``transform(image_uint8_hwc) -> tensor or
    array`` replaces the default conversion (e.g. an albumentations ``Compose`` + ``ToTensorV2``).
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        transform: Callable | None = None,
        real: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        records = _folder_records(self.out_dir)
        real_recs = [r for r in records if r.get("source") == "real"]
        syn_recs = [r for r in records if r.get("source") == "synthetic"]
        require(
            real_recs or real is not None,
            f"`{self.out_dir}` holds no real images (written with include_real=false); pass "
            "real=(images, labels) with the real training images.",
        )
        require(
            not (real_recs and real is not None),
            f"`{self.out_dir}` already holds the real images (include_real=true); do not also pass `real`.",
        )
        self._arrays: np.ndarray | None = None
        group_of: dict[str, int] = {}
        if real is not None:
            images, labels = real
            require(len(images) == len(labels), "`real` images and labels differ in length.")
            self._arrays = np.asarray(images)
            self.files: list[str | None] = [None] * len(labels)
            real_labels = [int(v) for v in labels]
            real_groups = list(range(len(labels)))
        else:
            self.files = [r["file"] for r in real_recs]
            real_labels = [int(r["label"]) for r in real_recs]
            real_groups = [group_of.setdefault(str(r.get("source_id", r["id"])), len(group_of)) for r in real_recs]
        syn_groups = [group_of.get(str(r["source_id"]), -1) if r.get("source_id") is not None else -1 for r in syn_recs]
        if real is None and any(r.get("source_id") is not None for r in syn_recs) and all(g < 0 for g in syn_groups):
            log.warning(
                "%s: the img2img edits' source_id match no real image in the folder; `replace` will "
                "draw same-class images instead of each image's own edits",
                self.out_dir,
            )
        self.files += [r["file"] for r in syn_recs]
        self.n_real, self.n_syn = len(real_labels), len(syn_recs)
        self.labels = np.asarray(real_labels + [int(r["label"]) for r in syn_recs], dtype=np.int64)
        self.real_groups = np.asarray(real_groups, dtype=np.int64)
        self.syn_groups = np.asarray(syn_groups, dtype=np.int64)
        self.records = real_recs + syn_recs
        self._item_records = ([None] * len(real_labels) if real is not None else real_recs) + syn_recs
        self.transform = transform
        self._reader = RecordImages(self.out_dir)  # image files, WebDataset or Parquet shards
        # (width, height) every file must have, from the first one read (checked from each header)
        self._size: tuple[int, int] | None = (
            None if self._arrays is None else (self._arrays.shape[2], self._arrays.shape[1])
        )

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> np.ndarray:
        """uint8 ``[H, W, C]`` of item ``i``."""
        if i < self.n_real and self._arrays is not None:
            a = self._arrays[i]
        else:
            a = self._reader.array(self._item_records[i], expect_size=self._size)
            if self._size is None:
                self._size = (a.shape[1], a.shape[0])
        return a[..., None] if a.ndim == 2 else a

    def __getitem__(self, i: int) -> dict[str, Any]:
        a = self.image(int(i))
        if self.transform is not None:
            x = self.transform(a)
            x = torch.as_tensor(x) if not isinstance(x, torch.Tensor) else x
        else:
            x = torch.from_numpy(np.array(a, copy=True)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        return {"image": x, "label": int(self.labels[i]), "synthetic": bool(i >= self.n_real), "index": int(i)}

    def sampler(
        self, policy: MixPolicy | Mapping | str, batch_size: int, seed: int = 0, **kwargs: Any
    ) -> MixedBatchSampler:
        """The policy's batch sampler over this dataset's items."""
        return MixedBatchSampler(
            self.labels[: self.n_real],
            self.labels[self.n_real :],
            MixPolicy.from_config(policy),
            batch_size,
            real_groups=self.real_groups,
            syn_groups=self.syn_groups,
            seed=seed,
            **kwargs,
        )


class MixedDataModule(pl.LightningDataModule):
    """Train your own classifier on a ``generate.py`` folder under a consumption policy.

    ``policy``: a :class:`MixPolicy`, a mapping (``{name: replace, p: 0.5}``) or a policy name.
    ``teacher``: an ``nn.Module`` mapping a batch of ``image`` tensors to logits (needed when
    ``policy.distill > 0``); its logits on every synthetic image (un-augmented, eval mode) are
    computed once in :meth:`setup` and served as ``batch["teacher_logits"]``. ``transform`` is the
    per-image train transform (e.g. classical augmentation); batches are
    ``{"image", "label", "synthetic", "index"[, "teacher_logits"]}``. In the training step::

        loss = mixed_loss(self(batch["image"]), batch["label"], batch["synthetic"], dm.policy,
                          batch.get("teacher_logits"))

    The train loader is endless and resumable (Lightning stores its position in checkpoints):
    train with ``max_steps``.
    """

    def __init__(
        self,
        out_dir: str | Path,
        policy: MixPolicy | Mapping | str = "replace",
        *,
        batch_size: int = 64,
        seed: int = 0,
        transform: Callable | None = None,
        teacher: torch.nn.Module | None = None,
        real: tuple[np.ndarray, np.ndarray] | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.out_dir = Path(out_dir)
        self.policy = MixPolicy.from_config(policy)
        require(
            not (self.policy.distill > 0 and teacher is None),
            f"policy {self.policy.tag} distils from a teacher; pass teacher=<a classifier trained on the real "
            "(+classical) images>, or set distill=0.",
        )
        require(isinstance(batch_size, int) and batch_size >= 1, f"`batch_size` = {batch_size!r}; give an int >= 1.")
        self.batch_size, self.seed, self.num_workers = batch_size, int(seed), int(num_workers)
        self.transform, self.teacher, self.real = transform, teacher, real
        self.dataset: Optional[MixedFolderDataset] = None
        self.teacher_logits: Optional[torch.Tensor] = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        self.dataset = MixedFolderDataset(self.out_dir, transform=self.transform, real=self.real)
        if self.policy.distill > 0:
            self.teacher_logits = self._teacher_logits()
        ds = self.dataset
        log.info(
            "mixed set %s: %d real, %d synthetic images, policy %s", self.out_dir, ds.n_real, ds.n_syn, self.policy.tag
        )

    @torch.no_grad()
    def _teacher_logits(self) -> torch.Tensor:
        """The teacher's logits on every item (rows of real items stay 0: only synthetic ones are distilled)."""
        ds, teacher = self.dataset, self.teacher
        plain = MixedFolderDataset(self.out_dir, real=self.real)  # no train-time transform
        was_training = teacher.training
        teacher.eval()
        try:
            rows = [
                teacher(torch.stack([plain[i]["image"] for i in range(s, min(s + 256, len(ds)))])).float().cpu()
                for s in range(ds.n_real, len(ds), 256)
            ]
        finally:
            teacher.train(was_training)
        full = torch.zeros(len(ds), rows[0].shape[1] if rows else 1)
        if rows:
            full[ds.n_real :] = torch.cat(rows)
        return full

    def _collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch = {
            "image": torch.stack([it["image"] for it in items]),
            "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
            "synthetic": torch.tensor([it["synthetic"] for it in items], dtype=torch.bool),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        }
        if self.teacher_logits is not None:
            batch["teacher_logits"] = self.teacher_logits[batch["index"]]
        return batch

    def train_dataloader(self) -> ResumableDataLoader:
        if self.dataset is None:
            self.setup("fit")
        sampler = self.dataset.sampler(self.policy, self.batch_size, seed=self.seed)
        return ResumableDataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self._collate,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
        )
