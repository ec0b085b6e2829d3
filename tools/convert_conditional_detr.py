#!/usr/bin/env python
"""Convert an official Conditional DETR checkpoint (github.com/Atten4Vis/ConditionalDETR, e.g.
``ConditionalDETR_r50_epoch50.pth``) to a smca_detr checkpoint loadable by detectron2's
``DetectionCheckpointer`` with the configs ``configs/conditional_detr_*.yaml``.

    python tools/convert_conditional_detr.py official.pth conditional_detr_r50.pth
    python tools/convert_conditional_detr.py official.pth out.pth --keep-all-classes   # 91 logits

By default the 91-logit official class head is reduced to the 80 COCO classes in detectron2's
order; ``--keep-all-classes`` keeps every logit (then set MODEL.SMCA_DETR.NUM_CLASSES to 91).
The input is loaded with ``weights_only=True`` (tensors and argparse.Namespace only).
With ``--config`` the converted weights are loaded strictly into a model built from that config
as a check.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from smca_detr.checkpoint.cli import run_converter  # noqa: E402
from smca_detr.checkpoint.conditional import convert_official_conditional_detr  # noqa: E402


def main(argv=None):
    return run_converter("conditional", convert_official_conditional_detr, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
