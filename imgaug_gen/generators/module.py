"""The training side of a generator kind: the LightningModule contract ``train.py`` relies on."""

from __future__ import annotations

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
