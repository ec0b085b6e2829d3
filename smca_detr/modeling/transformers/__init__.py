"""Registered transformers. Importing this package registers all of them."""
from .common import TransformerOutput
from .detr import DETRTransformer

__all__ = ["TransformerOutput", "DETRTransformer"]
