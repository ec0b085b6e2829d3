#!/usr/bin/env python
"""Turn a training checkpoint into a small shipped one: model weights only, float16, with metadata.

    python tools/ship_checkpoint.py --input output/smca_r18_slim_synthetic/model_final.pth \\
        --output smca_detr/checkpoints/smca_r18_slim_synthetic.pth \\
        --meta config=configs/demo/smca_r18_slim_synthetic.yaml --meta AP=...

The result loads through ``MODEL.WEIGHTS smca_detr://<file name>`` (smca_detr/checkpoint/shipped.py).
Optimizer, scheduler and iteration are dropped; the script refuses values that do not fit float16
and prints the file size.
"""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--meta", action="append", default=[], help="KEY=VALUE stored under 'meta'")
    ap.add_argument("--max-mb", type=float, default=20.0, help="fail if the file would be larger")
    args = ap.parse_args(argv)

    import torch

    from smca_detr.checkpoint import atomic_write, safe_torch_load
    from smca_detr.checkpoint.shipped import export_for_shipping

    ckpt = safe_torch_load(args.input, map_location="cpu")
    meta = dict(kv.split("=", 1) for kv in args.meta)
    if isinstance(ckpt, dict) and "iteration" in ckpt:
        meta.setdefault("iteration", int(ckpt["iteration"]))
    shipped = export_for_shipping(ckpt, meta)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    atomic_write(args.output, lambda f: torch.save(shipped, f))
    mb = os.path.getsize(args.output) / 2 ** 20
    print(f"wrote {args.output}: {len(shipped['model'])} tensors, {mb:.2f} MiB, meta {meta}")
    if mb > args.max_mb:
        os.remove(args.output)
        raise SystemExit(f"{args.output}: {mb:.1f} MiB exceeds --max-mb {args.max_mb}; removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
