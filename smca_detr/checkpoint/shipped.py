"""Checkpoints shipped inside the package, addressed as ``smca_detr://<file>`` (``MODEL.WEIGHTS``).

``smca_detr://smca_r18_slim_synthetic.pth`` is ``smca_detr/checkpoints/smca_r18_slim_synthetic.pth``
of the installed package, whatever the working directory: detectron2's ``PathManager`` (iopath)
resolves the prefix through :class:`ShippedCheckpointHandler`, registered when :mod:`smca_detr`'s
checkpointer is imported. Shipped files hold ``{"model": state_dict (float16), "meta": {...}}``;
loading casts them to the model's dtype (``load_state_dict`` copies), see :func:`export_for_shipping`.
"""
import os
from typing import Any, Dict, Optional

import torch
from iopath.common.file_io import PathHandler

__all__ = ["PREFIX", "SHIPPED_DIR", "ShippedCheckpointHandler", "register_shipped_handler",
           "export_for_shipping"]

PREFIX = "smca_detr://"
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints")


class ShippedCheckpointHandler(PathHandler):
    """``smca_detr://name`` -> the file ``name`` in the package's ``checkpoints/`` folder."""

    def _get_supported_prefixes(self):
        return [PREFIX]

    def _local(self, path: str) -> str:
        name = path[len(PREFIX):]
        local = os.path.normpath(os.path.join(SHIPPED_DIR, name))
        if os.path.dirname(local) != os.path.normpath(SHIPPED_DIR) or not name:
            raise ValueError(f"{path!r}: expected {PREFIX}<file name> of a checkpoint in {SHIPPED_DIR}")
        if not os.path.isfile(local):
            shipped = sorted(f for f in os.listdir(SHIPPED_DIR) if f.endswith(".pth")) if os.path.isdir(SHIPPED_DIR) else []
            raise FileNotFoundError(f"{path!r}: no such shipped checkpoint (shipped: {shipped})")
        return local

    def _get_local_path(self, path: str, force: bool = False, **kwargs) -> str:
        return self._local(path)

    def _isfile(self, path: str, **kwargs) -> bool:
        try:
            return os.path.isfile(self._local(path))
        except (ValueError, FileNotFoundError):
            return False

    def _exists(self, path: str, **kwargs) -> bool:
        return self._isfile(path)

    def _open(self, path: str, mode: str = "r", buffering: int = -1, **kwargs):
        if any(c in mode for c in "wax+"):
            raise PermissionError(f"{path!r}: shipped checkpoints are read-only")
        return open(self._local(path), mode, buffering=buffering)


def register_shipped_handler() -> None:
    """Register the ``smca_detr://`` prefix with detectron2's PathManager (idempotent)."""
    from detectron2.utils.file_io import PathManager

    if PREFIX not in PathManager._path_handlers:
        PathManager.register_handler(ShippedCheckpointHandler())


def export_for_shipping(checkpoint: Dict[str, Any], meta: Optional[Dict[str, Any]] = None,
                        dtype: torch.dtype = torch.float16) -> Dict[str, Any]:
    """Model weights only (no optimizer / scheduler / iteration), floating tensors cast to ``dtype``.

    Raises if a value would not survive the cast (non-finite or out of float16 range)."""
    state = checkpoint.get("model", checkpoint)
    out = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{k}: not a tensor ({type(v).__name__})")
        if v.is_floating_point():
            cast = v.detach().to("cpu", dtype)
            if not torch.isfinite(cast).all():
                raise ValueError(f"{k}: does not fit in {dtype} (max |x| = {v.abs().max().item():.3g})")
            out[k] = cast
        else:
            out[k] = v.detach().cpu()
    return {"model": out, "meta": dict(meta or {})}
