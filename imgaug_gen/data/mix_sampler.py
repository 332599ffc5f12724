"""Batches of real + synthetic items under a :class:`~imgaug_gen.data.mix_policy.MixPolicy`
(:class:`MixedBatchSampler`): endless, deterministic and resumable."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from imgaug_gen.data.mix_policy import MixPolicy
from imgaug_gen.data.samplers import DEFAULT_NUM_BATCHES, EpochBatches, dist_rank_world, take_from_epochs
from imgaug_gen.errors import require

log = logging.getLogger("imgaug_gen.data.mixed")  # the logger it always logged to


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
