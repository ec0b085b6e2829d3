"""Data: the embedded synthetic dataset (registered here, generated on first use) and the DETR mapper."""
from .mapper import DetrDatasetMapper, ImageReadError, build_detr_augmentations, patch_detectron2_map_dataset
from .synthetic import (CATEGORIES, SPLITS, ensure_synthetic, generate_split, get_root, load_synthetic,
                        register_synthetic_datasets, set_root, split_paths)

__all__ = ["CATEGORIES", "SPLITS", "DetrDatasetMapper", "ImageReadError", "build_detr_augmentations",
           "ensure_synthetic", "generate_split", "get_root", "load_synthetic", "patch_detectron2_map_dataset",
           "register_synthetic_datasets", "set_root", "split_paths"]

patch_detectron2_map_dataset()  # detectron2 v0.6 + Python 3.11: make "mapper returns None" retry work
register_synthetic_datasets()  # cheap: catalog entries only, nothing is generated at import
