"""DETR data mapper: the official DETR training augmentation expressed with detectron2 transforms.

Training: random flip; then with probability ``crop_prob`` (0.5) either
  (a) multi-scale resize: shorter side chosen from INPUT.MIN_SIZE_TRAIN, longer side <= MAX_SIZE_TRAIN,
  (b) resize the shorter side to one of INPUT.DETR.CROP_RESIZE, random crop of
      [CROP_MIN, CROP_MAX] px per side ("absolute_range"), then the multi-scale resize of (a).
Test: ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST).

Crowd annotations are dropped, boxes are clipped to the augmented image and degenerate ones removed.
An image left without boxes is kept (INPUT.DETR.KEEP_EMPTY) or the mapper returns ``None`` so that
detectron2's ``MapDataset`` retries another image (see :func:`patch_detectron2_map_dataset`).
"""
from __future__ import annotations

import copy
import logging
import sys
from typing import List, Optional

import numpy as np
import torch

from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Boxes, BoxMode, Instances

from ..utils.images import ImageReadError, read_image

__all__ = ["DetrDatasetMapper", "ImageReadError", "build_detr_augmentations", "patch_detectron2_map_dataset"]

logger = logging.getLogger(__name__)


def _flip_augmentation(random_flip: str) -> List[T.Augmentation]:
    if random_flip == "none":
        return []
    if random_flip not in ("horizontal", "vertical"):
        raise ValueError(f"INPUT.RANDOM_FLIP must be 'horizontal', 'vertical' or 'none', got {random_flip!r}")
    return [T.RandomFlip(prob=0.5, horizontal=random_flip == "horizontal", vertical=random_flip == "vertical")]


def build_detr_augmentations(cfg, is_train: bool = True):
    """(augmentations, crop_augmentations) lists of the DETR recipe; ``crop_augmentations`` is None
    at test time or when INPUT.DETR.CROP_ENABLED is False."""
    if not is_train:
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")], None
    flip = _flip_augmentation(cfg.INPUT.RANDOM_FLIP)
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)
    augs = flip + [resize]
    crop_augs = None
    d = cfg.INPUT.DETR
    if d.CROP_ENABLED:
        crop_min, crop_max = int(d.CROP_MIN), int(d.CROP_MAX)
        if not 0 < crop_min <= crop_max:
            raise ValueError(f"INPUT.DETR needs 0 < CROP_MIN <= CROP_MAX, got CROP_MIN={crop_min}, CROP_MAX={crop_max}")
        if len(d.CROP_RESIZE) == 0:
            raise ValueError("INPUT.DETR.CROP_RESIZE must list at least one size when CROP_ENABLED")
        crop_augs = flip + [
            T.ResizeShortestEdge(list(d.CROP_RESIZE), max_size=sys.maxsize, sample_style="choice"),
            T.RandomCrop("absolute_range", (crop_min, crop_max)),
            resize,
        ]
    return augs, crop_augs


