"""Pseudo-labels: a teacher classifier's labels for unlabelled images, kept above a confidence.

A pseudo-label is data with a confidence: :func:`pseudo_label` returns, for every image it keeps, its
index in the pool, the teacher's class and the teacher's softmax probability of that class, so whoever
trains on them can record them as such (``source: pseudo`` and ``confidence`` in a manifest).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from imgaug_gen.errors import require


@dataclass
class PseudoLabels:
    """The kept images of a pool: their indices into it, the teacher's labels and confidences."""

    index: np.ndarray  # int64 [K], into the pool, ascending
    labels: np.ndarray  # int64 [K]
    confidence: np.ndarray  # float32 [K], the teacher's probability of `labels`
    threshold: float
    pool_size: int

    def __len__(self) -> int:
        return len(self.index)

    def per_class(self, num_classes: int) -> list[int]:
        return np.bincount(self.labels, minlength=num_classes).tolist()

    def records(self, ids: list[str], class_names: list[str], teacher: str) -> list[dict]:
        """One manifest-style row per kept image (``ids``: the pool's ids, in pool order)."""
        return [
            {
                "id": ids[int(i)],
                "label": int(y),
                "class_name": class_names[int(y)],
                "source": "pseudo",
                "confidence": round(float(c), 6),
                "teacher": teacher,
                "threshold": self.threshold,
            }
            for i, y, c in zip(self.index, self.labels, self.confidence)
        ]


def teacher_confidences(model, images: np.ndarray, input_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's top class (int64 ``[N]``) and its softmax probability (float32 ``[N]``) for uint8
    ``images`` ``[N, H, W, C]``; ``model``: a :func:`imgaug_gen.metrics.downstream.train_and_test` model
    (``return_model=True``)."""
    import torch

    from imgaug_gen.metrics.downstream import predict_logits

    if len(images) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    probs = torch.softmax(predict_logits(model, images, input_size).float(), dim=1)
    conf, labels = probs.max(dim=1)
    return labels.numpy().astype(np.int64), conf.numpy().astype(np.float32)


def keep_confident(labels: np.ndarray, confidence: np.ndarray, threshold: float) -> PseudoLabels:
    """The images of a labelled pool (:func:`teacher_confidences`) whose confidence is ``>= threshold``."""
    require(0.0 <= float(threshold) <= 1.0, f"the pseudo-label `threshold` = {threshold!r}; give a value in [0, 1].")
    labels, confidence = np.asarray(labels, dtype=np.int64), np.asarray(confidence, dtype=np.float32)
    require(labels.shape == confidence.shape, "pseudo-labels: one confidence per label.")
    keep = confidence.astype(np.float64) >= float(threshold)
    return PseudoLabels(
        index=np.flatnonzero(keep).astype(np.int64),
        labels=labels[keep],
        confidence=confidence[keep],
        threshold=float(threshold),
        pool_size=int(len(labels)),
    )


def pseudo_label(model, images: np.ndarray, threshold: float, input_size: int | None = None) -> PseudoLabels:
    """Label uint8 ``images`` ``[N, H, W, C]`` with a :func:`imgaug_gen.metrics.downstream.train_and_test`
    model (``return_model=True``) and keep those whose top softmax probability is ``>= threshold``."""
    require(0.0 <= float(threshold) <= 1.0, f"the pseudo-label `threshold` = {threshold!r}; give a value in [0, 1].")
    return keep_confident(*teacher_confidences(model, images, input_size), threshold)
