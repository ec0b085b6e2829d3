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

    python tools/benchmark_deformable.py [--config configs/deformable_detr_r50.yaml] [--threads 2]
        [--iters 3] [--train-iters 2] [--no-train] [--json out.json] [opts ...]
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
OFFICIAL = {"inference_s_per_image": 3.6, "inference_after_backbone_s": 2.95, "train_s_per_step": 21.0}


def build_optimizer(cfg, model):
    from smca_detr.engine.optimizer import build_optimizer as build

    return build(cfg, model)


def build(config, opts, device):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from smca_detr import add_smca_detr_config

    cfg = add_smca_detr_config(get_cfg())
    cfg.merge_from_file(str(config))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = ""
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def make_inputs(n, h, w, with_instances, device):
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        img = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8).float()
        x = {"image": img.to(device), "height": h, "width": w}
        if with_instances:
            xy = torch.rand(10, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
            wh = torch.rand(10, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3]) + 16
            inst = Instances((h, w))
            inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
            inst.gt_classes = torch.randint(0, 80, (10,), generator=g)
            x["instances"] = inst
        out.append(x)
    return out


def timed(fn, sync):
    """(wall seconds, process CPU seconds) of one call."""
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - t0, time.process_time() - c0


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
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    cfg, model = build(args.config, args.opts, args.device)
    res = {"config": args.config, "threads": args.threads, "image": [args.height, args.width],
           "device": args.device, "torch": torch.__version__}

    # ---------------------------------------------------------------- inference
    model.eval()
    inputs = make_inputs(1, args.height, args.width, False, args.device)
    full, bb, after = [], [], []
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        feats, masks = model.backbone(images.tensor, images.image_sizes)

        def after_backbone():
            out = model.forward_features(feats, masks, images.image_sizes)
            model.inference(out["pred_logits"][-1], out["pred_boxes"][-1], images.image_sizes)

        model(inputs)  # warm-up
        for _ in range(args.iters):  # interleaved, so that a busy machine affects all three alike
            full.append(timed(lambda: model(inputs), sync))
            bb.append(timed(lambda: model.backbone(images.tensor, images.image_sizes), sync))
            after.append(timed(after_backbone, sync))
    res["inference_s_per_image"] = min(t for t, _ in full)
    res["backbone_s"] = min(t for t, _ in bb)
    res["inference_after_backbone_s"] = min(t for t, _ in after)
    res["inference_cpu_s"] = min(c for _, c in full)
    res["inference_median_s"] = statistics.median(t for t, _ in full)

    # ---------------------------------------------------------------- training
    if not args.no_train:
        model.train()
        batch = make_inputs(2, args.height, args.width, True, args.device)
        opt = build_optimizer(cfg, model)

        def step():
            losses = model(batch)
            total = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()  # includes the full-model gradient clipping of the recipe

        step()  # warm-up
        steps = [timed(step, sync) for _ in range(args.train_iters)]
        res["train_s_per_step"] = min(t for t, _ in steps)
        res["train_cpu_s"] = min(c for _, c in steps)

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
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
