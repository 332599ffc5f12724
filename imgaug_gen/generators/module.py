"""The training side of a generator kind: the LightningModule contract ``train.py`` relies on."""

from __future__ import annotations

import functools
import inspect
from typing import Any, ClassVar, Mapping, Sequence

import pytorch_lightning as pl
import torch

from imgaug_gen.generators.base import ConditionalGenerator


class GeneratorModule(pl.LightningModule):
    """Base class of every kind's training module.

    ``train.py`` builds it from ``conf/model/<kind>.yaml`` (``_target_`` = the subclass) with the
    data's facts injected as keyword arguments: ``num_classes``, ``class_names`` and
    ``image_shape`` (C, H, W); every other constructor argument comes from the YAML. The
    callbacks (sample grids, validation FID, export) reach the model only through
    :meth:`to_generator`, so a new kind gets them, checkpoints and exact resume for free.
    """

    #: DDP must look for parameters without gradients (a GAN's D step leaves G unused).
    ddp_find_unused_parameters: ClassVar[bool] = False
    #: the kind trains on unlabelled images (label -1 in a batch: `data.unlabeled`); others refuse them
    trains_unlabeled: ClassVar[bool] = False
    #: the seed of the training noise (:meth:`training_noise`); kinds set it from their config
    noise_seed: int = 0
    #: training batches drawn so far (saved in checkpoints, so a resumed run continues the noise stream)
    batches_seen: int = 0

    def __init_subclass__(cls, **kwargs) -> None:
        """Every kind's constructor checks its arguments against its own annotations (types, ranges, choices:
        the same schema ``train.py`` reads before anything is built), also when called from Python."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def checked(self, *args, **kw):
            if type(self) is cls:  # the built class checks, once (not each base constructor it calls)
                from imgaug_gen.schemas import check_args

                bound = inspect.signature(init).bind(self, *args, **kw)
                check_args(cls, "model", {k: v for k, v in bound.arguments.items() if k not in ("self", "kwargs")})
            init(self, *args, **kw)

        cls.__init__ = checked

    def training_noise(self) -> torch.Generator:
        """The random numbers of one training batch (noise, timesteps, label dropout, ...): a generator
        seeded by ``(noise_seed, batches seen, rank)`` only. Every kind draws its training noise here, so a
        run resumed from a checkpoint draws exactly what an uninterrupted one would, whatever else uses
        torch's global RNG, and each DDP rank draws its own stream. Call it once per batch."""
        import numpy as np

        seed = np.random.SeedSequence([int(self.noise_seed), int(self.batches_seen), int(self.global_rank)])
        self.batches_seen += 1
        return torch.Generator(device=self.device).manual_seed(int(seed.generate_state(1, np.uint64)[0] >> 1))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["training_noise"] = {"batches_seen": int(self.batches_seen)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.batches_seen = int((checkpoint.get("training_noise") or {}).get("batches_seen", 0))

    @classmethod
    def accepts_unlabeled(cls, args: Mapping[str, Any]) -> bool:
        """Whether a model built from the ``model`` block ``args`` trains on unlabelled images in its batches
        (label -1); by default the kind's :attr:`trains_unlabeled`."""
        return bool(cls.trains_unlabeled)

    @classmethod
    def check_config(cls, args: Mapping[str, Any], image_shape: Sequence[int]) -> None:
        """Checks of the ``model`` block against the data's (C, H, W) that ``train.py`` runs before any
        image is read (a prior of another size, say); ``args`` are the block's arguments. None here."""

    def to_generator(self) -> ConditionalGenerator:
        """The current (EMA) model behind the generator contract, sharing this module's weights."""
        raise NotImplementedError(f"{type(self).__name__} must implement to_generator()")

    def log_interval_mean(self, name: str, value: torch.Tensor) -> None:
        """Log the mean of ``value`` over each logging interval, at the steps Lightning writes its
        logs (every ``trainer.log_every_n_steps`` optimiser steps, and at the last step), instead of
        one step's value at every step.

        The values are summed on their device (no host sync), so ``metrics.csv``, the progress bar
        and ``train()``'s returned metrics show the mean of every step since the previous write -
        what a curve of a noisy per-step loss should show, as Hugging Face's ``Trainer`` logs it -
        and Lightning's per-call ``self.log`` work (about 0.6 ms on CPU: a few percent of a small
        model's step) is paid once per interval. A resumed run's first interval starts at the resume.
        """
        if self._trainer is None:  # called outside a Trainer (a direct training_step call)
            return
        sums = getattr(self, "_interval_sums", None)
        if sums is None:
            self._interval_sums = sums = {}
        total, count = sums.get(name, (0.0, 0))
        total, count = value.detach() + total, count + 1
        step, trainer = self.global_step + 1, self.trainer
        if step % max(int(trainer.log_every_n_steps), 1) == 0 or 0 < trainer.max_steps <= step:
            self.log(name, total / count, prog_bar=True, on_step=True, on_epoch=False)
            sums.pop(name, None)
        else:
            sums[name] = (total, count)
