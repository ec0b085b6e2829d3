"""How ``SmcaDetrCheckpointer`` reads checkpoint files and matches them against the model.

Reading (:func:`load_checkpoint_file`): no checkpoint format may run code while it is read.

* ``.pkl`` (detectron2 / Caffe2 model zoo, e.g. the ImageNet ``R-50.pkl`` of ``MODEL.WEIGHTS``):
  detectron2 reads these with plain ``pickle.load``, which runs whatever a crafted file asks for.
  Here a restricted unpickler accepts only numpy arrays / dtypes / scalars and plain containers;
  anything else raises :class:`~smca_detr.checkpoint.UnsafeCheckpointError` naming the file and the
  class. The post-processing is detectron2's (model-zoo dict vs. Caffe2 ``blobs``).
* everything else (``.pth``, ``.pt``, ``.pyth``, no extension): ``safe_torch_load``
  (``weights_only=True``); ``.pyth`` gets detectron2's pycls post-processing.

Matching (:func:`load_model_strictly`): detectron2's ``DetectionCheckpointer`` loads with
``strict=False``: a parameter whose shape differs is skipped with one log line, missing and
unexpected keys only produce warnings, so a wrong checkpoint leaves parts of the model randomly
initialised without stopping anything. Policy here:

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
"""
import logging
import os
import pickle
import re
import zipfile
from typing import Any, Callable, Dict, List, Optional

import torch

__all__ = [
    "CheckpointMismatchError",
    "SAFE_PICKLE_GLOBALS",
    "is_class_head_key",
    "load_checkpoint_file",
    "load_model_strictly",
    "safe_pickle_load",
]

logger = logging.getLogger(__name__)

_CLASS_HEAD = re.compile(r"^heads\.class_embed(\.\d+)?\.(weight|bias)$")
_DCN_OFFSET = re.compile(r"\.conv2_offset\.(weight|bias)$")  # detectron2's DeformBottleneckBlock

# (module, name) a detectron2 / Caffe2 model-zoo pickle may reference: numpy arrays and plain data.
SAFE_PICKLE_GLOBALS = frozenset({
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # bytes pickled by Python 3 with protocol 2
})


class CheckpointMismatchError(RuntimeError):
    """The checkpoint does not fit the model (missing / unexpected keys, shape mismatches)."""


def is_class_head_key(key: str) -> bool:
    return bool(_CLASS_HEAD.match(key))


# ------------------------------------------------------------------------------------------ reading


def safe_pickle_load(path: str) -> Any:
    """``pickle.load(encoding="latin1")`` restricted to :data:`SAFE_PICKLE_GLOBALS`."""
    from .safe_load import UnsafeCheckpointError

    class _Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in SAFE_PICKLE_GLOBALS:
                return super().find_class(module, name)
            raise UnsafeCheckpointError(
                f"refusing to load checkpoint {path}: it references {module}.{name}; only numpy arrays "
                "and plain containers are accepted in .pkl files (a pickle can run arbitrary code)")

    with open(path, "rb") as f:
        try:
            return _Restricted(f, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError) as e:
            raise UnsafeCheckpointError(
                f"refusing to load checkpoint {path}: not a plain pickle of numpy arrays ({e})") from None


def _from_pkl(data: Any, path: str, log: logging.Logger) -> Dict:
    # detectron2's DetectionCheckpointer._load_file for .pkl, after a safe read
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict in the .pkl checkpoint, got {type(data).__name__}")
    if "model" in data and "__author__" in data:
        log.info("Reading a file from '{}'".format(data["__author__"]))
        return data
    if "blobs" in data:  # Caffe2 detection models
        data = data["blobs"]
    data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
    return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}


