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
  index, like :class:`~imgaug_gen.data.base.StepBatchSampler`, so Lightning resumes it exactly).
* :func:`mixed_loss` -- the policy's loss for a batch (per-sample weights, soft targets).
* :class:`MixedFolderDataset` / :class:`MixedDataModule` -- a ``generate.py`` output folder read
  through its manifest, for training *your own* classifier the recommended way.

The downstream evaluation (``evaluate.py``) trains its fixed-recipe classifier through the same
sampler and loss (:func:`imgaug_gen.metrics.downstream.train_and_test`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from imgaug_gen.data.base import (
    DEFAULT_NUM_BATCHES,
    EpochBatches,
    ResumableDataLoader,
    dist_rank_world,
    take_from_epochs,
)
from imgaug_gen.errors import ConfigError, require

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

POLICIES = ("concat", "replace", "weighted")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


@dataclass(frozen=True)
class MixPolicy:
    """How real and synthetic images are drawn and what synthetic images are trained toward.

    ``name``: ``concat`` | ``replace`` | ``weighted``. ``p``: the replacement probability
    (``replace``) or the synthetic share of every batch (``weighted``); unused by ``concat``.
    ``synthetic_weight``: loss weight of synthetic images (any policy). ``label_smoothing``:
    label smoothing of synthetic targets (real images keep the trainer's own). ``distill``: weight
    of the teacher's soft targets on synthetic images (0 = off; needs teacher logits).
    ``temperature``: the distillation temperature.
    """

    name: str = "concat"
    p: float = 0.5
    synthetic_weight: float = 1.0
    label_smoothing: float = 0.0
    distill: float = 0.0
    temperature: float = 2.0

    def __post_init__(self) -> None:
        self.check()

    def check(self, key: str = "policy") -> None:
        require(self.name in POLICIES, f"`{key}.name` = {self.name!r}; allowed: {list(POLICIES)}.")
        require(
            _is_number(self.p) and 0.0 <= float(self.p) <= 1.0,
            f"`{key}.p` = {self.p!r}; give a probability in [0, 1] (replace: chance a drawn real image is "
            "swapped for a synthetic one; weighted: synthetic share of each batch).",
        )
        require(
            _is_number(self.synthetic_weight) and float(self.synthetic_weight) >= 0.0,
            f"`{key}.synthetic_weight` = {self.synthetic_weight!r}; give a number >= 0.",
        )
        require(
            _is_number(self.label_smoothing) and 0.0 <= float(self.label_smoothing) < 1.0,
            f"`{key}.label_smoothing` = {self.label_smoothing!r}; give a number in [0, 1).",
        )
        require(
            _is_number(self.distill) and 0.0 <= float(self.distill) <= 1.0,
            f"`{key}.distill` = {self.distill!r}; give a weight in [0, 1] (0 = no teacher).",
        )
        require(
            _is_number(self.temperature) and float(self.temperature) > 0.0,
            f"`{key}.temperature` = {self.temperature!r}; give a number > 0 (2 is usual).",
        )

    @classmethod
    def from_config(cls, cfg: "MixPolicy | Mapping[str, Any] | str | None", key: str = "policy") -> "MixPolicy":
        """A policy from a mapping (Hydra node, dict), a policy name, or a policy; errors name ``key``."""
        if isinstance(cfg, MixPolicy):
            return cfg
        if cfg is None:
            return cls()
        if isinstance(cfg, str):
            cfg = {"name": cfg}
        require(isinstance(cfg, Mapping), f"`{key}` = {cfg!r}; give a mapping like {{name: replace, p: 0.5}}.")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - fields)
        require(not unknown, f"`{key}` has unknown key(s) {unknown}; allowed: {sorted(fields)}.")
        try:
            return cls(**{k: cfg[k] for k in cfg})
        except ConfigError as e:
            raise ConfigError(str(e).replace("`policy.", f"`{key}.")) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def tag(self) -> str:
        """A short name for tables: ``replace(p=0.3)+kd0.5``."""
        s = self.name if self.name == "concat" else f"{self.name}(p={self.p:g})"
        if self.synthetic_weight != 1.0:
            s += f"+w{self.synthetic_weight:g}"
        if self.label_smoothing:
            s += f"+ls{self.label_smoothing:g}"
        if self.distill:
            s += f"+kd{self.distill:g}"
        return s


