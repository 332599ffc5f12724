"""Step-indexed, resumable batch sampling: a batch is a pure function of its index, and the loader knows how
far it got, so a resumed run sees exactly the batches an uninterrupted run would have seen."""

from __future__ import annotations

from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset

DEFAULT_NUM_BATCHES = 10**7


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
