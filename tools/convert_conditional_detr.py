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
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from smca_detr.checkpoint.conditional import convert_official_conditional_detr  # noqa: E402
from smca_detr.checkpoint.safe_load import safe_torch_load  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="official checkpoint (.pth: {'model': state_dict, ...} or a state dict)")
    ap.add_argument("output", help="converted checkpoint (.pth, {'model': state_dict})")
    ap.add_argument("--keep-all-classes", action="store_true",
                    help="keep all official class logits instead of the 80 COCO classes")
    ap.add_argument("--config", default=None,
                    help="optional config to verify the result: builds the model and loads strictly")
    ap.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                    help="config overrides (KEY VALUE ...) for --config")
    return ap.parse_args(argv)


def verify(state_dict, config, opts, keep_all_classes):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from smca_detr.config import add_smca_detr_config

    cfg = add_smca_detr_config(get_cfg())
    cfg.merge_from_file(config)
    cfg.merge_from_list(list(opts))
    if keep_all_classes:
        cfg.MODEL.SMCA_DETR.NUM_CLASSES = state_dict["heads.class_embed.weight"].shape[0]
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    model.load_state_dict(state_dict, strict=True)
    return cfg


def main(argv=None):
    args = parse_args(argv)
    ckpt = safe_torch_load(args.input)
    state_dict = convert_official_conditional_detr(ckpt, keep_all_classes=args.keep_all_classes)
    if args.config:
        verify(state_dict, args.config, args.opts, args.keep_all_classes)
        print(f"verified: loads strictly into {args.config}")
    out = {"model": state_dict, "__author__": "smca_detr convert_conditional_detr",
           "matching_heuristics": False}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.save(out, args.output)
    n = state_dict["heads.class_embed.weight"].shape[0]
    print(f"wrote {args.output}: {len(state_dict)} tensors, {n} class logits")


if __name__ == "__main__":
    main()
