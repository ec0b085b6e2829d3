#!/usr/bin/env python
"""Side-by-side speed against the official code: both models timed alternately in one process.

    python tools/benchmark_official.py --official-root /path/to/SMCA-DETR --family smca [--rounds 6]
    python tools/benchmark_official.py --official-root /path/to/ConditionalDETR --family conditional

This is the measurement the issues' speed targets describe ("we will time both alternately in one
process"): the official repository's model (a checkout you provide, imported from
``--official-root``; nothing of it is copied here) and ours, same model size, same inputs, random
weights, ``--threads`` threads (2 in the issues). Every round times one call of each, in ABBA
order (the order flips every round), and the tool prints the median of the per-round ratios
ours / official with their range, per case:

* ``inference``: batch 1 at ``--height x --width``, eval mode, no grad. Official: its model on a
  ``NestedTensor`` (normalised image + padding mask, as its data loader builds it), then its
  ``PostProcess``; ours: ``model([{"image", "height", "width"}])`` (normalisation, padding and
  post-processing inside).
* ``train``: one training step at batch 2 with ``--boxes`` random boxes per image. Official: the
  step of its ``engine.train_one_epoch`` (model, criterion, weighted loss sum, ``zero_grad``,
  backward, ``clip_grad_norm_`` 0.1, AdamW with the backbone group at lr 1e-5, as its ``main.py``
  builds it); ours: ``bench_common.train_step`` (the trainer's optimizer, clipping
  included).

Official model arguments are its ``main.py`` defaults, with the recipe of our config: SMCA
single scale ``--dynamic_scale type3 --num_queries 300`` (the official README's configuration);
Conditional DETR as its defaults (300 queries). Two things are adapted without touching the
official files: torchvision's ResNet constructors get ``weights=None`` (the official backbone asks
for ImageNet weights, a download; the timed figures use random weights), and names that the
official files import under version checks which misfire on torch 2.x get what those files import
on new versions, or placeholders that raise if called (``_import_shims``).
"""
import argparse
import contextlib
import math
import statistics
import sys
from argparse import Namespace
from pathlib import Path
from typing import Callable, Dict, List

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import bench_common as bench  # noqa: E402

# The official main.py defaults (models/*.py read these), per family; the recipe keys match our
# configs/smca_r50.yaml and configs/conditional_detr_r50.yaml.
_COMMON_ARGS = dict(
    lr=1e-4, lr_backbone=1e-5, batch_size=2, weight_decay=1e-4, clip_max_norm=0.1, frozen_weights=None,
    backbone="resnet50", dilation=False, position_embedding="sine", enc_layers=6, dec_layers=6,
    dim_feedforward=2048, hidden_dim=256, dropout=0.1, nheads=8, pre_norm=False, masks=False,
    aux_loss=True, set_cost_class=2.0, set_cost_bbox=5.0, set_cost_giou=2.0, mask_loss_coef=1.0,
    dice_loss_coef=1.0, bbox_loss_coef=5.0, giou_loss_coef=2.0, dataset_file="coco", device="cpu",
    seed=42, distributed=False)
