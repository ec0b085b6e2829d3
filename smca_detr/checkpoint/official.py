"""Recognise official SMCA-DETR / Conditional DETR / Deformable DETR checkpoints by their keys and
convert them to our layout when they are loaded (``MODEL.WEIGHTS``); docs/MODEL_ZOO.md has the table
of formats, their marker keys and converters, and what happens to the class head.

An *official* checkpoint (``{"model": state_dict, "args", ...}`` or a bare state dict) has its heads
at the top of the module (``class_embed.*``) and a torchvision backbone (``backbone.0.body.*``); ours
(``heads.*``) are never touched. :data:`OFFICIAL_FORMATS` tells the families apart. The class head
is remapped to the 80 COCO classes for a COCO model, loaded unchanged for the same row count, else
not loaded (ONE warning); the two-stage encoder head (objectness in row 0) keeps its first rows
(``common.objectness_head_keys``). A torchvision
ResNet checkpoint (the ImageNet backbone of the recipes) is converted to ``backbone.body.*``.
Everything else is strict: a converted key the model lacks, a model key the checkpoint lacks or a
shape mismatch raises ``OfficialCheckpointError`` (the official model and the config disagree).
"""
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .common import (coco_official_columns, convert_torchvision_resnet, describe_keys, is_torchvision_resnet,
                     objectness_head_keys, objectness_head_note, objectness_rows, remap_class_rows)

__all__ = ["OfficialFormat", "OfficialCheckpointError", "OFFICIAL_FORMATS",
           "is_official_layout", "detect_official_format", "official_state_dict", "convert_official_checkpoint",
           "convert_if_official", "COCO_NUM_CLASSES", "is_coco_classes"]

logger = logging.getLogger(__name__)

COCO_NUM_CLASSES = 80
CLASS_HEAD_PREFIX = "heads.class_embed."


class OfficialCheckpointError(ValueError):
    """An official checkpoint that does not fit the model built from the config."""


@dataclass
class OfficialFormat:
    """One official checkpoint family.

    name: short id (``"smca"``, ``"conditional_detr"``, ``"deformable_detr"``).
    title: human-readable name for the log line.
    detect: ``detect(state_dict) -> bool`` on the official ``model`` state dict.
    convert: ``convert(state_dict) -> (our state dict with ALL official class rows, detail str)``.
    """

    name: str
    title: str
    detect: Callable[[Mapping[str, torch.Tensor]], bool]
    convert: Callable[[Mapping[str, torch.Tensor]], Tuple[Dict[str, torch.Tensor], str]]


_SMCA_MARKER = re.compile(r"^transformer\.decoder\.layers\.\d+\.point2\.")


def _detect_smca(sd) -> bool:
    return any(_SMCA_MARKER.match(k) for k in sd)


def _convert_smca(sd):
    from .smca import convert_official_smca, detect_smca_kind

    kind = detect_smca_kind(sd)
    return convert_official_smca(sd, keep_all_classes=True, kind=kind), kind


def _detect_conditional(sd) -> bool:
    return any(".ca_qpos_sine_proj." in k for k in sd)


def _convert_conditional(sd):
    from .conditional import convert_official_conditional_detr

    return convert_official_conditional_detr(sd, keep_all_classes=True), "single scale"


def _detect_deformable(sd) -> bool:
    return any(".sampling_offsets." in k for k in sd)


def _convert_deformable(sd):
    from .deformable import convert_official_deformable_detr, variant_name

    return convert_official_deformable_detr(sd, keep_all_classes=True), variant_name(sd)


# Checked in order; the first format whose ``detect`` accepts the state dict converts it.
OFFICIAL_FORMATS: List[OfficialFormat] = [
    OfficialFormat("smca", "SMCA-DETR", _detect_smca, _convert_smca),
    OfficialFormat("conditional_detr", "Conditional DETR", _detect_conditional, _convert_conditional),
    OfficialFormat("deformable_detr", "Deformable DETR", _detect_deformable, _convert_deformable),
]


# ------------------------------------------------------------------------------------- detection


def official_state_dict(checkpoint) -> Optional[Mapping[str, torch.Tensor]]:
    """The model state dict of a loaded checkpoint (``{"model": sd, ...}`` or a bare state dict),
    or None when it is neither."""
    if not isinstance(checkpoint, Mapping):
        return None
    sd = checkpoint.get("model", checkpoint)
    if not isinstance(sd, Mapping) or not sd:
        return None
    if not all(isinstance(k, str) for k in sd):
        return None
    return sd


