#!/usr/bin/env python
"""Speed of SMCA-DETR single scale.

(a) ``--part attention``: the Gaussian-modulated cross-attention, fused (our path: the log-Gaussian is
    the additive mask of ``F.scaled_dot_product_attention``) vs naive (explicit logits -> mask ->
    + Gaussian -> softmax -> @V, the official formulation), forward (inference) and
    forward+backward, time and peak memory, at batch 2, 300 queries, a 25x34 map, 8 heads, d 256.
    CPU peak memory = growth of the peak RSS over the current RSS during one call (after a warm-up),
    each variant in its own subprocess; CUDA peak = ``torch.cuda.max_memory_allocated`` above the inputs.
(b) ``--part model``: the full-size R50 model of ``configs/smca_r50.yaml`` through detectron2's model
    API: inference seconds per 640x800 image (and the part after the backbone), and one training
    step (batch 2 at 640x800: forward + loss + backward + gradient clipping + AdamW).

    python tools/benchmark_smca.py [--part attention|model|all] [--threads 2] [--device cpu|cuda]
                                   [--channels-last] [--stat min|median]

Official SMCA code on the project's 2-core CPU (torch.set_num_threads(2)): 0.85 s/image, 0.17 s of
it after the backbone; 4.4 s per training step; the target for this port is <= 0.8x of those.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
OFFICIAL_CPU = {"inference_s_per_image": 0.85, "after_backbone_s_per_image": 0.17, "train_step_s": 4.4}


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _cpu_jiffies():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = sum(v) - v[3] - v[4]  # all but idle and iowait
    with open("/proc/self/stat") as f:
        st = f.read().rsplit(")", 1)[1].split()
    return busy, int(st[11]) + int(st[12])  # system busy, this process (utime + stime)


def wait_idle(max_wait_s=120.0, window_s=0.5, threshold=0.1):
    """Wait (at most ``max_wait_s``) until other processes use less than ``threshold`` of one CPU
    over ``window_s``: the machine is shared, and 2-thread OpenMP timings degrade badly when any
    other process competes for the 2 cores. Returns the seconds waited (Linux only; else 0)."""
    if not os.path.exists("/proc/stat"):
        return 0.0
    hz = os.sysconf("SC_CLK_TCK")
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait_s:
        b0, s0 = _cpu_jiffies()
        time.sleep(window_s)
        b1, s1 = _cpu_jiffies()
        if ((b1 - b0) - (s1 - s0)) / hz / window_s < threshold:
            break
    return time.perf_counter() - t0


WAIT_IDLE = False


def timeit(fn, device, warmup=1, iters=5):
    """Minimum wall time over ``iters`` runs after ``warmup`` (the minimum is the least disturbed
    by other processes on a shared machine; ``--stat median`` reports the median instead). With
    ``--wait-idle`` every timed run starts when the other processes are (nearly) idle."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        if WAIT_IDLE:
            wait_idle()
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return STAT(times)


STAT = min


# ---------------------------------------------------------------------------------------- (a)
def attention_case(device, backward, seed=0):
    """Inputs and the implementations of one SMCA cross-attention call (Gaussian included):
    ``fused`` (SDPA with the additive Gaussian + padding mask), ``naive`` (explicit logits, -inf at
    padded keys, + Gaussian, softmax, @V: the official order) and ``model`` (``smca_cross_attention``,
    what the decoder runs: SDPA, or on CPU with a mask gradient the explicit ``baddbmm`` path)."""
    from smca_detr.modeling.layers import MultiheadAttention
    from smca_detr.modeling.transformers.smca import mask_padded_keys, smca_cross_attention, smca_gaussian_bias

    torch.manual_seed(seed)
    b, q, h, w, m, d = 2, 300, 25, 34, 8, 256
    attn = MultiheadAttention(d, m, dropout=0.0).to(device)
    query = torch.randn(b, q, d, device=device, requires_grad=backward)
    key = torch.randn(b, h * w, d, device=device, requires_grad=backward)
    value = torch.randn(b, h * w, d, device=device, requires_grad=backward)
    centers = (torch.rand(b, q, m, 2, device=device) * torch.tensor([w, h], device=device)).requires_grad_(backward)
    scales = torch.randn(b, q, m, 2, device=device).requires_grad_(backward)
    kpm = torch.zeros(b, h * w, dtype=torch.bool, device=device)
    kpm.view(b, h, w)[1, :, 30:] = True
    kpm.view(b, h, w)[1, 20:, :] = True

    def fused():
        bias = smca_gaussian_bias(centers, scales, h, w, "type3", 8.0)
        return attn(query, key, value, attn_bias=mask_padded_keys(bias, kpm, inplace=True))[0]

    def model():
        bias = smca_gaussian_bias(centers, scales, h, w, "type3", 8.0)
        return smca_cross_attention(attn, query, key, value, mask_padded_keys(bias, kpm, inplace=True))[0]

    def naive():
        bias = smca_gaussian_bias(centers, scales, h, w, "type3", 8.0)
        qh, kh, vh = attn.project(query, key, value)
        logits = (qh * qh.shape[-1] ** -0.5) @ kh.transpose(-1, -2)
        logits = logits.masked_fill(kpm[:, None, None, :], float("-inf")) + bias
        out = logits.softmax(-1) @ vh
        return attn.out_proj(out.transpose(1, 2).flatten(2))

    def run(fn):
        if backward:
            out = fn()
            out.square().mean().backward()
        else:
            with torch.no_grad():
                fn()

    return {"fused": fused, "naive": naive, "model": model}, run


