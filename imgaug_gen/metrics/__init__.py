"""Image-quality metrics: feature extractors and FID/KID against real images.

Images cross this API as numpy uint8 arrays ``[N, H, W, C]`` (C = 1 or 3) and
int64 labels ``[N]``. This package never imports ``imgaug_gen.generators`` or
Lightning.
"""

from imgaug_gen.metrics.domain import DomainFeatures, fit_domain_features
from imgaug_gen.metrics.features import FEATURE_KINDS, FeatureExtractor, build_feature_extractor, images_to_tensor
from imgaug_gen.metrics.fidelity import (
    FeatureFID,
    FeatureKID,
    FidelityEvaluator,
    clear_real_stats_cache,
    compute_fidelity,
    fidelity_from_features,
    images_hash,
)
from imgaug_gen.metrics.precision_recall import (
    PRDC_KEYS,
    per_class_fidelity,
    per_class_fidelity_from_features,
    precision_recall,
    precision_recall_images,
)
from imgaug_gen.metrics.pretrained import CLIPFeatures, DINOv2Features, InceptionFeatures

#: Loaded on first use (the downstream classifier is not needed to score images).
_LAZY = {
    "train_and_test": "imgaug_gen.metrics.downstream",
    "compare_methods": "imgaug_gen.metrics.downstream",
    "classification_accuracy_score": "imgaug_gen.metrics.downstream",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CLIPFeatures",
    "DINOv2Features",
    "FEATURE_KINDS",
    "DomainFeatures",
    "FeatureExtractor",
    "FeatureFID",
    "FeatureKID",
    "FidelityEvaluator",
    "InceptionFeatures",
    "build_feature_extractor",
    "classification_accuracy_score",
    "clear_real_stats_cache",
    "compare_methods",
    "compute_fidelity",
    "fidelity_from_features",
    "fit_domain_features",
    "images_hash",
    "images_to_tensor",
    "per_class_fidelity",
    "per_class_fidelity_from_features",
    "PRDC_KEYS",
    "precision_recall",
    "precision_recall_images",
    "train_and_test",
]
