"""The training side of a generator kind: the LightningModule contract ``train.py`` relies on."""

from __future__ import annotations

from typing import ClassVar

import pytorch_lightning as pl

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

    def to_generator(self) -> ConditionalGenerator:
        """The current (EMA) model behind the generator contract, sharing this module's weights."""
        raise NotImplementedError(f"{type(self).__name__} must implement to_generator()")
