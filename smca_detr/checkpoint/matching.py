"""How ``SmcaDetrCheckpointer`` matches a checkpoint against the model (:func:`load_model_strictly`).

detectron2's ``DetectionCheckpointer`` loads with ``strict=False``: a parameter whose shape differs
is skipped with one log line, missing and unexpected keys only produce warnings, so a wrong
checkpoint leaves parts of the model randomly initialised without stopping anything. Policy here:

* class head (``heads.class_embed[.i].weight`` / ``.bias``) whose shape differs from the model's in
  the number of rows only (another class count, e.g. fine-tuning a COCO model on a new dataset):
  not loaded, ONE warning naming the keys and both class counts; everything else is loaded.
* backbone initialisation: a checkpoint whose keys are all ``backbone.*``, or a model-zoo file
  loaded with detectron2's name-matching heuristics (``matching_heuristics``, e.g. ImageNet
  ``R-50.pkl``, a torchvision ``resnet50-*.pth``): the parameters outside the backbone are missing by
  design (one info line), and so are the zero-initialised offsets of a DCN backbone; every other
  backbone parameter must be loaded.
* anything else -- missing keys, unexpected keys, other shape mismatches -- raises
  :class:`CheckpointMismatchError` naming the file and the keys (with shapes). Missing
  ``num_batches_tracked`` counters of BatchNorm layers are tolerated (logged).

Files are read by :func:`~smca_detr.checkpoint.safe_load.load_checkpoint_file` before this.
"""
import logging
import re
from typing import Any, Callable, Dict, Optional

import torch
from fvcore.common.checkpoint import _filter_reused_missing_keys
from torch import nn

from .common import describe_keys, objectness_head_keys, objectness_head_note, objectness_rows

__all__ = ["CheckpointMismatchError", "is_class_head_key", "load_model_strictly"]

logger = logging.getLogger(__name__)

_CLASS_HEAD = re.compile(r"^heads\.class_embed(\.\d+)?\.(weight|bias)$")
_DCN_OFFSET = re.compile(r"\.conv2_offset\.(weight|bias)$")  # detectron2's DeformBottleneckBlock


class CheckpointMismatchError(RuntimeError):
    """The checkpoint does not fit the model (missing / unexpected keys, shape mismatches)."""


def is_class_head_key(key: str) -> bool:
    return bool(_CLASS_HEAD.match(key))


def _strip_ddp(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


def _num_classes(logits: int, focal: Optional[bool]) -> str:
    if focal is None:
        return f"{logits} class logits"
    classes = logits if focal else logits - 1
    return f"{classes} classes ({logits} logits)"


def load_model_strictly(model: nn.Module, checkpoint: Dict, base_load: Callable[[Dict], Any],
                        source: Optional[str] = None):
    """The body of ``SmcaDetrCheckpointer._load_model``: ``base_load`` (detectron2's non-strict
    ``_load_model``) loads what fits into ``model``, then the mismatches are judged by the policy of
    the module docstring; ``source`` (the file name) is named in the messages. Returns detectron2's
    ``_IncompatibleKeys`` without the tolerated entries (so the generic per-key warnings are not
    repeated) or raises :class:`CheckpointMismatchError`."""
    source = source or "<checkpoint>"
    ckpt_keys = [_strip_ddp(k) for k in checkpoint.get("model", {})]
    backbone_init = bool(checkpoint.get("matching_heuristics", False)) or (
        bool(ckpt_keys) and all(k.startswith("backbone.") for k in ckpt_keys))

    # the two-stage encoder head is class-agnostic: kept (first rows) even when the class heads are skipped
    agnostic_keys = set(objectness_head_keys(model.state_dict()))
    objectness = {_strip_ddp(k): v for k, v in checkpoint.get("model", {}).items() if _strip_ddp(k) in agnostic_keys}
    incompatible = base_load(checkpoint)
    focal = getattr(model, "focal", None)

    class_skipped, bad_shapes = [], []
    for key, shape_ckpt, shape_model in incompatible.incorrect_shapes:
        if (is_class_head_key(key) and len(shape_ckpt) == len(shape_model)
                and tuple(shape_ckpt[1:]) == tuple(shape_model[1:])):
            class_skipped.append((key, shape_ckpt, shape_model))
        else:
            bad_shapes.append((key, shape_ckpt, shape_model))
    skipped_keys = {k for k, _, _ in class_skipped}

    missing = [k for k in incompatible.missing_keys if k not in skipped_keys]
    missing = _filter_reused_missing_keys(model, missing)  # shared parameters: missing under the second name
    tolerated = [k for k in missing if k.endswith("num_batches_tracked")]
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    from_scratch = []
    if backbone_init:
        # outside the backbone, and the offsets of deformable convolutions (DCN, zero-initialised:
        # a plain convolution) an ImageNet ResNet does not have
        from_scratch = [k for k in missing if not k.startswith("backbone.") or _DCN_OFFSET.search(k)]
        missing = [k for k in missing if k not in set(from_scratch)]
    unexpected = list(incompatible.unexpected_keys)

    problems = []
    if bad_shapes:
        problems.append("shape mismatch (checkpoint vs model): " + "; ".join(
            f"{k}: {tuple(a)} vs {tuple(b)}" for k, a, b in sorted(bad_shapes)))
    if missing:
        problems.append(f"{len(missing)} model key(s) missing from the checkpoint: {describe_keys(missing, 20)}")
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint key(s) the model does not have: {describe_keys(unexpected, 20)}")
    if problems:
        raise CheckpointMismatchError(
            f"Checkpoint {source} does not match the model (MODEL.SMCA_DETR.* / MODEL.RESNETS.* of the "
            f"config vs. the checkpoint's): " + " | ".join(problems)
            + ". Only a class head of another class count is skipped; everything else must match.")

    if class_skipped:
        key, shape_ckpt, shape_model = class_skipped[0]
        agnostic = sorted(k for k in skipped_keys if k in objectness)
        state = model.state_dict()
        with torch.no_grad():
            for k in agnostic:
                state[k].copy_(objectness_rows(torch.as_tensor(objectness[k]), state[k]))
        logger.warning(
            f"Checkpoint {source}: its class head has {_num_classes(shape_ckpt[0], focal)} but the model "
            f"has {_num_classes(shape_model[0], focal)} (MODEL.SMCA_DETR.NUM_CLASSES); not loaded, they "
            f"keep their initialisation: {describe_keys(skipped_keys - set(agnostic), 20)}. All other weights "
            "were loaded." + objectness_head_note(agnostic, "skipped", shape_ckpt[0], shape_model[0]))
    if from_scratch:
        logger.info(f"Checkpoint {source} initialises the backbone only; {len(from_scratch)} tensors outside "
                    "the backbone (or DCN offsets) keep their initialisation.")
    if tolerated:
        logger.info(f"Checkpoint {source} has no BatchNorm num_batches_tracked counters ({len(tolerated)}); "
                    "they keep their initial value.")
    return type(incompatible)(missing_keys=[], unexpected_keys=[], incorrect_shapes=[])
