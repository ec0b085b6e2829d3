"""Dataset checks run when the trainer builds its data loaders, so that bad data stops with a clear
message (or is skipped with ONE warning) instead of crashing deep inside the model.

Cheap: one pass over the annotations, no image is opened (unreadable images are reported by the
mapper, ``ImageReadError`` naming the file).

* :func:`check_dataset_names` -- every dataset name is registered; otherwise
  :class:`DatasetNotRegisteredError` naming the config key and the closest registered names.
* :func:`get_validated_dataset_dicts` -- detectron2's ``get_detection_dataset_dicts``, with the
  checks below run on each dataset before detectron2's own assertions; errors raised while loading one (e.g. ``load_coco_json``'s "Encountered category_id=7 but this id
  does not exist in 'categories' of the json file") are re-raised as :class:`InvalidDatasetError`
  naming the dataset and its json file; then :func:`validate_dataset_dicts`.
* :func:`validate_dataset_dicts` -- category ids must be in ``[0, len(thing_classes))`` and in
  ``[0, MODEL.SMCA_DETR.NUM_CLASSES)`` (otherwise a focal head indexes out of range and a softmax
  head silently trains the id as "no object"): :class:`InvalidDatasetError` naming the dataset, json
  file, image and id. Boxes with zero / negative / non-finite size or entirely outside their image:
  ONE warning per dataset (count and an example); the mapper drops them (boxes partly outside are
  clipped). Images without (non-crowd) annotations are valid DETR training images (``KEEP_EMPTY``).
* :func:`build_train_dataset_dicts` -- the above for ``cfg.DATASETS.TRAIN`` (and the names of
  ``cfg.DATASETS.TEST``, so that a typo there fails before training, not after it).
"""
import difflib
import itertools
import logging
import math
import numbers
from typing import Iterable, List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

__all__ = ["DatasetNotRegisteredError", "InvalidDatasetError", "build_train_dataset_dicts", "check_dataset_names",
           "get_validated_dataset_dicts", "validate_dataset_dicts"]

logger = logging.getLogger(__name__)


class _MessageKeyError(KeyError):
    def __str__(self):  # KeyError would print repr(message)
        return str(self.args[0]) if self.args else ""


class DatasetNotRegisteredError(_MessageKeyError):
    """A dataset name in the config is not in ``DatasetCatalog``."""


class InvalidDatasetError(ValueError, _MessageKeyError):
    """A dataset's annotations cannot be used (a ``ValueError``, and a ``KeyError`` like the error of
    ``load_coco_json`` it may wrap)."""

    __str__ = _MessageKeyError.__str__


def _as_list(names) -> List[str]:
    return [names] if isinstance(names, str) else list(names)