FAMILIES = {
    "smca": dict(config="configs/smca_r50.yaml", entry="models/detr.py",
                 args=dict(_COMMON_ARGS, num_queries=300, smooth=8.0, dynamic_scale="type3", eos_coef=0.1),
                 forward_takes_targets=True),
    "conditional": dict(config="configs/conditional_detr_r50.yaml", entry="models/conditional_detr.py",
                        args=dict(_COMMON_ARGS, num_queries=300, cls_loss_coef=2.0, focal_alpha=0.25),
                        forward_takes_targets=False),
}
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the official data pipeline's Normalize


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official-root", required=True,
                    help="checkout of the official repository (gaopengcuhk/SMCA-DETR or Atten4Vis/ConditionalDETR)")
    ap.add_argument("--family", choices=sorted(FAMILIES), required=True)
    ap.add_argument("--config-file", default=None, help="our config (default: the family's R50 config)")
    ap.add_argument("--case", nargs="+", choices=("inference", "train"), default=["inference", "train"])
    ap.add_argument("--rounds", type=int, default=6, help="alternating rounds (each times both once)")
    ap.add_argument("--height", type=int, default=640)
    ap.add_argument("--width", type=int, default=800)
    ap.add_argument("--boxes", type=int, default=6, help="ground-truth boxes per training image")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (the issues' figures: 2)")
    ap.add_argument("--official-fast-dropout", action="store_true",
                    help="give the official model's dropout our fast CPU mask generator (same distribution): "
                         "what the official step would cost where PyTorch's bernoulli is fast (Intel with MKL)")
    args = ap.parse_args(argv)
    root = Path(args.official_root)
    entry = root / FAMILIES[args.family]["entry"]
    if not entry.is_file():
        ap.error(f"--official-root {root}: no {FAMILIES[args.family]['entry']} there; give a checkout of the "
                 f"official {args.family} repository")
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    return args


# ----------------------------------------------------------------------------- the official model
def _placeholder(name: str) -> Callable:
    def missing(*a, **k):
        raise RuntimeError(f"{name} is a placeholder of tools/benchmark_official.py (absent from this torchvision)")
    return missing


def _import_shims() -> None:
    """Names that the official files import under version checks that misfire on torch 2.x /
    torchvision 0.2x (the files stay untouched):

    * DETR-family ``util/misc.py``: ``float(torchvision.__version__[:3]) < 0.7`` reads "0.2" and
      imports two removed private helpers; they get placeholders that raise if called (only empty
      tensors reach them);
    * Conditional DETR ``models/attention.py``: its old-torch branches import
      ``torch.nn.modules.linear._LinearWithBias`` and ``torch._overrides``; they get what the same
      file's new-torch branches import (``NonDynamicallyQuantizableLinear``, ``torch.overrides``'s
      two functions)."""
    import types

    import torch.nn.modules.linear as linear
    import torch.overrides
    import torchvision.ops
    import torchvision.ops.misc

    if not hasattr(torchvision.ops, "_new_empty_tensor"):
        torchvision.ops._new_empty_tensor = _placeholder("torchvision.ops._new_empty_tensor")
    if not hasattr(torchvision.ops.misc, "_output_size"):
        torchvision.ops.misc._output_size = _placeholder("torchvision.ops.misc._output_size")
    if not hasattr(linear, "_LinearWithBias"):
        linear._LinearWithBias = linear.NonDynamicallyQuantizableLinear
    if "torch._overrides" not in sys.modules:
        old = types.ModuleType("torch._overrides")
        old.has_torch_function = torch.overrides.has_torch_function
        old.handle_torch_function = torch.overrides.handle_torch_function
        sys.modules["torch._overrides"] = old


def _random_weight_resnets() -> None:
    """The official backbone calls ``torchvision.models.<name>(pretrained=...)``: random weights here."""
    import torchvision.models as tvm

    for name in ("resnet18", "resnet34", "resnet50", "resnet101"):
        ctor = getattr(tvm, name)
        if getattr(ctor, "_benchmark_random_weights", False):
            continue

        def random_weights(*a, _ctor=ctor, **k):
            k.pop("pretrained", None)
            k["weights"] = None
            return _ctor(*a, **k)

        random_weights._benchmark_random_weights = True
        setattr(tvm, name, random_weights)


def build_official(root: str, family: str, seed: int = 0):
    """``(model, criterion, postprocessors, args)`` of the official repository at ``root``."""
    root = str(Path(root).resolve())
    for mod in [m for m in sys.modules if m in ("models", "util") or m.startswith(("models.", "util."))]:
        del sys.modules[mod]  # another checkout's packages of the same names
    sys.path.insert(0, root)
    try:
        _import_shims()
        _random_weight_resnets()
        from models import build_model  # the official package

        args = Namespace(**FAMILIES[family]["args"])
        torch.manual_seed(seed)
        model, criterion, postprocessors = build_model(args)
    finally:
        sys.path.remove(root)
    return model, criterion, postprocessors, args


def official_inputs(batch: List[dict]):
    """Our detectron2 inputs as the official data pipeline hands them to the model: a ``NestedTensor``
    of normalised RGB images with its padding mask, and targets (labels as COCO-style ids >= 1, boxes
    cxcywh normalised by the image size, ``size`` / ``orig_size`` as (h, w))."""
    from util.misc import nested_tensor_from_tensor_list  # the official helper (imported by build_official)

    mean = torch.tensor(_MEAN).view(3, 1, 1)
    std = torch.tensor(_STD).view(3, 1, 1)
    images, targets = [], []
    for x in batch:
        img = x["image"].flip(0) / 255.0  # detectron2 inputs are BGR 0..255
        images.append((img - mean) / std)
        h, w = img.shape[-2:]
        t = {"size": torch.tensor([h, w]), "orig_size": torch.tensor([x["height"], x["width"]])}
        if "instances" in x:
            inst = x["instances"]
            b = inst.gt_boxes.tensor
            scale = torch.tensor([w, h, w, h], dtype=b.dtype)
            cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2,
                                  b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)
            t["boxes"] = cxcywh / scale
            t["labels"] = inst.gt_classes + 1
        targets.append(t)
    return nested_tensor_from_tensor_list(images), targets