def load_checkpoint_file(checkpointer, filename: str, fallback: Optional[Callable[[str], Dict]] = None) -> Dict:
    """The body of ``SmcaDetrCheckpointer._load_file``: read ``filename`` without running pickled
    code (see the module docstring). ``fallback`` (detectron2's reader) is used only for a path that
    is not a local file. Remembers the file name for the messages of :func:`load_model_strictly`."""
    checkpointer._smca_source = filename
    if not os.path.isfile(filename):
        if fallback is None:
            raise FileNotFoundError(filename)
        return fallback(filename)
    log = getattr(checkpointer, "logger", logger)
    from .safe_load import safe_torch_load

    if filename.endswith(".pkl") and not zipfile.is_zipfile(filename):  # a zip is torch.save's format
        data = safe_pickle_load(filename)
        # a pickled magic number first is torch's legacy format: read by safe_torch_load below
        if not (isinstance(data, int) and data == getattr(torch.serialization, "MAGIC_NUMBER", None)):
            return _from_pkl(data, filename, log)

    loaded = safe_torch_load(filename, map_location="cpu")
    if filename.endswith(".pyth"):  # pycls (detectron2's handling)
        if not isinstance(loaded, dict) or "model_state" not in loaded:
            raise ValueError(f"Cannot load .pyth file {filename}; pycls checkpoints must contain 'model_state'.")
        state = {k: v for k, v in loaded["model_state"].items() if not k.endswith("num_batches_tracked")}
        return {"model": state, "__author__": "pycls", "matching_heuristics": True}
    if not isinstance(loaded, dict) or "model" not in loaded:
        loaded = {"model": loaded}
    return loaded


# ----------------------------------------------------------------------------------------- matching


def _num_classes(logits: int, focal: Optional[bool]) -> str:
    if focal is None:
        return f"{logits} class logits"
    classes = logits if focal else logits - 1
    return f"{classes} classes ({logits} logits)"


def _fmt(keys: List[str], limit: int = 20) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_model_strictly(checkpointer, checkpoint: Dict, base_load: Callable[[Dict], Any]):
    """The body of ``SmcaDetrCheckpointer._load_model``: ``base_load`` (detectron2's non-strict
    ``_load_model``) loads what fits, then the mismatches are judged by the policy of the module
    docstring. Returns detectron2's ``_IncompatibleKeys`` without the tolerated entries (so the
    generic per-key warnings are not repeated) or raises :class:`CheckpointMismatchError`."""
    source = getattr(checkpointer, "_smca_source", None) or "<checkpoint>"
    ckpt_keys = [k[len("module."):] if k.startswith("module.") else k for k in checkpoint.get("model", {})]
    backbone_init = bool(checkpoint.get("matching_heuristics", False)) or (
        bool(ckpt_keys) and all(k.startswith("backbone.") for k in ckpt_keys))

    # the two-stage encoder head is class-agnostic: kept (first rows) even when the class heads are skipped
    from .common import objectness_head_keys, objectness_head_note, objectness_rows

    agnostic_keys = set(objectness_head_keys(checkpointer.model.state_dict()))
    objectness = {}
    for k, v in checkpoint.get("model", {}).items():
        name = k[len("module."):] if k.startswith("module.") else k
        if name in agnostic_keys:
            objectness[name] = v
    incompatible = base_load(checkpoint)
    if incompatible is None:
        return None
    model = checkpointer.model
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
    try:  # parameters shared under two names are reported missing under the second name
        from fvcore.common.checkpoint import _filter_reused_missing_keys

        missing = _filter_reused_missing_keys(model, missing)
    except ImportError:  # pragma: no cover
        pass
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
        problems.append(f"{len(missing)} model key(s) missing from the checkpoint: {_fmt(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint key(s) the model does not have: {_fmt(unexpected)}")
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
            f"keep their initialisation: {_fmt(sorted(skipped_keys - set(agnostic)))}. All other weights "
            "were loaded." + objectness_head_note(agnostic, "skipped", shape_ckpt[0], shape_model[0]))
    if from_scratch:
        logger.info(f"Checkpoint {source} initialises the backbone only; {len(from_scratch)} tensors outside "
                    "the backbone (or DCN offsets) keep their initialisation.")
    if tolerated:
        logger.info(f"Checkpoint {source} has no BatchNorm num_batches_tracked counters ({len(tolerated)}); "
                    "they keep their initial value.")
    return type(incompatible)(missing_keys=[], unexpected_keys=[], incorrect_shapes=[])
