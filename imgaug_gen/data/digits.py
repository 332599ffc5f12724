"""sklearn's embedded 8x8 digits (1797 images, 10 classes) as an :class:`ImageDataModule`.

Needs no download: the default data set for quick runs and tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from imgaug_gen.data.base import ImageDataModule, LoadedImages
from imgaug_gen.data.kinds import register_data_kind


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images float [1797, 8, 8] in 0..16, labels int64) of ``sklearn.datasets.load_digits``.

    Read straight from the CSV that scikit-learn ships (what ``load_digits`` itself parses):
    importing ``sklearn`` costs over a second (pandas, scipy), more than the rest of a small
    ``generate.py`` job. Falls back to ``load_digits`` if the file is not where it was.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            data = np.loadtxt(path, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target.astype(np.int64)


@register_data_kind("digits")
class DigitsDataModule(ImageDataModule):
    """``sklearn.datasets.load_digits`` scaled to uint8, resized (bilinear) to ``image_size``.

    ``channels=1`` by default; ``channels=3`` replicates the gray channel. Record ids
    are ``digits_<index in load_digits>`` (e.g. ``digits_00017``); ``path`` is None.
    """

    def __init__(self, *, channels: Literal[1, 3] = 1, **kwargs: Any) -> None:
        """Arguments as :class:`ImageDataModule` (``image_size``, ``shots``, ``seed``, ...)."""
        super().__init__(channels=channels, **kwargs)

    def _load(self) -> LoadedImages:
        values, target = load_digits_arrays()
        raw = np.round(values * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # [N, 8, 8]
        size = int(self.image_size)
        if size != raw.shape[1]:
            raw = np.stack(
                [np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BILINEAR)) for im in raw]
            )
        images = np.repeat(raw[..., None], int(self.channels), axis=-1)
        labels = target
        n = len(labels)
        return LoadedImages(
            images=np.ascontiguousarray(images),
            labels=labels,
            class_names=[str(i) for i in range(10)],
            ids=[f"digits_{i:05d}" for i in range(n)],
            paths=[None] * n,
        )
