"""Reading checkpoint files without running pickled code.

* ``.pth`` / ``.pt`` / ``.pyth`` / no extension: :func:`safe_torch_load`, ``torch.load(weights_only=True)``;
  the only non-tensor classes allowed are the ones official DETR-family checkpoints contain
  (``argparse.Namespace`` for their ``args``). ``.pyth`` gets detectron2's pycls post-processing.
* ``.pkl`` (detectron2 / Caffe2 model zoo, e.g. the ImageNet ``R-50.pkl`` of ``MODEL.WEIGHTS``):
  detectron2 reads these with plain ``pickle.load``, which runs whatever a crafted file asks for.
  :func:`safe_pickle_load` accepts only numpy arrays / dtypes / scalars and plain containers. The
  post-processing is detectron2's (model-zoo dict vs. Caffe2 ``blobs``).

A file that needs anything else is refused with :class:`UnsafeCheckpointError` naming the file and
the class. :func:`load_checkpoint_file` is what ``SmcaDetrCheckpointer`` reads every file with.
"""
import argparse
import logging
import os
import pickle
import zipfile
from typing import Any, Callable, Dict

import torch

__all__ = ["safe_torch_load", "safe_pickle_load", "load_checkpoint_file", "UnsafeCheckpointError",
           "ALLOWED_GLOBALS", "SAFE_PICKLE_GLOBALS"]

# Classes an official SMCA / Conditional / Deformable DETR checkpoint may contain besides tensors.
ALLOWED_GLOBALS = [argparse.Namespace]

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


class UnsafeCheckpointError(RuntimeError):
    pass


def safe_torch_load(f, map_location="cpu") -> Any:
    """``torch.load`` restricted to tensors, containers and ``ALLOWED_GLOBALS``."""
    name = f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", "<stream>")
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"refusing to load checkpoint {name}: it contains objects other than tensors and the "
            f"allowed classes {[c.__module__ + '.' + c.__qualname__ for c in ALLOWED_GLOBALS]} "
            f"(weights_only=True). Details: {str(e).splitlines()[0]}") from None


def safe_pickle_load(path: str) -> Any:
    """``pickle.load(encoding="latin1")`` restricted to :data:`SAFE_PICKLE_GLOBALS`."""

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


def load_checkpoint_file(filename: str, fallback: Callable[[str], Dict], log: logging.Logger) -> Dict:
    """Read ``filename`` as detectron2's ``DetectionCheckpointer._load_file`` does (a dict with a
    ``"model"`` entry), but without running pickled code (see the module docstring). ``fallback``
    (detectron2's reader) is used only for a path that is not a local file."""
    if not os.path.isfile(filename):
        return fallback(filename)

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
