"""Modeling: meta-architecture, backbone adapter, transformers, heads, matcher, criterion."""
from . import slim_resnet  # noqa: F401  (registers build_slim_resnet_backbone)
from . import transformers  # noqa: F401  (registers the transformers)
from .criterion import SetCriterion, build_criterion
from .matcher import HungarianMatcher
from .meta_arch import SmcaDetrDetector, build_transformer
from .registry import CRITERION_REGISTRY, TRANSFORMER_REGISTRY

__all__ = ["SmcaDetrDetector", "SetCriterion", "HungarianMatcher", "build_criterion", "build_transformer",
           "CRITERION_REGISTRY", "TRANSFORMER_REGISTRY"]