def is_official_layout(sd: Mapping[str, torch.Tensor]) -> bool:
    """True for a state dict laid out like the official DETR-family code (heads at the top level:
    ``class_embed.*``), False for ours (``heads.*``) and anything else."""
    keys = list(sd)
    if any(k.startswith("heads.") for k in keys):
        return False
    return any(k.startswith("class_embed.") for k in keys)


def detect_official_format(checkpoint) -> Optional[OfficialFormat]:
    """The :class:`OfficialFormat` of a loaded checkpoint, or None when it is not an official
    checkpoint of a known family (ours, detectron2's, a backbone, ...)."""
    sd = official_state_dict(checkpoint)
    if sd is None or not is_official_layout(sd):
        return None
    for fmt in OFFICIAL_FORMATS:
        if fmt.detect(sd):
            return fmt
    return None


# ------------------------------------------------------------------------------------ class head


def is_coco_classes(thing_classes: Optional[Sequence[str]]) -> bool:
    """Whether ``thing_classes`` are detectron2's 80 COCO classes (in its order)."""
    if thing_classes is None:
        return False
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    coco = [c["name"] for c in COCO_CATEGORIES if c["isthing"] == 1]
    return list(thing_classes) == coco


def _class_rows(sd: Mapping[str, torch.Tensor]) -> Optional[int]:
    rows = {int(v.shape[0]) for k, v in sd.items() if k.startswith(CLASS_HEAD_PREFIX) and k.endswith("bias")}
    if not rows:
        return None
    if len(rows) > 1:
        raise OfficialCheckpointError(f"class heads of different sizes: {sorted(rows)}")
    return rows.pop()


def _model_is_coco(model_rows: int, thing_classes: Optional[Sequence[str]]) -> bool:
    """Whether a focal class head of ``model_rows`` rows is COCO's: 80 rows, unless the dataset's class
    names tell otherwise."""
    if model_rows != COCO_NUM_CLASSES:
        return False
    return thing_classes is None or len(thing_classes) != COCO_NUM_CLASSES or is_coco_classes(thing_classes)


# ------------------------------------------------------------------------------------ conversion


