"""Loading checkpoints without unpickling arbitrary objects.

Every checkpoint goes through ``torch.load(weights_only=True)``; the only non-tensor classes allowed
are the ones official DETR-family checkpoints contain (``argparse.Namespace`` for their ``args``).
A file that needs anything else is refused with a message naming the file and the class.
"""
import argparse
import os
import pickle
from typing import Any

import torch

__all__ = ["safe_torch_load", "UnsafeCheckpointError", "ALLOWED_GLOBALS"]

# Classes an official SMCA / Conditional / Deformable DETR checkpoint may contain besides tensors.
ALLOWED_GLOBALS = [argparse.Namespace]


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
