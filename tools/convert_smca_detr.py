#!/usr/bin/env python
"""Convert an official SMCA-DETR checkpoint (github.com/gaopengcuhk/SMCA-DETR) to smca_detr.

    python tools/convert_smca_detr.py checkpoint.pth smca_r50_converted.pth [--keep-all-classes] [--kind KIND]

The input is loaded with ``safe_torch_load`` (tensors and ``argparse.Namespace`` only). The output is a
detectron2 checkpoint (``{"model": state_dict, ...}``) for ``MODEL.WEIGHTS``; by default the class
head keeps the 80 COCO classes in detectron2's order (``--keep-all-classes`` keeps the 92 official
rows: then set ``MODEL.SMCA_DETR.NUM_CLASSES 92``). The config overrides implied by the official
``args`` (if the file has them) are printed.
"""
import argparse
import os
import sys

import torch

from smca_detr.checkpoint.smca import (SMCA_CONVERSION_RULES, convert_official_smca, detect_smca_kind,
                                       official_args_summary, split_official_checkpoint)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input", help="official checkpoint (.pth)")
    ap.add_argument("output", help="converted detectron2 checkpoint (.pth)")
    ap.add_argument("--keep-all-classes", action="store_true",
                    help="keep all 92 official class rows instead of the 80 COCO classes")
    ap.add_argument("--kind", default=None,
                    help=f"model kind (default: detected); one of {sorted(SMCA_CONVERSION_RULES)} or a registered one")
    args = ap.parse_args(argv)

    sd, official_args = split_official_checkpoint(args.input)
    kind = args.kind or detect_smca_kind(sd)
    out = convert_official_smca(sd, keep_all_classes=args.keep_all_classes, kind=kind)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.save({"model": out, "__author__": "official SMCA-DETR (converted by smca_detr)",
                "matching_heuristics": False}, args.output)
    n = sum(v.numel() for v in out.values())
    print(f"{args.input}: {len(sd)} official keys ({kind}) -> {args.output}: {len(out)} keys, {n:,} values"
          f"{'' if args.keep_all_classes else ', class head 92 -> 80 COCO rows'}")
    overrides = official_args_summary(official_args)
    if overrides:
        print("official args imply:")
        for k, v in overrides.items():
            print(f"  {k}: {v!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