def check_dataset_names(names: Iterable[str], config_key: str = "DATASETS.TRAIN") -> None:
    """Raise :class:`DatasetNotRegisteredError` for the first name not registered in
    ``DatasetCatalog``, listing the closest registered names (``difflib``)."""
    registered = DatasetCatalog.list()
    for name in _as_list(names):
        if name in registered:
            continue
        close = difflib.get_close_matches(name, registered, n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else \
            f"no registered name is close; {len(registered)} datasets are registered"
        raise DatasetNotRegisteredError(
            f"{config_key}: dataset {name!r} is not registered in DatasetCatalog; {hint} (register custom "
            "datasets, e.g. with detectron2.data.datasets.register_coco_instances, before building the trainer)")


def _where(name: str, metadata) -> str:
    json_file = getattr(metadata, "json_file", None) if metadata is not None else None
    return f"dataset {name!r}" + (f" (json file {json_file})" if json_file else "")


def _box_wh(anno) -> Optional[tuple]:
    """(x0, y0, w, h) of an absolute box, None for other box modes."""
    bbox = anno.get("bbox")
    if bbox is None or len(bbox) != 4:
        return None
    mode = anno.get("bbox_mode", BoxMode.XYWH_ABS)
    x0, y0, a, b = (float(v) for v in bbox)
    if mode == BoxMode.XYWH_ABS:
        return x0, y0, a, b
    if mode == BoxMode.XYXY_ABS:
        return x0, y0, a - x0, b - y0
    return None


def validate_dataset_dicts(dicts: Sequence[dict], metadata=None, name: str = "<dataset>",
                           num_classes: Optional[int] = None) -> dict:
    """Check category ids and boxes of detectron2 dataset dicts (see the module docstring).

    Returns counts ``{"images", "annotations", "empty_images", "dropped_boxes"}``."""
    thing_classes = getattr(metadata, "thing_classes", None) if metadata is not None else None
    limits = []
    if thing_classes:
        limits.append((len(thing_classes), f"the dataset's {len(thing_classes)} categories (contiguous ids "
                                            f"0..{len(thing_classes) - 1})"))
    if num_classes is not None:
        limits.append((int(num_classes), f"MODEL.SMCA_DETR.NUM_CLASSES={num_classes} (ids 0..{int(num_classes) - 1})"))
    n_annos = n_empty = n_bad = 0
    example = None
    for record in dicts:
        annos = record.get("annotations")
        if annos is None:
            continue
        height, width = record.get("height"), record.get("width")
        kept = 0
        for anno in annos:
            n_annos += 1
            cid = anno.get("category_id")
            for limit, what in limits:
                if not isinstance(cid, numbers.Integral) or not 0 <= cid < limit:
                    raise InvalidDatasetError(
                        f"{_where(name, metadata)}: an annotation of image {record.get('file_name')!r} has "
                        f"category_id={cid!r}, which is not one of {what}")
            if int(anno.get("iscrowd", 0)):
                continue
            box = _box_wh(anno)
            if box is None:
                kept += 1
                continue
            x0, y0, w, h = box
            bad = not (w > 0 and h > 0 and math.isfinite(w) and math.isfinite(h))
            if not bad and width and height:
                bad = x0 >= width or y0 >= height or x0 + w <= 0 or y0 + h <= 0
            if bad:
                n_bad += 1
                example = example or (record.get("file_name"), list(anno.get("bbox")))
            else:
                kept += 1
        n_empty += kept == 0
    if n_bad:
        logger.warning(
            f"{_where(name, metadata)}: {n_bad} of {n_annos} boxes have zero / negative / non-finite size "
            f"or lie outside their image (e.g. {example[1]} in {example[0]!r}); the mapper drops them.")
    return {"images": len(dicts), "annotations": n_annos, "empty_images": n_empty, "dropped_boxes": n_bad}


def get_validated_dataset_dicts(names, *, filter_empty: bool = False, num_classes: Optional[int] = None,
                                config_key: str = "DATASETS.TRAIN"):
    """``detectron2.data.get_detection_dataset_dicts(names, filter_empty)`` (same steps: load, crowd
    filter, metadata consistency, class histogram) with the checks of this module run on each
    dataset before detectron2's own assertions (names registered, loading errors naming the dataset
    and json file, category ids, boxes)."""
    import torch.utils.data as torchdata
    from detectron2.data.build import filter_images_with_only_crowd_annotations, print_instances_class_histogram
    from detectron2.data.detection_utils import check_metadata_consistency

    names = _as_list(names)
    if not names:
        raise ValueError(f"{config_key} is empty")
    check_dataset_names(names, config_key)
    parts = []
    for name in names:
        metadata = MetadataCatalog.get(name)
        try:
            dicts = DatasetCatalog.get(name)
        except (KeyError, ValueError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise InvalidDatasetError(f"{config_key}: cannot load {_where(name, metadata)}: {msg}") from e
        if not isinstance(dicts, torchdata.Dataset):
            if not len(dicts):
                raise InvalidDatasetError(f"{config_key}: {_where(name, metadata)} is empty")
            validate_dataset_dicts(dicts, metadata, name, num_classes)
        parts.append(dicts)
    if isinstance(parts[0], torchdata.Dataset):
        return torchdata.ConcatDataset(parts) if len(parts) > 1 else parts[0]

    dataset_dicts = list(itertools.chain.from_iterable(parts))
    has_instances = "annotations" in dataset_dicts[0]
    if filter_empty and has_instances:
        dataset_dicts = filter_images_with_only_crowd_annotations(dataset_dicts)
    if has_instances:
        try:
            class_names = MetadataCatalog.get(names[0]).thing_classes
            check_metadata_consistency("thing_classes", names)
            print_instances_class_histogram(dataset_dicts, class_names)
        except AttributeError:  # class names are not available for this dataset
            pass
    if not dataset_dicts:
        raise InvalidDatasetError(f"{config_key}: no valid data found in {', '.join(names)} (all images "
                                  "filtered out by DATALOADER.FILTER_EMPTY_ANNOTATIONS?)")
    return dataset_dicts


def build_train_dataset_dicts(cfg):
    """The training dataset dicts of ``cfg`` (``DATASETS.TRAIN``, ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``),
    validated against ``MODEL.SMCA_DETR.NUM_CLASSES``; the names of ``DATASETS.TEST`` are checked too."""
    check_dataset_names(cfg.DATASETS.TEST, "DATASETS.TEST")
    return get_validated_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
                                       num_classes=cfg.MODEL.SMCA_DETR.NUM_CLASSES, config_key="DATASETS.TRAIN")
