#!/usr/bin/env python
"""CPU speed of the full-size Deformable DETR (R50, multi-scale, 4 levels, 300 queries) through
detectron2's model API.

* inference: seconds per image, one 640x800 image per call (``model([{"image": ...}])`` in eval
  mode, no_grad), and the part after the backbone (transformer + heads + post-processing);
* training: seconds per step, batch of 2 images of 640x800 with 10 boxes each (forward with the
  losses, backward, the recipe's AdamW step with full-model gradient clipping).

Times are the best of the timed calls (wall clock). On a shared machine, the "backbone-scaled"
ratio divides by how much slower than in the official measurement the (identical) ResNet-50
forward ran here, which makes the comparison robust to a busy or slower CPU.

Weights are random (the official init): speed does not depend on them. The multi-scale deformable
attention runs its PyTorch (grid_sample) path on CPU.

Reference numbers of the official implementation on the same 2-core CPU (its pure-PyTorch
deformable attention, torch.set_num_threads(2)): 3.6 s/image (2.95 s after the backbone) and 21 s
per training step.

``--calibrate`` also times the official backbone (torchvision R50 body, frozen BN, as the official
code runs it) here on one 640x800 image and divides the ratios by this machine's factor (seconds
here / official backbone seconds implied by the figures above): a machine-normalized estimate (see
``smca_detr.utils.speed``).

    python tools/benchmark_deformable.py [--config configs/deformable_detr_r50.yaml] [--threads 2]
        [--iters 3] [--train-iters 2] [--no-train] [--calibrate] [--json out.json] [opts ...]
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from smca_detr.utils import speed  # noqa: E402

OFFICIAL = {"inference_s_per_image": 3.6, "inference_after_backbone_s": 2.95, "train_s_per_step": 21.0}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "deformable_detr_r50.yaml"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--height", type=int, default=640)
    p.add_argument("--width", type=int, default=800)
    p.add_argument("--iters", type=int, default=3, help="timed inference calls (after 1 warm-up)")
    p.add_argument("--train-iters", type=int, default=2, help="timed training steps (after 1 warm-up)")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default="", help="also write the results to this file")
    p.add_argument("--calibrate", action="store_true",
                   help="also time the official backbone here (torchvision R50 body, frozen BN, 640x800) and "
                        "report the ratios divided by the machine factor (an estimate)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    cfg, model = speed.build_model(args.config, args.opts, args.device)
    res = {"config": args.config, "threads": args.threads, "image": [args.height, args.width],
           "device": args.device, "torch": torch.__version__}

    # ---------------------------------------------------------------- inference
    model.eval()
    inputs = speed.synthetic_inputs(1, args.height, args.width, args.device)
    full, bb, after = [], [], []
    with torch.no_grad():
        backbone, after_backbone = speed.split_inference(model, inputs)
        model(inputs)  # warm-up
        for _ in range(args.iters):  # interleaved, so that a busy machine affects all three alike
            full.append(speed.time_once(lambda: model(inputs), args.device))
            bb.append(speed.time_once(backbone, args.device))
            after.append(speed.time_once(after_backbone, args.device))
    res["inference_s_per_image"] = min(t for t, _ in full)
    res["backbone_s"] = min(t for t, _ in bb)
    res["inference_after_backbone_s"] = min(t for t, _ in after)
    res["inference_cpu_s"] = min(c for _, c in full)
    res["inference_median_s"] = statistics.median(t for t, _ in full)

    # ---------------------------------------------------------------- training
    if not args.no_train:
        model.train()
        batch = speed.synthetic_inputs(2, args.height, args.width, args.device, with_instances=True,
                                       num_boxes=10, min_box=16)
        opt = speed.build_adamw(cfg, model)  # includes the full-model gradient clipping of the recipe
        steps = speed.time_fn(lambda: speed.train_step(model, batch, opt), iters=args.train_iters, warmup=1,
                              device=args.device)
        res["train_s_per_step"] = steps.seconds
        res["train_cpu_s"] = steps.cpu_seconds

    # The backbone is the same computation as the official one (torchvision R50 vs detectron2 R50):
    # scaling by its time gives an estimate that is robust to a slower or busy machine.
    official_bb = OFFICIAL["inference_s_per_image"] - OFFICIAL["inference_after_backbone_s"]
    scale = official_bb / res["backbone_s"]
    lines = []
    for k in ("inference_s_per_image", "inference_after_backbone_s", "train_s_per_step"):
        if k in res:
            ratio = res[k] / OFFICIAL[k]
            res[k + "_vs_official"] = ratio
            res[k + "_vs_official_backbone_scaled"] = ratio * scale
            lines.append(f"{k}: {res[k]:.3f} s (official {OFFICIAL[k]:.2f} s): ratio {ratio:.2f}, "
                         f"backbone-scaled ratio {ratio * scale:.2f}")
    lines.insert(1, f"backbone_s: {res['backbone_s']:.3f} s (official {official_bb:.2f} s)")
    lines.append(f"(best of {args.iters} / {args.train_iters}; process CPU s: inference "
                 f"{res['inference_cpu_s']:.2f}" + (f", train {res['train_cpu_s']:.2f}" if "train_cpu_s" in res else "")
                 + ")")
    if args.calibrate:
        ratios = ({k: res[k + "_vs_official"] for k in OFFICIAL if k + "_vs_official" in res}
                  if args.device == "cpu" else {})  # the official figures are CPU figures
        res["calibration"] = speed.machine_calibration(OFFICIAL["inference_s_per_image"],
                                                       OFFICIAL["inference_after_backbone_s"], ratios,
                                                       threads=args.threads)
        lines += speed.format_calibration(res["calibration"])
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
