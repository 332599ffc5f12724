"""Labelled few-shot image data: validated, decoded once, split and served to Lightning.

``DigitsDataModule`` (sklearn's embedded digits) and ``LabeledFolderDataModule``
(``root/<class_name>/<image>``) share the :class:`ImageDataModule` contract; training
batches come from the resumable :class:`StepBatchSampler` / :class:`ResumableDataLoader`.
:mod:`imgaug_gen.data.mixed` serves a ``generate.py`` folder's real + synthetic images under a
consumption policy (``MixPolicy``, ``MixedDataModule``).
"""

from imgaug_gen.data.base import ImageDataModule
from imgaug_gen.data.digits import DigitsDataModule
from imgaug_gen.data.folder import LabeledFolderDataModule
from imgaug_gen.data.mixed import MixedBatchSampler, MixedDataModule, MixedFolderDataset, MixPolicy, mixed_loss
from imgaug_gen.data.samplers import ResumableDataLoader, StepBatchSampler

__all__ = [
    "ImageDataModule",
    "DigitsDataModule",
    "LabeledFolderDataModule",
    "StepBatchSampler",
    "ResumableDataLoader",
    "MixPolicy",
    "MixedBatchSampler",
    "MixedFolderDataset",
    "MixedDataModule",
    "mixed_loss",
]
