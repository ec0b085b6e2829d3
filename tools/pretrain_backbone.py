#!/usr/bin/env python
"""Pretrain a detection backbone as a crop classifier on the embedded *train* split: the small-scale
stand-in for "ImageNet-pretrained backbone" used by the convergence study (docs/convergence/).

    python tools/pretrain_backbone.py --config-file configs/convergence/Base-Convergence.yaml \\
        --output smca_detr/checkpoints/r18_slim_cls_synthetic.pth

Classes: the dataset's categories plus "background". Object crops: a square around each annotated
box (side = longer box side x U(1.15, 1.6), centre jittered by up to 10% of the side), ``--views``
random crops per object. Background crops: random squares that cover at most 20% of any box.
Every crop is resized to ``--crop-size`` and normalised exactly as the detector normalises its
input (``INPUT.FORMAT``, ``MODEL.PIXEL_MEAN/STD``). The network is ``build_backbone(cfg)`` of the
given config (trainable BatchNorm, nothing frozen) + global average pooling of its last
``OUT_FEATURES`` level + one linear layer. Images whose id % 10 == 0 are held out to report
accuracy; no validation image and no detector weight is used.

The output holds only the backbone (keys ``backbone.body.*``, the detector's names; BatchNorm
statistics load into FrozenBN as well), stored in float16 like every shipped checkpoint, with the
command, the accuracy and the timing in ``meta``: ``MODEL.WEIGHTS <file>`` (or ``smca_detr://<name>``
once it lies in smca_detr/checkpoints/) loads it like an ImageNet backbone.
"""
import argparse
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

