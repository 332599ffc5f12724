"""Classical augmentation: albumentations transforms from config, seeded per image and recorded."""

from imgaug_gen.augment.classical import APPLY_TO, Augmenter, build_augmenter, to_jsonable

__all__ = ["APPLY_TO", "Augmenter", "build_augmenter", "to_jsonable"]
