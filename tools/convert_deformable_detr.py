#!/usr/bin/env python
"""Convert an official Deformable DETR checkpoint (github.com/fundamentalvision/Deformable-DETR, e.g.
``r50_deformable_detr-checkpoint.pth``, ``..._plus_iterative_bbox_refinement-checkpoint.pth``,
``..._plus_plus_two_stage-checkpoint.pth``) to a smca_detr checkpoint loadable by detectron2's
``DetectionCheckpointer`` with the configs ``configs/deformable_detr_*.yaml``.

    python tools/convert_deformable_detr.py official.pth deformable_detr_r50.pth
    python tools/convert_deformable_detr.py official.pth out.pth --config configs/deformable_detr_r50_refine.yaml
    python tools/convert_deformable_detr.py official.pth out.pth --keep-all-classes   # 91 logits

The variant (plain / box refinement / two-stage) is read off the checkpoint's keys; use the matching
config. By default the 91-logit official class heads are reduced to the 80 COCO classes in
detectron2's order; ``--keep-all-classes`` keeps every logit (then set MODEL.SMCA_DETR.NUM_CLASSES
to 91). The input is loaded with ``weights_only=True`` (tensors and argparse.Namespace only). With
``--config`` the converted weights are loaded strictly into a model built from that config as a check.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from smca_detr.checkpoint.cli import run_converter  # noqa: E402
from smca_detr.checkpoint.deformable import convert_official_deformable_detr  # noqa: E402


def main(argv=None):
    return run_converter("deformable", convert_official_deformable_detr, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