HELD_OUT_MOD = 10


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-file", default=os.path.join(REPO, "configs", "convergence", "Base-Convergence.yaml"))
    ap.add_argument("--output", required=True, help="checkpoint to write (.pth)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3, help="AdamW peak LR (linear warm-up over the first epoch, then cosine decay to 0)")
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--crop-size", type=int, default=64)
    ap.add_argument("--views", type=int, default=2, help="random crops per object (and background crops per image)")
    ap.add_argument("--max-images", type=int, default=0, help="use only the first N train images (0 = all; tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return ap.parse_args(argv)


def build_cfg(args):
    from smca_detr.config import config_from_args

    cfg = config_from_args(args)
    cfg.MODEL.RESNETS.NORM = "BN"  # trainable statistics while classifying; the detector may freeze them
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def _square_crop(img, cx, cy, side, out):
    """``img`` [H,W,3] uint8 -> [out,out,3] uint8 of the square (cx, cy, side), edge-padded."""
    h, w = img.shape[:2]
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    s = max(2, int(round(side)))
    ys = np.clip(np.arange(y0, y0 + s), 0, h - 1)
    xs = np.clip(np.arange(x0, x0 + s), 0, w - 1)
    patch = torch.from_numpy(np.ascontiguousarray(img[ys][:, xs])).permute(2, 0, 1)[None].float()
    patch = F.interpolate(patch, size=(out, out), mode="bilinear", align_corners=False, antialias=True)
    return patch[0].round().clamp(0, 255).to(torch.uint8)


def _background_ok(x0, y0, side, boxes):
    for bx, by, bw, bh in boxes:
        iw = max(0.0, min(x0 + side, bx + bw) - max(x0, bx))
        ih = max(0.0, min(y0 + side, by + bh) - max(y0, by))
        if iw * ih > 0.2 * bw * bh:
            return False
    return True


def make_crops(dicts, fmt, views, size, rng):
    """-> (train crops uint8 [N,3,s,s], labels [N], held-out crops, labels, background label)."""
    from detectron2.data.detection_utils import read_image

    num_classes = 1 + max((a["category_id"] for d in dicts for a in d["annotations"]), default=0)
    bg = num_classes
    out = {True: ([], []), False: ([], [])}
    for d in dicts:
        img = read_image(d["file_name"], format=fmt)
        h, w = img.shape[:2]
        held = d["image_id"] % HELD_OUT_MOD == 0
        crops, labels = out[held]
        boxes = [a["bbox"] for a in d["annotations"]]  # XYWH_ABS (the synthetic split's mode)
        for a in d["annotations"]:
            bx, by, bw, bh = a["bbox"]
            for _ in range(views):
                side = max(bw, bh) * rng.uniform(1.15, 1.6)
                cx = bx + bw / 2 + rng.uniform(-0.1, 0.1) * side
                cy = by + bh / 2 + rng.uniform(-0.1, 0.1) * side
                crops.append(_square_crop(img, cx, cy, side, size))
                labels.append(a["category_id"])
        for _ in range(views):
            for _try in range(20):
                side = rng.uniform(16, min(h, w) * 0.5)
                x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
                if _background_ok(x0, y0, side, boxes):
                    crops.append(_square_crop(img, x0 + side / 2, y0 + side / 2, side, size))
                    labels.append(bg)
                    break
    pack = lambda c, l: (torch.stack(c), torch.tensor(l))  # noqa: E731
    return (*pack(*out[False]), *pack(*out[True]), bg)


class CropClassifier(nn.Module):
    def __init__(self, cfg, num_classes):
        super().__init__()
        from detectron2.modeling import build_backbone

        self.body = build_backbone(cfg)
        self.level = cfg.MODEL.RESNETS.OUT_FEATURES[-1]
        self.fc = nn.Linear(self.body.output_shape()[self.level].channels, num_classes)
        self.register_buffer("mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(1, -1, 1, 1), False)
        self.register_buffer("std", torch.tensor(cfg.MODEL.PIXEL_STD).view(1, -1, 1, 1), False)

    def forward(self, x_uint8):
        x = (x_uint8.float() - self.mean) / self.std
        return self.fc(self.body(x)[self.level].mean(dim=(2, 3)))


@torch.no_grad()
def accuracy(model, x, y, num_classes, bs=256):
    model.eval()
    pred = torch.cat([model(x[i:i + bs]).argmax(1) for i in range(0, len(x), bs)])
    model.train()
    per_class = [(pred[y == c] == c).float().mean().item() if (y == c).any() else None
                 for c in range(num_classes)]
    return (pred == y).float().mean().item(), per_class


def main(argv=None):
    args = parse_args(argv)
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from smca_detr.checkpoint.shipped import export_for_shipping
    from smca_detr.data import synthetic

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    cfg = build_cfg(args)
    name = cfg.DATASETS.TRAIN[0]
    if name in synthetic.SPLITS:
        synthetic.ensure_synthetic(name)
    dicts = sorted(DatasetCatalog.get(name), key=lambda d: d["image_id"])
    if args.max_images:
        dicts = dicts[:args.max_images]
    t0 = time.time()
    xtr, ytr, xte, yte, bg = make_crops(dicts, cfg.INPUT.FORMAT, args.views, args.crop_size, rng)
    classes = list(MetadataCatalog.get(name).get("thing_classes", [])) + ["background"]
    print(f"{len(xtr)} train crops, {len(xte)} held-out crops ({time.time() - t0:.0f} s); "
          f"classes {classes}; counts {torch.bincount(ytr, minlength=bg + 1).tolist()}", flush=True)

    model = CropClassifier(cfg, bg + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(xtr) / args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = min(steps_per_epoch, total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    t_train = time.time()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(xtr))
        losses = []
        for i in range(0, len(xtr), args.batch_size):
            idx = perm[i:i + args.batch_size]
            x = xtr[idx]
            flip = torch.rand(len(x)) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            x = torch.rot90(x, k=int(torch.randint(4, ())), dims=(2, 3))  # the shapes come in any rotation
            loss = F.cross_entropy(model(x), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        acc, _ = accuracy(model, xte, yte, bg + 1)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {np.mean(losses):.4f}, held-out accuracy {acc:.4f} "
              f"({time.time() - t_train:.0f} s)", flush=True)
    acc, per_class = accuracy(model, xte, yte, bg + 1)
    state = {f"backbone.body.{k}": v for k, v in model.body.state_dict().items() if not k.endswith("num_batches_tracked")}
    meta = {
        "what": "backbone pretrained as a crop classifier (tools/pretrain_backbone.py); keys backbone.body.*",
        "command": "python tools/pretrain_backbone.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config_file": os.path.relpath(os.path.abspath(args.config_file), REPO),
        "dataset": name, "train_images": sum(d["image_id"] % HELD_OUT_MOD != 0 for d in dicts),
        "train_crops": len(xtr), "held_out_crops": len(xte), "classes": classes,
        "held_out_accuracy": round(acc, 4),
        "held_out_accuracy_per_class": {c: None if a is None else round(a, 4) for c, a in zip(classes, per_class)},
        "epochs": args.epochs, "seconds": round(time.time() - t_train, 1), "torch": str(torch.__version__),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)) or ".", exist_ok=True)
    tmp = args.output + ".tmp"
    torch.save(export_for_shipping(state, meta), tmp)
    os.replace(tmp, args.output)
    print(f"held-out accuracy {acc:.4f} per class {meta['held_out_accuracy_per_class']}")
    print(f"wrote {args.output} ({os.path.getsize(args.output) / 1e6:.2f} MB, {len(state)} tensors)")
    return meta


if __name__ == "__main__":
    main()
