#!/usr/bin/env python
"""CPU speed of the full-size Conditional DETR (R50, d=256, 300 queries, random weights) through
detectron2's model API.

Prints:
  * inference s/image at 640x800, batch 1 (``model([{"image", "height", "width"}])``), and the part
    after the backbone;
  * s/train-step for a batch of 2 images at 640x800 (forward + losses + backward + full-model
    gradient clipping + AdamW step);
  * the decoder cross-attention alone: fused SDPA vs an explicit softmax (forward, and forward +
    backward), and the whole model's inference with either implementation.

Every figure also comes with the process CPU time; CPU time / wall time well below the thread
count means other processes shared the cores and the wall times are inflated.

``--calibrate`` also times the official backbone (torchvision R50 body, frozen BN) here and divides
the ratios vs the official figures by how much slower this machine is than the official one (an
estimate; see ``smca_detr.utils.speed``).

``--floor`` prints only the arithmetic floor of the training step instead (its FLOPs, ours and the
official arithmetic, against this CPU's sgemm peak; ``smca_detr.utils.speed.arithmetic_floor``).

Usage: python tools/benchmark_conditional.py [--threads 2] [--repeats 5] [--channels-last] [--config ...]
                                             [--calibrate] [--floor]
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from smca_detr.modeling.transformers.conditional import HeadAttention  # noqa: E402
from smca_detr.utils import speed  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Reference figures of the official implementation on the same 2-core CPU (given by the project).
OFFICIAL = {"infer": 0.87, "infer_after_backbone": 0.16, "train_step": 4.7}


def timeit(fn, repeats, warmup=1):
    """Median wall time of ``fn``; the process CPU time of the same runs is kept in ``CPU_TIMES``
    (its ratio to the wall time shows whether other processes competed for the cores)."""
    t = speed.time_fn(fn, iters=repeats, warmup=warmup, stat="median")
    CPU_TIMES.append((t.seconds, t.cpu_seconds))
    return t.seconds


CPU_TIMES = []


def cpu_of(wall):
    """CPU time of the measurement whose median wall time is ``wall``."""
    return next(c for w, c in CPU_TIMES if w == wall)


def bench_attention(repeats, b=1, heads=8, d=256, q=300, s=500):
    """Cross-attention alone: q/k head width 2d/M, v head width d/M, with a padding mask."""
    g = torch.Generator().manual_seed(0)
    qh = torch.randn(b, heads, q, 2 * d // heads, generator=g)
    kh = torch.randn(b, heads, s, 2 * d // heads, generator=g)
    vh = torch.randn(b, heads, s, d // heads, generator=g)
    mask = torch.zeros(b, 1, 1, s)
    mask[..., -s // 10:] = float("-inf")
    att = HeadAttention(d)
    res = {}
    for impl in ("sdpa", "naive"):
        att.impl = impl
        with torch.no_grad():
            res[impl + "_fwd"] = timeit(lambda: att(qh, kh, vh, mask), repeats * 10)
        qg, kg, vg = (t.clone().requires_grad_() for t in (qh, kh, vh))
        res[impl + "_fwd_bwd"] = timeit(lambda: att(qg, kg, vg, mask).sum().backward(), repeats * 10)
    with torch.no_grad():
        att.impl = "sdpa"
        out_s = att(qh, kh, vh, mask)
        att.impl = "naive"
        out_n = att(qh, kh, vh, mask)
    res["max_abs_diff"] = float((out_s - out_n).abs().max())
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "conditional_detr_r50.yaml"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--height", type=int, default=640)
    ap.add_argument("--width", type=int, default=800)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--channels-last", action="store_true",
                    help="convert the backbone weights to channels-last (its activations follow)")
    speed.add_interleave_argument(ap)
    ap.add_argument("--calibrate", action="store_true",
                    help="also time the official backbone here (torchvision R50 body, frozen BN, 640x800) and "
                         "print the ratios vs the official figures divided by the machine factor (an estimate)")
    ap.add_argument("--floor", action="store_true",
                    help="only print the arithmetic floor of the training step (FLOPs vs this CPU's sgemm peak)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    h, w = args.height, args.width
    if args.floor:
        rep = speed.arithmetic_floor(args.config, OFFICIAL["train_step"], OFFICIAL["infer"],
                                     OFFICIAL["infer_after_backbone"], threads=args.threads, hw=(h, w))
        print("\n".join(speed.format_floor(rep)))
        return {"floor": rep}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, config {args.config}, "
          f"channels-last backbone {args.channels_last}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    cfg, model = speed.build_model(args.config)
    if args.channels_last:
        model.backbone.to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, {cfg.MODEL.SMCA_DETR.NUM_QUERIES} queries, "
          f"d={cfg.MODEL.SMCA_DETR.HIDDEN_DIM}")

    # ---------------------------------------------------------------- inference
    model.eval()
    batch = speed.synthetic_inputs(1, h, w, seed=1)
    with torch.no_grad():
        t_inf = timeit(lambda: model(batch), args.repeats)
        backbone, after_backbone = speed.split_inference(model, batch, postprocess=False)
        t_backbone = timeit(backbone, args.repeats)
        t_after = timeit(after_backbone, args.repeats)
        model.transformer.set_attention_impl("sdpa" if model.device.type == "cpu" else "naive")
        t_after_other = timeit(after_backbone, args.repeats)
        model.transformer.set_attention_impl("auto")
    print(f"inference {h}x{w} batch 1: {t_inf:.3f} s/image "
          f"(official {OFFICIAL['infer']:.2f}, ratio {t_inf / OFFICIAL['infer']:.2f}); CPU time {cpu_of(t_inf):.3f} s")
    print(f"  backbone {t_backbone:.3f} s; after the backbone {t_after:.3f} s "
          f"(official {OFFICIAL['infer_after_backbone']:.2f}, ratio "
          f"{t_after / OFFICIAL['infer_after_backbone']:.2f}); with {'SDPA' if model.device.type == 'cpu' else 'naive'} attention {t_after_other:.3f} s")
    print(f"  CPU time: backbone {cpu_of(t_backbone):.3f} s, after the backbone {cpu_of(t_after):.3f} s "
          f"(other attention {cpu_of(t_after_other):.3f} s)")

    # ---------------------------------------------------------------- training step
    ratios = {"infer": t_inf / OFFICIAL["infer"], "infer_after_backbone": t_after / OFFICIAL["infer_after_backbone"]}
    if not args.skip_train:
        model.train()
        opt = speed.build_adamw(cfg, model)  # the trainer's: backbone LR multiplier, clipping inside step()
        batch = speed.synthetic_inputs(2, h, w, with_instances=True, num_boxes=8, seed=1)
        t_train = timeit(lambda: speed.train_step(model, batch, opt, check_finite=True), max(2, args.repeats // 2))
        ratios["train_step"] = t_train / OFFICIAL["train_step"]
        print(f"train step batch 2 at {h}x{w} (fwd+loss+bwd+clip+AdamW): {t_train:.3f} s "
              f"(official {OFFICIAL['train_step']:.1f}, ratio {t_train / OFFICIAL['train_step']:.2f}); "
              f"CPU time {cpu_of(t_train):.3f} s")

    # ---------------------------------------------------------------- attention alone
    s = (math.ceil(h / 32)) * (math.ceil(w / 32))
    for b in (1, 2):
        r = bench_attention(args.repeats, b=b, d=cfg.MODEL.SMCA_DETR.HIDDEN_DIM, heads=cfg.MODEL.SMCA_DETR.NHEADS,
                            q=cfg.MODEL.SMCA_DETR.NUM_QUERIES, s=s)
        print(f"cross-attention B={b} Q={cfg.MODEL.SMCA_DETR.NUM_QUERIES} S={s}: "
              f"fwd sdpa {r['sdpa_fwd'] * 1e3:.2f} ms vs naive {r['naive_fwd'] * 1e3:.2f} ms; "
              f"fwd+bwd sdpa {r['sdpa_fwd_bwd'] * 1e3:.2f} ms vs naive {r['naive_fwd_bwd'] * 1e3:.2f} ms; "
              f"max |diff| {r['max_abs_diff']:.1e}")

    walls = sum(w for w, _ in CPU_TIMES)
    cpus = sum(c for _, c in CPU_TIMES)
    print(f"CPU time / wall time over all measurements: {cpus / walls:.2f} "
          f"(about {args.threads} when the cores were not shared with other processes)")
    results = {"inference_s_per_image": t_inf, "backbone_s": t_backbone, "after_backbone_s": t_after,
               "ratio_vs_official": ratios}
    if not args.skip_train:
        results["train_step_s"] = t_train
    if args.interleave:
        results["interleaved"] = speed.interleaved_model_calibration(
            cfg, model, speed.build_model(args.config)[1], OFFICIAL["infer"], OFFICIAL["infer_after_backbone"],
            OFFICIAL["train_step"], args.interleave, threads=args.threads, hw=(h, w))
        print("\n".join(speed.format_interleaved(results["interleaved"])))
    if args.calibrate:
        results["calibration"] = speed.machine_calibration(OFFICIAL["infer"], OFFICIAL["infer_after_backbone"],
                                                           ratios, threads=args.threads)
        print("\n".join(speed.format_calibration(results["calibration"])))
    return results


if __name__ == "__main__":
    main()
