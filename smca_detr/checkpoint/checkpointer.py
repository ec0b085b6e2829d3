"""DetectionCheckpointer with atomic saves, safe loading (``safe_load``) and strict matching (``matching``).

fvcore's ``Checkpointer.save`` (detectron2 v0.6 and main) streams ``torch.save`` straight into
``<save_dir>/<name>.pth`` and rewrites ``last_checkpoint`` in place: a crash or a full disk during
the write leaves a truncated file under the final name (and possibly ``last_checkpoint`` naming it),
so ``--resume`` fails or, worse, an older good checkpoint of the same name is lost. Here both files
are written to a temporary file in the same directory, flushed to disk and renamed over the final
name with ``os.replace`` (atomic on POSIX): readers see the old file or the complete new one.
Remote save dirs (``scheme://``) keep fvcore's behaviour.
"""
import os
import tempfile
from typing import Any, Callable

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .matching import load_model_strictly
from .official import convert_if_official
from .safe_load import load_checkpoint_file
from .shipped import register_shipped_handler

__all__ = ["SmcaDetrCheckpointer", "atomic_write"]

register_shipped_handler()  # MODEL.WEIGHTS "smca_detr://<file>": checkpoints shipped in the package


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call ``write(f)`` on a temporary file next to ``path``, fsync it, then rename it to ``path``.
    On any error the temporary file is removed, ``path`` is untouched and the error propagates."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual open() permissions
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable (best effort: not every filesystem allows it)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


class SmcaDetrCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` (same constructor) whose ``save`` and ``tag_last_checkpoint`` are
    atomic, whose loading of any local file refuses pickled objects other than tensors, numpy arrays
    and containers (``safe_load.load_checkpoint_file``) and which raises when the checkpoint does not
    fit the model (``matching.load_model_strictly``). Official SMCA-DETR / Conditional DETR /
    Deformable DETR checkpoints are recognised and converted on load (``official``); set
    ``thing_classes`` to the dataset's class names to let the class-head remapping check them (None:
    decided by the class count)."""

    thing_classes = None

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        if not _is_local(self.save_dir):
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_dir = _local(self.save_dir)
        os.makedirs(save_dir, exist_ok=True)
        save_file = os.path.join(save_dir, basename)
        if os.path.basename(save_file) != basename:
            raise ValueError(f"Checkpoint name {name!r} must not contain a directory")
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not _is_local(self.save_dir):
            return super().tag_last_checkpoint(last_filename_basename)
        path = os.path.join(_local(self.save_dir), "last_checkpoint")
        atomic_write(path, lambda f: f.write(last_filename_basename), mode="w")

    def load(self, path: str, *args: Any, **kwargs: Any):
        try:
            return super().load(path, *args, **kwargs)
        except BaseException:
            # detectron2 main's DetectionCheckpointer.load sets _parsed_url_during_load and asserts it
            # is None on entry, but only resets it on success: a failed load (e.g. a
            # CheckpointMismatchError) would make every later load of this checkpointer fail
            if getattr(self, "_parsed_url_during_load", None) is not None:
                self._parsed_url_during_load = None
            raise

    def _load_file(self, filename: str):
        self._smca_source = filename  # named in load_model_strictly's messages
        # no file format may run pickled code (safe_load); detectron2's reader only for non-local paths
        loaded = load_checkpoint_file(filename, fallback=super()._load_file, log=self.logger)
        # official SMCA / Conditional / Deformable DETR (and torchvision ResNet) checkpoints are
        # converted on load, whatever the file name (e.g. downloaded from a URL without a .pth suffix)
        return convert_if_official(loaded, self.model, thing_classes=self.thing_classes, log=self.logger)

    def _load_model(self, checkpoint):
        # strict key matching; only a class head of another class count is skipped (ONE warning)
        return load_model_strictly(self.model, checkpoint, super()._load_model,
                                   source=getattr(self, "_smca_source", None))
