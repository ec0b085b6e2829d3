#!/usr/bin/env python
"""Convert an official SMCA-DETR checkpoint (github.com/gaopengcuhk/SMCA-DETR) to smca_detr.

    python tools/convert_smca_detr.py checkpoint.pth smca_r50_converted.pth [--keep-all-classes] [--kind KIND]

The input is loaded with ``safe_torch_load`` (tensors and ``argparse.Namespace`` only). The output is a
detectron2 checkpoint (``{"model": state_dict, ...}``) for ``MODEL.WEIGHTS``; by default the class
head keeps the 80 COCO classes in detectron2's order (``--keep-all-classes`` keeps the 92 official
rows: then set ``MODEL.SMCA_DETR.NUM_CLASSES 92``). The config overrides implied by the official
``args`` (if the file has them) are printed.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from smca_detr.checkpoint.cli import run_converter  # noqa: E402
from smca_detr.checkpoint.smca import convert_official_smca  # noqa: E402


def main(argv=None):
    return run_converter("smca", convert_official_smca, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
