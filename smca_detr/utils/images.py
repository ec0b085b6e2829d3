"""Reading image files with errors that name the file (data mapper, demo and attention tools).

``read_image`` is detectron2's ``detection_utils.read_image`` (EXIF orientation applied, any PIL mode
converted to ``format``) whose failures - a missing file, data that is not an image, a truncated
file - all become an :class:`ImageReadError` naming the file. A missing file raises
:class:`ImageNotFoundError`, which is also a ``FileNotFoundError``.
"""
from __future__ import annotations

import os
from typing import Union

import numpy as np

__all__ = ["ImageReadError", "ImageNotFoundError", "read_image"]


class ImageReadError(OSError):
    """An image file is missing, unreadable or corrupt (the message names the file)."""


class ImageNotFoundError(ImageReadError, FileNotFoundError):
    """An image file does not exist (the message names the file)."""


def read_image(file_name: Union[str, os.PathLike], format: str = "RGB") -> np.ndarray:
    """The image at ``file_name`` as an ``H x W x C`` uint8 array in ``format`` (a PIL mode or
    ``"BGR"``, as detectron2's ``read_image``); always 3-dimensional.

    Raises :class:`ImageNotFoundError` for a missing file and :class:`ImageReadError` for anything
    else that cannot be decoded, with the file name and the underlying error in the message."""
    from detectron2.data import detection_utils

    try:  # (detectron2 returns HWC, also for "L")
        return detection_utils.read_image(str(file_name), format=format)
    except Exception as e:  # missing file, not an image, truncated data, ...
        cls = ImageNotFoundError if isinstance(e, FileNotFoundError) else ImageReadError
        raise cls(f"Cannot read image file '{file_name}': {type(e).__name__}: {e}") from e
