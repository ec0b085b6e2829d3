"""Registered transformers. Importing this package registers all of them."""
from .common import TransformerOutput
from .detr import DETRTransformer
from .smca import SMCATransformer  # noqa: F401
from .smca_multiscale import SMCAMultiScaleTransformer  # noqa: F401
from .smca_conv_multiscale import SMCAConvMultiScaleTransformer  # noqa: F401
from .conditional import ConditionalTransformer  # noqa: F401
from .deformable import DeformableTransformer  # noqa: F401

__all__ = ["TransformerOutput", "DETRTransformer"]
