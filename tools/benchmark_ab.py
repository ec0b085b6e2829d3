#!/usr/bin/env python
"""A/B speed of one config change: two models, timed alternately in one process.

    python tools/benchmark_ab.py --config-file configs/smca_r50.yaml \\
        --b-opts MODEL.SMCA_DETR.FUSED_CPU_BACKBONE False [--a-opts KEY VALUE ...] \\
        [--case train|inference|backbone] [--rounds 16] [--height 640 --width 800] [--threads 2]

Model A is the config with ``--a-opts``, model B the config with ``--b-opts``. Both are built with
the same seed, so a speed-only option (a fast path, a threshold) gives identical weights. Every round
times one call of each, in ABBA order (the order flips every round), so a host whose speed drifts
affects both alike. The tool prints the median of the per-round ratios B / A, the range of those
ratios and the median times. The project's 2-core host drifts by up to 40% from hour to hour, which
makes two separate runs useless for telling a 5% change apart; this tool is how the README's
"alternating in one process" figures are measured.

Cases (the shapes of the issues' speed targets):
* ``train``: one training step at batch 2 (forward + loss + backward + clipping + AdamW,
  ``bench_common.train_step``); both models train, on the same synthetic batch;
* ``inference``: ``model([{"image", "height", "width"}])`` at batch 1, eval mode;
* ``backbone``: the backbone's forward + backward at batch 2 (training mode, a fixed random output
  gradient), the part that the CPU backbone options change.

The first call of each model is checked: losses (train) or backbone outputs (backbone, inference)
of A and B must agree to ``--rtol``, so that an option that changes the maths is not timed as a
speed-up.
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import bench_common as bench  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-file", default=str(REPO / "configs" / "smca_r50.yaml"),
                    help="a config file or a model-zoo config name")
    ap.add_argument("--a-opts", nargs="*", default=[], help="KEY VALUE pairs of model A")
    ap.add_argument("--b-opts", nargs="*", default=[], help="KEY VALUE pairs of model B")
    ap.add_argument("--case", choices=("train", "inference", "backbone"), default="train")
    ap.add_argument("--rounds", type=int, default=16, help="alternating rounds (each times A once and B once)")
    ap.add_argument("--height", type=int, default=640)
    ap.add_argument("--width", type=int, default=800)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (the official figures: 2)")
    ap.add_argument("--rtol", type=float, default=1e-3, help="agreement of A and B on the first call")
    args = ap.parse_args(argv)
    for name in ("a_opts", "b_opts"):
        if len(getattr(args, name)) % 2:
            ap.error(f"--{name.replace('_', '-')} takes KEY VALUE pairs, got {getattr(args, name)}")
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    return args


def _case(args, opts):
    """(a call to time, a call returning the tensors of the agreement check) of one model."""
    cfg, model = bench.build_model(args.config_file, opts)
    if args.case == "inference":
        model.eval()
        inputs = bench.synthetic_inputs(1, args.height, args.width)

        def infer():
            with torch.inference_mode():
                return model(inputs)

        def check():
            with torch.inference_mode():
                images = model.preprocess_image(inputs)
                return model.backbone(images.tensor, images.image_sizes)[0]
        return infer, check
    batch = bench.synthetic_inputs(2, args.height, args.width, with_instances=True, num_boxes=6,
                                  num_classes=cfg.MODEL.SMCA_DETR.NUM_CLASSES)
    if args.case == "train":
        opt = bench.build_adamw(cfg, model)
        return (lambda: bench.train_step(model, batch, opt)), (lambda: [bench.train_step(model, batch, opt)])
    images = model.preprocess_image(batch)
    grads = []

    def backbone():
        feats, _ = model.backbone(images.tensor, images.image_sizes)
        if not grads:
            gen = torch.Generator().manual_seed(0)
            grads.extend(torch.randn(f.shape, generator=gen) for f in feats)
        torch.autograd.backward(feats, grads)
        model.zero_grad(set_to_none=True)
        return [f.detach() for f in feats]
    return backbone, backbone


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    calls = {}
    first = {}
    for name, opts in (("A", args.a_opts), ("B", args.b_opts)):
        calls[name], check = _case(args, opts)
        first[name] = check()  # also the warm-up call
        calls[name]()
    for a, b in zip(first["A"], first["B"]):
        if a.shape != b.shape or not torch.allclose(a.float(), b.float(), rtol=args.rtol, atol=args.rtol * float(a.abs().max())):
            diff = f"max difference {(a - b).abs().max().item():.3g}" if a.shape == b.shape else \
                f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
            raise SystemExit(f"A and B disagree on the first call ({diff}): --a-opts {args.a_opts} / "
                             f"--b-opts {args.b_opts} change the results, not only the speed")
    times = bench.time_alternately({args.case: calls}, args.rounds)[args.case]
    return {"case": args.case, "rounds": args.rounds, "a_opts": args.a_opts, "b_opts": args.b_opts,
            "median_s": {k: statistics.median(v) for k, v in times.items()},
            "ratio_b_over_a": bench.ratio_summary(times["B"], times["A"]),
            "times_s": times}


def main(argv=None) -> dict:
    args = parse_args(argv)
    res = run(args)
    r = res["ratio_b_over_a"]
    print(f"{res['case']}, {res['rounds']} alternating rounds: A {res['median_s']['A']:.3f} s, "
          f"B {res['median_s']['B']:.3f} s (medians); B / A median {r['median']:.3f} "
          f"(rounds {r['min']:.3f}-{r['max']:.3f})")
    return res


if __name__ == "__main__":
    main()
