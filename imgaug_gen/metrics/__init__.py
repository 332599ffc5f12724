"""Image-quality metrics: feature extractors and FID/KID against real images.

Images cross this API as numpy uint8 arrays ``[N, H, W, C]`` (C = 1 or 3) and
int64 labels ``[N]``. This package never imports ``imgaug_gen.generators`` or
Lightning.
"""

from imgaug_gen.metrics.features import (
    FEATURE_KINDS,
    DomainFeatures,
    FeatureExtractor,
    InceptionFeatures,
    build_feature_extractor,
    fit_domain_features,
    images_to_tensor,
)
from imgaug_gen.metrics.fidelity import FidelityEvaluator, clear_real_stats_cache, compute_fidelity, images_hash

__all__ = [
    "FEATURE_KINDS",
    "DomainFeatures",
    "FeatureExtractor",
    "FidelityEvaluator",
    "InceptionFeatures",
    "build_feature_extractor",
    "clear_real_stats_cache",
    "compute_fidelity",
    "fit_domain_features",
    "images_hash",
    "images_to_tensor",
]
