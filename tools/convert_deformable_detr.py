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
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from smca_detr.checkpoint.deformable import convert_official_deformable_detr, official_layout  # noqa: E402
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


def num_class_logits(state_dict):
    key = "heads.class_embed.weight" if "heads.class_embed.weight" in state_dict else "heads.class_embed.0.weight"
    return state_dict[key].shape[0]


def verify(state_dict, config, opts, keep_all_classes):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from smca_detr.config import add_smca_detr_config

    cfg = add_smca_detr_config(get_cfg())
    cfg.merge_from_file(config)
    cfg.merge_from_list(list(opts))
    if keep_all_classes:
        cfg.MODEL.SMCA_DETR.NUM_CLASSES = num_class_logits(state_dict)
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    model.load_state_dict(state_dict, strict=True)
    return cfg


def main(argv=None):
    args = parse_args(argv)
    ckpt = safe_torch_load(args.input)
    official = ckpt["model"] if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) else ckpt
    layout = official_layout(official)
    state_dict = convert_official_deformable_detr(official, keep_all_classes=args.keep_all_classes)
    if args.config:
        verify(state_dict, args.config, args.opts, args.keep_all_classes)
        print(f"verified: loads strictly into {args.config}")
    out = {"model": state_dict, "__author__": "smca_detr convert_deformable_detr",
           "matching_heuristics": False}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.save(out, args.output)
    variant = "two-stage" if layout["two_stage"] else ("box refinement" if layout["per_layer_heads"] else "plain")
    print(f"wrote {args.output}: {len(state_dict)} tensors, {num_class_logits(state_dict)} class logits, "
          f"variant: {variant}")


if __name__ == "__main__":
    main()
