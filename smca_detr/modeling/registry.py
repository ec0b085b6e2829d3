"""Registries of smca_detr (detectron2 ``Registry`` objects), so users can plug their own parts."""
from detectron2.utils.registry import Registry

TRANSFORMER_REGISTRY = Registry("SMCA_DETR_TRANSFORMER")
TRANSFORMER_REGISTRY.__doc__ = """
Transformers of DETR-family detectors. A registered class is built with ``cls(cfg, input_shapes)``
where ``input_shapes`` is the list of detectron2 ``ShapeSpec`` of the backbone levels it receives
(finest first). It owns the input projections, position encodings and object queries, and its
``forward(features, masks, image_sizes, heads)`` returns a ``TransformerOutput``.
"""

CRITERION_REGISTRY = Registry("SMCA_DETR_CRITERION")
CRITERION_REGISTRY.__doc__ = """
Set criteria (matcher + losses). A registered class is built with ``cls(cfg)`` and called as
``criterion(outputs, targets) -> dict of weighted losses``.
"""