class DetrDatasetMapper:
    """Map a detectron2 dataset dict to the model input of DETR-family detectors.

    Output: the input dict (deep-copied) with "image" (uint8 CxHxW tensor in ``image_format``),
    "height"/"width" (the original image size, used to rescale predictions), and when training
    "instances" (``Instances`` with ``gt_boxes``: ``Boxes`` XYXY absolute in the augmented image and
    ``gt_classes``: int64); "annotations" is removed. Returns ``None`` for a training image without
    boxes when ``keep_empty`` is False.
    """

    @configurable
    def __init__(
        self,
        *,
        is_train: bool = True,
        augmentations: List[T.Augmentation],
        crop_augmentations: Optional[List[T.Augmentation]] = None,
        crop_prob: float = 0.5,
        image_format: str = "RGB",
        keep_empty: bool = True,
    ):
        """
        Args:
            is_train: training mode (annotations turned into ``instances``) or inference.
            augmentations: applied in branch (a) (and always when ``crop_augmentations`` is None).
            crop_augmentations: applied instead with probability ``crop_prob`` (branch (b)).
            image_format: PIL mode or "BGR" given to ``detection_utils.read_image``.
            keep_empty: keep training images whose boxes all vanished / had none.
        """
        if not 0.0 <= crop_prob <= 1.0:
            raise ValueError(f"crop_prob must be in [0, 1], got {crop_prob}")
        self.is_train = is_train
        self.augmentations = T.AugmentationList(list(augmentations))
        self.crop_augmentations = None if crop_augmentations is None else T.AugmentationList(list(crop_augmentations))
        self.crop_prob = float(crop_prob)
        self.image_format = image_format
        self.keep_empty = keep_empty
        mode = "training" if is_train else "inference"
        logger.info(f"[DetrDatasetMapper] {mode}: {self.augmentations}; crop branch (p={crop_prob}): {self.crop_augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        augs, crop_augs = build_detr_augmentations(cfg, is_train)
        return {
            "is_train": is_train,
            "augmentations": augs,
            "crop_augmentations": crop_augs,
            "crop_prob": 0.5,
            "image_format": cfg.INPUT.FORMAT,
            "keep_empty": cfg.INPUT.DETR.KEEP_EMPTY,
        }

    def __call__(self, dataset_dict: dict) -> Optional[dict]:
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image(dataset_dict["file_name"], format=self.image_format)  # ImageReadError naming the file
        utils.check_image_size(dataset_dict, image)

        aug_input = T.AugInput(image)
        augmentations = self.augmentations
        # np.random: detectron2 seeds it per data-loader worker, like its own augmentations use it.
        if self.crop_augmentations is not None and np.random.rand() < self.crop_prob:
            augmentations = self.crop_augmentations
        transforms = augmentations(aug_input)
        image = aug_input.image
        h, w = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        annos = dataset_dict.pop("annotations", None)
        if not self.is_train:
            return dataset_dict

        annos = [a for a in (annos or []) if int(a.get("iscrowd", 0)) == 0]
        boxes = np.zeros((0, 4), dtype=np.float64)
        classes = np.zeros((0,), dtype=np.int64)
        if annos:
            boxes = np.asarray(
                [BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos], dtype=np.float64
            ).reshape(-1, 4)
            classes = np.asarray([int(a["category_id"]) for a in annos], dtype=np.int64)
            # degenerate input boxes first: apply_box takes min/max of the corners, which would turn
            # a negative-size box into a valid one
            valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, classes = boxes[valid], classes[valid]
            if len(boxes):
                boxes = transforms.apply_box(boxes)
            boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # e.g. cropped away
            boxes, classes = boxes[keep], classes[keep]

        if len(boxes) == 0 and not self.keep_empty:
            return None
        instances = Instances((h, w))
        instances.gt_boxes = Boxes(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        instances.gt_classes = torch.as_tensor(classes, dtype=torch.int64)
        dataset_dict["instances"] = instances
        return dataset_dict


# ----------------------------------------------------------------------------------------------
# detectron2 v0.6's MapDataset retries another element when the mapper returns None, picking it
# with ``random.Random.sample(<set>, k=1)``; Python >= 3.11 rejects sets there (TypeError), so the
# retry path crashes. This replacement keeps the behaviour (random other element, warning after
# 3 retries) and fails with a clear message when no element at all can be mapped.


def _map_dataset_getitem(self, idx):
    retries = 0
    cur = int(idx)
    while True:
        data = self._map_func(self._dataset[cur])
        if data is not None:
            self._fallback_candidates.add(cur)
            return data
        retries += 1
        self._fallback_candidates.discard(cur)
        if not self._fallback_candidates:
            raise RuntimeError(
                "The dataset mapper returned None for every element of the dataset "
                "(e.g. no image has annotations and INPUT.DETR.KEEP_EMPTY is False)."
            )
        cur = self._rng.choice(sorted(self._fallback_candidates))
        if retries >= 3:
            logger.warning(f"Mapping dataset element {idx} failed; retry {retries} with element {cur}")


def patch_detectron2_map_dataset() -> bool:
    """Install the Python-3.11-safe retry in detectron2's MapDataset (idempotent). Returns True if
    the patch is active."""
    from detectron2.data import common

    if getattr(common.MapDataset.__getitem__, "_smca_detr_patched", False):
        return True
    if sys.version_info < (3, 11):
        return False
    _map_dataset_getitem._smca_detr_patched = True
    common.MapDataset.__getitem__ = _map_dataset_getitem
    return True