def convert_official_checkpoint(checkpoint, model_state_dict: Mapping[str, torch.Tensor], *,
                                thing_classes: Optional[Sequence[str]] = None, softmax: bool = False,
                                fmt: Optional[OfficialFormat] = None, log: Optional[logging.Logger] = None
                                ) -> Tuple["OrderedDict[str, torch.Tensor]", Dict[str, object]]:
    """Convert an official checkpoint for a model with state dict ``model_state_dict``.

    Args:
        checkpoint: the loaded official checkpoint (``{"model": ..., "args": ...}`` or a state dict).
        model_state_dict: ``model.state_dict()`` of the target model (keys and shapes to match).
        thing_classes: the dataset's class names, when known (decides whether an 80-class model
            is a COCO model).
        softmax: the model's class head has a "no object" row (CLASS_LOSS softmax).
        fmt: the format (detected when None).
        log: logger for the one info line / class-head warning (this module's by default).

    Returns:
        (state dict to load with ``strict=True``, info dict ``{"format", "title", "detail",
        "num_keys", "class_head": "remapped" | "kept" | "skipped" | "absent"}``). When the class head
        is skipped, the returned state dict holds the model's own class-head tensors (so loading it
        changes nothing there and reports nothing missing).

    Raises:
        OfficialCheckpointError when the checkpoint is not official or does not fit the model.
    """
    log = log or logger
    sd = official_state_dict(checkpoint)
    fmt = fmt or detect_official_format(checkpoint)
    if sd is None or fmt is None:
        raise OfficialCheckpointError("not an official SMCA-DETR / Conditional DETR / Deformable DETR checkpoint")
    try:
        converted, detail = fmt.convert(sd)
    except (KeyError, ValueError) as e:
        raise OfficialCheckpointError(f"cannot convert the official {fmt.title} checkpoint: {e}") from e
    converted = OrderedDict(converted)

    # ---- class head
    model_rows = _class_rows(model_state_dict)
    ckpt_rows = _class_rows(converted)
    class_keys = [k for k in converted if k.startswith(CLASS_HEAD_PREFIX)]
    agnostic = objectness_head_keys(converted)  # two-stage encoder head: row 0 = objectness
    if ckpt_rows is None or model_rows is None:
        class_head = "absent"
    elif ckpt_rows == model_rows:
        class_head = "kept"
    elif (not softmax and _model_is_coco(model_rows, thing_classes)
          and ckpt_rows > max(coco_official_columns())):
        remap_class_rows(converted, class_keys, coco_official_columns())
        class_head = "remapped"
    else:
        for k in class_keys:
            if k in agnostic and k in model_state_dict:
                converted[k] = objectness_rows(converted[k], model_state_dict[k])
            elif k in model_state_dict:
                converted[k] = model_state_dict[k]
            else:
                del converted[k]
        class_head = "skipped"
        n_model = model_rows - 1 if softmax else model_rows
        log.warning(
            f"Official {fmt.title} checkpoint: class head NOT loaded (checkpoint has {ckpt_rows} class rows, "
            f"the model {model_rows} for MODEL.SMCA_DETR.NUM_CLASSES={n_model}); it keeps its initialisation, "
            "as for fine-tuning on a dataset other than COCO. Everything else is loaded."
            + objectness_head_note(agnostic, "skipped", ckpt_rows, model_rows))

    # ---- strict check against the model
    ignore = ("num_batches_tracked",)
    model_keys = {k for k in model_state_dict if not k.endswith(ignore)}
    ckpt_keys = {k for k in converted if not k.endswith(ignore)}
    missing = model_keys - ckpt_keys
    unexpected = ckpt_keys - model_keys
    shapes = [f"{k}: checkpoint {tuple(converted[k].shape)} vs model {tuple(model_state_dict[k].shape)}"
              for k in sorted(ckpt_keys & model_keys)
              if tuple(converted[k].shape) != tuple(model_state_dict[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} model keys not in the checkpoint: {describe_keys(missing, 8)}")
        if unexpected:
            parts.append(f"{len(unexpected)} converted keys the model does not have: {describe_keys(unexpected, 8)}")
        if shapes:
            more = " ..." if len(shapes) > 5 else ""
            parts.append(f"{len(shapes)} shape mismatches: {'; '.join(shapes[:5])}{more}")
        raise OfficialCheckpointError(
            f"the official {fmt.title} ({detail}) checkpoint does not fit the model built from the config "
            f"(wrong config for this checkpoint?): " + " | ".join(parts))
    for k in list(converted):
        if k.endswith(ignore) and k not in model_state_dict:
            del converted[k]
    info = {"format": fmt.name, "title": fmt.title, "detail": detail, "num_keys": len(sd),
            "class_head": class_head}
    head_msg = {"remapped": f"class head remapped {ckpt_rows} -> {model_rows} COCO rows",
                "kept": f"class head kept ({ckpt_rows} rows)", "absent": "no class head",
                "skipped": "class head skipped"}[class_head]
    note = objectness_head_note(agnostic, class_head, ckpt_rows, model_rows) if class_head == "remapped" else ""
    log.info(f"Detected an official {fmt.title} checkpoint ({detail}); converted {len(sd)} keys to "
             f"{len(converted)} smca_detr keys; {head_msg}." + note)
    return converted, info


def convert_if_official(checkpoint, model: torch.nn.Module, *, thing_classes: Optional[Sequence[str]] = None,
                        log: Optional[logging.Logger] = None):
    """The checkpointer hook: an official checkpoint becomes ``{"model": converted}`` (its optimizer,
    scheduler and args are dropped); a torchvision ResNet checkpoint (ImageNet backbone) becomes
    ``{"model": backbone.body.* keys}``; anything else is returned unchanged."""
    sd = official_state_dict(checkpoint)
    if sd is not None and is_torchvision_resnet(sd):
        converted = convert_torchvision_resnet(sd)
        (log or logger).info(
            f"Detected a torchvision ResNet checkpoint (ImageNet backbone): converted {len(sd)} keys to "
            f"{len(converted)} backbone.body.* keys (detectron2 ResNet names, FrozenBN; fc dropped); the "
            "rest of the model keeps its initialisation.")
        return {"model": converted, "__official_format__": "torchvision_resnet"}
    fmt = detect_official_format(checkpoint)
    if fmt is None:
        return checkpoint
    converted, info = convert_official_checkpoint(checkpoint, model.state_dict(), thing_classes=thing_classes,
                                                  softmax=not getattr(model, "focal", True), fmt=fmt, log=log)
    return {"model": converted, "__official_format__": info["format"]}

