"""imgaug_gen: generative image data augmentation.

Public API (imports are lazy, so ``import imgaug_gen`` is cheap)::

    from imgaug_gen import compose_config, train, generate, load_generator
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ConfigError": "imgaug_gen.errors",
    "compose_config": "imgaug_gen.config",
    "train": "imgaug_gen.jobs.train",
    "generate": "imgaug_gen.jobs.generate",
    "load_generator": "imgaug_gen.generators.base",
    "ConditionalGenerator": "imgaug_gen.generators.base",
    "register_generator": "imgaug_gen.generators.base",
    "DigitsDataModule": "imgaug_gen.data",
    "LabeledFolderDataModule": "imgaug_gen.data",
    "compute_fidelity": "imgaug_gen.metrics",
    "build_feature_extractor": "imgaug_gen.metrics",
    "class_grid": "imgaug_gen.visual",
    "tile": "imgaug_gen.visual",
    "progress_plot": "imgaug_gen.visual",
    "preview_sheet": "imgaug_gen.visual",
    "read_manifest": "imgaug_gen.export",
    "evaluate": "imgaug_gen.jobs.evaluate",
    "train_and_test": "imgaug_gen.metrics.downstream",
    "compare_methods": "imgaug_gen.metrics.downstream",
    "classification_accuracy_score": "imgaug_gen.metrics.downstream",
    "plot_accuracy_vs_shots": "imgaug_gen.metrics.downstream",
    "build_augmenter": "imgaug_gen.augment",
    "MixPolicy": "imgaug_gen.data.mixed",
    "MixedFolderDataset": "imgaug_gen.data.mixed",
    "MixedDataModule": "imgaug_gen.data.mixed",
    "mixed_loss": "imgaug_gen.data.mixed",
    "paired_gain": "imgaug_gen.metrics.stats",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'imgaug_gen' has no attribute {name!r}")


def __dir__():
    return __all__
