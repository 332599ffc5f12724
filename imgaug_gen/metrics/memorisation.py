"""Memorisation of a generator's images: how many are near-copies of the training images (pixel L2)."""

from __future__ import annotations

import numpy as np

#: a synthetic image is a near-copy when it is nearer to a training image than all but this share of fresh
#: real images are: by construction, held-out real images have a copy rate of this share
COPY_QUANTILE = 0.05


def memorisation(synthetic: np.ndarray, real: np.ndarray, heldout: np.ndarray) -> dict[str, float | None]:
    """Near-copies of the training images among the synthetic ones (pixel L2, the quality filter's
    nearest-real distance):

    * ``memorisation``: share nearer to a training image than the training images are to each other
      (the median of their leave-one-out nearest-neighbour distances). With 5-10 images per class
      the training images are far apart and almost anything scores near 1.
    * ``copy_rate``: share nearer to a training image than the 5 % quantile of *held-out real* images'
      nearest-training distances (validation images; test images when there is no validation split:
      a diagnostic, never used to choose). Fresh real data scores 0.05 by construction; a generator
      that adds new images of the class scores near it, one that copies scores well above.
    """
    from imgaug_gen.filtering import nearest_real_distance

    def flat(x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), -1).astype(np.float32)

    r = flat(real)
    d_real, _ = nearest_real_distance(r, r, metric="l2", exclude_self=True)
    d_syn, _ = nearest_real_distance(flat(synthetic), r, metric="l2")
    out: dict[str, float | None] = {"memorisation": float(np.mean(d_syn < np.median(d_real))), "copy_rate": None}
    if len(heldout):
        d_fresh, _ = nearest_real_distance(flat(heldout), r, metric="l2")
        out["copy_rate"] = float(np.mean(d_syn < np.quantile(d_fresh, COPY_QUANTILE)))
    return out
