"""Checkpoints: ``SmcaDetrCheckpointer`` (atomic saves, safe loading, strict matching), conversion of
official SMCA / Conditional / Deformable DETR weights, ``smca_detr://`` shipped weights."""
from .checkpointer import SmcaDetrCheckpointer, atomic_write
from .common import (coco_official_columns, convert_backbone, convert_torchvision_resnet, is_torchvision_resnet,
                     objectness_head_keys, remap_class_rows, rename_official_backbone_key)
from .matching import CheckpointMismatchError
from .safe_load import UnsafeCheckpointError, safe_torch_load

__all__ = ["SmcaDetrCheckpointer", "atomic_write", "CheckpointMismatchError", "safe_torch_load",
           "UnsafeCheckpointError", "rename_official_backbone_key", "convert_backbone", "coco_official_columns",
           "remap_class_rows", "objectness_head_keys", "is_torchvision_resnet", "convert_torchvision_resnet"]