def official_cases(root: str, family: str, hw, num_boxes: int, with_fast_dropout: bool = False
                   ) -> Dict[str, Callable]:
    """The two timed cases of the official model (see the module docstring); ``with_fast_dropout``
    runs them under :func:`fast_dropout`."""
    spec = FAMILIES[family]
    model, criterion, post, args = build_official(root, family)
    sys.path.insert(0, str(Path(root).resolve()))
    try:
        samples1, targets1 = official_inputs(bench.synthetic_inputs(1, *hw))
        samples2, targets2 = official_inputs(bench.synthetic_inputs(2, *hw, with_instances=True, num_boxes=num_boxes))
    finally:
        sys.path.remove(str(Path(root).resolve()))
    groups = [
        {"params": [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]},
        {"params": [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad],
         "lr": args.lr_backbone},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)

    def call(samples, targets):
        return model([samples, targets]) if spec["forward_takes_targets"] else model(samples)

    def inference():
        model.eval()
        with torch.no_grad():
            out = call(samples1, targets1)
            post["bbox"](out, torch.stack([t["orig_size"] for t in targets1]))

    def train():
        model.train()
        criterion.train()
        loss_dict = criterion(call(samples2, targets2), targets2)
        weights = criterion.weight_dict
        losses = sum(loss_dict[k] * weights[k] for k in loss_dict if k in weights)
        if not math.isfinite(losses.item()):  # the official engine reads and checks the loss too
            raise FloatingPointError(f"official training loss is not finite: {losses.item()}")
        optimizer.zero_grad()
        losses.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_max_norm)
        optimizer.step()

    if not with_fast_dropout:
        return {"inference": inference, "train": train}

    def under_fast_dropout(fn):
        def call():
            with fast_dropout():
                fn()
        return call

    return {"inference": under_fast_dropout(inference), "train": under_fast_dropout(train)}


@contextlib.contextmanager
def fast_dropout():
    """``torch.nn.functional.dropout`` (what the official ``nn.Dropout`` and attentions call) with the
    mask from :mod:`smca_detr.layers.dropout` for float CPU tensors, for the official calls only.
    PyTorch's CPU ``bernoulli_`` is parallel (MKL) on Intel processors only; elsewhere its sequential
    generator makes dropout a large part of the official training step, so this shows the ratio for
    a machine where it is fast."""
    import torch.nn.functional as F

    from smca_detr.layers.dropout import scale_mask

    original = F.dropout

    def dropout(x, p=0.5, training=True, inplace=False):
        if (training and 0.0 < p < 1.0 and x.device.type == "cpu"
                and x.dtype in (torch.float32, torch.float64)):
            mask = scale_mask(x.shape, p, x.dtype)
            return x.mul_(mask) if inplace else x * mask
        return original(x, p, training, inplace)

    # torch.nn.functional itself, and official modules that imported the function by name
    # (Conditional DETR's models/attention.py: ``from torch.nn.functional import ..., dropout``)
    owners = [F] + [m for name, m in list(sys.modules.items())
                    if name.startswith("models.") and getattr(m, "dropout", None) is original]
    for owner in owners:
        owner.dropout = dropout
    try:
        yield
    finally:
        for owner in owners:
            owner.dropout = original


# ------------------------------------------------------------------------------------------ main
def alternate(ours: Dict[str, Callable], official: Dict[str, Callable], cases: List[str], rounds: int) -> Dict:
    """Time ``ours[c]`` and ``official[c]`` for every case ``c``, ABBA order, ``rounds`` rounds after a
    warm-up call of each; per case the times and the median / range of the ratios ours / official."""
    for c in cases:
        official[c]()
        ours[c]()
    times = bench.time_alternately({c: {"official": official[c], "ours": ours[c]} for c in cases}, rounds)
    return {c: {"seconds": t, "ratio": bench.ratio_summary(t["ours"], t["official"])} for c, t in times.items()}


def main(argv=None) -> Dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    hw = (args.height, args.width)
    spec = FAMILIES[args.family]
    official = official_cases(args.official_root, args.family, hw, args.boxes, args.official_fast_dropout)
    config = args.config_file or str(REPO / spec["config"])
    cfg, model = bench.build_model(config)
    _, train_model = bench.build_model(config)
    mine = bench.model_cases(cfg, model, train_model, hw, num_boxes=args.boxes)
    ours = {"inference": mine["inference"], "train": mine["train_step"]}
    res = alternate(ours, official, list(args.case), args.rounds)
    print(f"{args.family}: ours ({Path(config).name}) vs the official code at {args.official_root}"
          f"{' (with our fast dropout)' if args.official_fast_dropout else ''}, "
          f"{args.rounds} alternating rounds, {args.threads} threads, {hw[0]}x{hw[1]}")
    for c, r in res.items():
        s = r["seconds"]
        print(f"  {c}: ours median {statistics.median(s['ours']):.3f} s, official median "
              f"{statistics.median(s['official']):.3f} s; ours / official: median {r['ratio']['median']:.3f} "
              f"(rounds {r['ratio']['min']:.3f}-{r['ratio']['max']:.3f})")
    return {"family": args.family, "official_fast_dropout": args.official_fast_dropout, "rounds": args.rounds,
            "threads": args.threads, "image_hw": list(hw), **res}


if __name__ == "__main__":
    main()