class MixedBatchSampler(EpochBatches):
    """Batches of item indices under a :class:`MixPolicy`; endless, deterministic, resumable.

    Items ``0 .. n_real-1`` are real (``real_groups[i]``: which real image item ``i`` is a view of
    -- itself, or the image a classical copy was made from), items ``n_real .. n_real+n_syn-1``
    synthetic (``syn_groups[j]``: the real image synthetic ``j`` edits, ``-1`` for a sample from
    noise). Global batch ``b`` depends only on ``(seed, b)``: a resumed loader (``start_batch``)
    continues exactly. Under DDP rank ``r`` takes its slice ``[r*B, (r+1)*B)`` of each global batch.

    * ``concat``: permutations of all items, back to back.
    * ``replace``: permutations of the real items; position ``k`` of epoch ``e`` is swapped with
      probability ``p`` for a synthetic item whose group is the drawn item's group, or a sampled
      synthetic image of its class (``syn_groups == -1``); kept when there is none.
    * ``weighted``: ``round(p*B)`` synthetic items from a stream of synthetic permutations, the rest
      from a stream of real permutations.
    """

    def __init__(
        self,
        real_labels: Sequence[int],
        syn_labels: Sequence[int],
        policy: MixPolicy,
        batch_size: int,
        *,
        real_groups: Sequence[int] | None = None,
        syn_groups: Sequence[int] | None = None,
        seed: int = 0,
        num_batches: int = DEFAULT_NUM_BATCHES,
        rank: int | None = None,
        world_size: int | None = None,
        sampler: Any = None,
    ) -> None:
        # BatchSampler.__init__ is not called on purpose: there is no inner sampler.
        self.real_labels = np.asarray(real_labels, dtype=np.int64)
        self.syn_labels = np.asarray(syn_labels, dtype=np.int64)
        n_real, n_syn = len(self.real_labels), len(self.syn_labels)
        require(n_real > 0, "the mixed set has no real images; a policy mixes synthetic images *into* real ones.")
        require(
            isinstance(batch_size, (int, np.integer)) and batch_size >= 1,
            f"`batch_size` = {batch_size!r}; give a positive int.",
        )
        self.real_groups = np.arange(n_real) if real_groups is None else np.asarray(real_groups, dtype=np.int64)
        self.syn_groups = np.full(n_syn, -1) if syn_groups is None else np.asarray(syn_groups, dtype=np.int64)
        require(
            len(self.real_groups) == n_real and len(self.syn_groups) == n_syn,
            "`real_groups` / `syn_groups` must have one entry per real / synthetic item.",
        )
        self.policy = MixPolicy.from_config(policy)
        if sampler is not None and hasattr(sampler, "num_replicas") and hasattr(sampler, "rank"):
            rank, world_size = int(sampler.rank), int(sampler.num_replicas)
        d_rank, d_world = dist_rank_world()
        self.rank = d_rank if rank is None else int(rank)
        self.world_size = d_world if world_size is None else int(world_size)
        self.sampler = sampler
        self.batch_size, self.seed, self.num_batches = int(batch_size), int(seed), int(num_batches)
        self.drop_last = False
        self.start_batch = 0
        self.n_real, self.n_syn = n_real, n_syn
        self._cache: dict[tuple, np.ndarray] = {}
        if self.policy.name == "replace":
            self._candidates = self._replacement_candidates()
        if n_syn == 0 and self.policy.name != "concat":
            log.warning("policy %s with no synthetic images: every batch is real", self.policy.name)

    # -- replacement candidates: own edits, plus sampled images of the class ------------------------
    def _replacement_candidates(self) -> list[np.ndarray]:
        by_group: dict[int, list[int]] = {}
        by_class: dict[int, list[int]] = {}
        for j, (g, y) in enumerate(zip(self.syn_groups.tolist(), self.syn_labels.tolist())):
            (by_class.setdefault(y, []) if g < 0 else by_group.setdefault(g, [])).append(self.n_real + j)
        return [
            np.asarray(by_group.get(g, []) + by_class.get(y, []), dtype=np.int64)
            for g, y in zip(self.real_groups.tolist(), self.real_labels.tolist())
        ]

    def candidates(self, real_item: int) -> np.ndarray:
        """The synthetic items that may replace real item ``real_item`` (``replace`` policy)."""
        return self._candidates[real_item]

    # -- streams: 0 real with replacements, 1 synthetic, 2 everything, 3 real ----------------------------
    def _epoch(self, stream: int, n: int, epoch: int) -> np.ndarray:
        key = (stream, epoch)
        out = self._cache.get(key)
        if out is None:
            rng = np.random.default_rng([self.seed, stream, epoch])
            out = rng.permutation(n)
            if stream == 0:
                out = self._replace(out, rng)
            elif stream == 1:
                out = out + self.n_real
            if len(self._cache) >= 8:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = out
        return out

    def _replace(self, perm: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        coins = rng.random(len(perm)) < float(self.policy.p)
        picks = rng.random(len(perm))
        out = perm.copy()
        for k in np.flatnonzero(coins):
            cands = self._candidates[perm[k]]
            if len(cands):
                out[k] = cands[min(int(picks[k] * len(cands)), len(cands) - 1)]
        return out

    def _take(self, stream: int, n_items: int, start: int, count: int) -> np.ndarray:
        return take_from_epochs(lambda e: self._epoch(stream, n_items, e), n_items, start, count)

    def global_batch(self, b: int) -> np.ndarray:
        """Item indices of global batch ``b`` (every rank's slice, rank 0 first)."""
        bs, world, name = self.batch_size, self.world_size, self.policy.name
        if name == "concat":
            return self._take(2, self.n_real + self.n_syn, b * bs * world, bs * world)
        if name == "replace":
            return self._take(0, self.n_real, b * bs * world, bs * world)
        n_syn = int(round(float(self.policy.p) * bs)) if self.n_syn else 0
        n_real = bs - n_syn  # per rank: every rank's slice keeps the share
        real = self._take(3, self.n_real, b * n_real * world, n_real * world).reshape(world, n_real)
        syn = self._take(1, self.n_syn, b * n_syn * world, n_syn * world).reshape(world, n_syn)
        return np.concatenate([real, syn], axis=1).reshape(-1)

    def batch(self, b: int) -> list[int]:
        """This rank's item indices of global batch ``b``."""
        g = self.global_batch(b)
        return g[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()


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
            from imgaug_gen.data.manifest import record_path
            from imgaug_gen.io import read_image_array

            rec = self._item_records[i]
            a = read_image_array(
                record_path(self.out_dir, rec),
                f"`{self.out_dir / self.files[i]}` (manifest line {rec.get('id')!r})",
                expect_size=self._size,
            )
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