def _proc_status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def attention_peak_cpu(variant, backward, threads):
    """Runs in a fresh process (started with MALLOC_MMAP_THRESHOLD_ so that freed tensors go back to
    the OS): after a warm-up call, the peak RSS is reset (/proc/self/clear_refs) and the growth of
    the peak over the current RSS during one call is returned, in bytes."""
    torch.set_num_threads(threads)
    variants, run = attention_case("cpu", backward)
    fn = variants[variant]
    run(fn)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _proc_status_kib("VmRSS")
    run(fn)
    return (_proc_status_kib("VmHWM") - base) * 1024


def bench_attention(device, threads, iters):
    res = {}
    with torch.no_grad():
        v, _ = attention_case(device, False)
        ref = v["naive"]()
        for name in ("fused", "model"):
            torch.testing.assert_close(v[name](), ref, atol=1e-4, rtol=1e-4)  # same maths
    for backward in (False, True):
        mode = "fwd+bwd" if backward else "fwd"
        variants, run = attention_case(device, backward)
        for name, fn in variants.items():
            t = timeit(lambda: run(fn), device, warmup=2, iters=iters)
            if device == "cuda":
                run(fn)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                run(fn)
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
            else:
                cmd = [sys.executable, __file__, "--_peak", name, "--threads", str(threads)]
                cmd += ["--_bwd"] if backward else []
                env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
                peak = int(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.split()[-1])
            res[f"{mode}/{name}"] = {"ms": round(t * 1e3, 2), "peak_MiB": round(peak / 2 ** 20, 1)}
        for name in ("fused", "model"):
            res[f"{mode}/naive_over_{name}_time"] = round(res[f"{mode}/naive"]["ms"] / res[f"{mode}/{name}"]["ms"], 2)
    return res


# ---------------------------------------------------------------------------------------- (b)
def build_full_model(device):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from smca_detr.config import add_smca_detr_config

    cfg = add_smca_detr_config(get_cfg())
    cfg.merge_from_file(str(REPO / "configs" / "smca_r50.yaml"))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = device
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def _inputs(n, h, w, device, with_targets):
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        d = {"image": (torch.rand(3, h, w, generator=g) * 255).to(device), "height": h, "width": w}
        if with_targets:
            inst = Instances((h, w))
            xy = torch.rand(6, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
            inst.gt_boxes = Boxes(torch.cat([xy, xy + torch.tensor([w * 0.2, h * 0.3])], 1))
            inst.gt_classes = torch.randint(0, 80, (6,), generator=g)
            d["instances"] = inst
        out.append(d)
    return out


def bench_model(device, iters, train_iters, channels_last=False):
    cfg, model = build_full_model(device)
    if channels_last:  # NHWC convolutions (oneDNN's native layout on CPU); activations follow the weights
        model.to(memory_format=torch.channels_last)
    res = {"channels_last": channels_last}
    # inference, one 640x800 image (h x w), detectron2 API
    model.eval()
    inp = _inputs(1, 640, 800, device, False)
    with torch.inference_mode():
        t_total = timeit(lambda: model(inp), device, warmup=1, iters=iters)
        images = model.preprocess_image(inp)
        t_bb = timeit(lambda: model.backbone(images.tensor, images.image_sizes), device, warmup=1, iters=iters)
        feats, masks = model.backbone(images.tensor, images.image_sizes)

        def after_backbone():
            out = model.forward_features(feats, masks, images.image_sizes)
            model.inference(out["pred_logits"][-1], out["pred_boxes"][-1], images.image_sizes)

        t_after = timeit(after_backbone, device, warmup=1, iters=iters)
    res["inference_s_per_image"] = round(t_total, 3)
    res["backbone_s_per_image"] = round(t_bb, 3)
    res["after_backbone_s_per_image"] = round(t_after, 3)
    # training step, batch 2 at 640x800: forward + loss + backward + clip 0.1 + AdamW
    model.train()
    batch = _inputs(2, 640, 800, device, True)
    bb = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone.")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
    lr_bb = cfg.SOLVER.BASE_LR * cfg.SOLVER.BACKBONE_MULTIPLIER
    opt = torch.optim.AdamW([{"params": rest}, {"params": bb, "lr": lr_bb}],
                            lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)

    def step():
        losses = model(batch)
        total = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(bb + rest, cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE)
        opt.step()

    res["train_step_s"] = round(timeit(step, device, warmup=1, iters=train_iters), 3)
    if device == "cpu":
        res["ratio_vs_official_cpu"] = {k: round(res[k] / v, 3) for k, v in OFFICIAL_CPU.items()}
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["attention", "model", "all"], default="all")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU (official figures: 2)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--train-iters", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--channels-last", action="store_true",
                    help="(b) with the model in channels_last memory format (NHWC convolutions)")
    ap.add_argument("--stat", choices=["min", "median"], default="min")
    ap.add_argument("--wait-idle", action="store_true",
                    help="start every timed run when other processes are idle (shared machines)")
    ap.add_argument("--_peak", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_bwd", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    global STAT, WAIT_IDLE
    STAT = min if args.stat == "min" else statistics.median
    WAIT_IDLE = args.wait_idle
    if args._peak:
        print(attention_peak_cpu(args._peak, args._bwd, args.threads))
        return 0
    results = {"device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__}
    devices = [args.device] + (["cpu"] if args.device == "cuda" and args.part != "model" else [])
    if args.part in ("attention", "all"):
        for dev in devices:
            results[f"attention[{dev}]"] = bench_attention(dev, args.threads, args.iters)
    if args.part in ("model", "all"):
        results[f"model[{args.device}]"] = bench_model(args.device, args.iters, args.train_iters, args.channels_last)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
