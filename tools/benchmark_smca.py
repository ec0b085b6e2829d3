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
                                   [--channels-last] [--stat min|median] [--calibrate] [--floor]

Official SMCA code on the project's 2-core CPU (torch.set_num_threads(2)): 0.85 s/image, 0.17 s of
it after the backbone; 4.4 s per training step; the target for this port is <= 0.8x of those.
``--calibrate`` also times the official backbone (torchvision R50 body, frozen BN) here and divides
the ratios vs those figures by how much slower this machine is than the official one (an estimate;
see ``smca_detr.utils.speed``). ``--floor`` also prints the arithmetic floor of the training step
(its FLOPs, ours and the official arithmetic, against this CPU's sgemm peak;
``smca_detr.utils.speed.arithmetic_floor``); ``--part none --floor`` prints only that.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from smca_detr.utils import speed  # noqa: E402

OFFICIAL_CPU = {"inference_s_per_image": 0.85, "after_backbone_s_per_image": 0.17, "train_step_s": 4.4}


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
    return speed.time_fn(fn, iters=iters, warmup=warmup, stat=STAT, device=device,
                         before_each=wait_idle if WAIT_IDLE else None).seconds


STAT = "min"


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


def attention_peak_cpu(variant, backward, threads):
    """Runs in a fresh process (started with MALLOC_MMAP_THRESHOLD_ so that freed tensors go back to
    the OS): after a warm-up call, the peak RSS is reset (/proc/self/clear_refs) and the growth of
    the peak over the current RSS during one call is returned, in bytes."""
    torch.set_num_threads(threads)
    variants, run = attention_case("cpu", backward)
    fn = variants[variant]
    run(fn)
    return speed.cpu_peak_bytes(lambda: run(fn))


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
    return speed.build_model(REPO / "configs" / "smca_r50.yaml", device=device)


def bench_model(device, iters, train_iters, channels_last=False):
    cfg, model = build_full_model(device)
    if channels_last:  # NHWC convolutions (oneDNN's native layout on CPU); activations follow the weights
        model.to(memory_format=torch.channels_last)
    res = {"channels_last": channels_last}
    # inference, one 640x800 image (h x w), detectron2 API
    model.eval()
    inp = speed.synthetic_inputs(1, 640, 800, device)
    with torch.inference_mode():
        t_total = timeit(lambda: model(inp), device, warmup=1, iters=iters)
        backbone, after_backbone = speed.split_inference(model, inp)
        t_bb = timeit(backbone, device, warmup=1, iters=iters)
        t_after = timeit(after_backbone, device, warmup=1, iters=iters)
    res["inference_s_per_image"] = round(t_total, 3)
    res["backbone_s_per_image"] = round(t_bb, 3)
    res["after_backbone_s_per_image"] = round(t_after, 3)
    # training step, batch 2 at 640x800: forward + loss + backward + clip 0.1 + AdamW
    model.train()
    batch = speed.synthetic_inputs(2, 640, 800, device, with_instances=True, num_boxes=6)
    opt = speed.build_adamw(cfg, model)  # backbone LR multiplier, clipping 0.1 inside step()
    res["train_step_s"] = round(timeit(lambda: speed.train_step(model, batch, opt), device, warmup=1,
                                       iters=train_iters), 3)
    if device == "cpu":
        res["ratio_vs_official_cpu"] = {k: round(res[k] / v, 3) for k, v in OFFICIAL_CPU.items()}
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["attention", "model", "all", "none"], default="all",
                    help="none: only what --interleave / --calibrate ask for")
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
    speed.add_interleave_argument(ap)
    ap.add_argument("--calibrate", action="store_true",
                    help="also time the official backbone here (torchvision R50 body, frozen BN, 640x800) and "
                         "print the ratios vs the official CPU figures divided by the machine factor (an estimate)")
    ap.add_argument("--floor", action="store_true",
                    help="also print the arithmetic floor of the training step (FLOPs vs this CPU's sgemm peak)")
    ap.add_argument("--_peak", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_bwd", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    global STAT, WAIT_IDLE
    STAT = args.stat
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
    if args.calibrate:
        ratios = results.get(f"model[{args.device}]", {}).get("ratio_vs_official_cpu", {})
        results["calibration"] = speed.machine_calibration(
            OFFICIAL_CPU["inference_s_per_image"], OFFICIAL_CPU["after_backbone_s_per_image"], ratios,
            threads=args.threads)
    if args.interleave:
        cfg, model = build_full_model(args.device)
        results["interleaved"] = speed.interleaved_model_calibration(
            cfg, model, build_full_model(args.device)[1], OFFICIAL_CPU["inference_s_per_image"],
            OFFICIAL_CPU["after_backbone_s_per_image"], OFFICIAL_CPU["train_step_s"], args.interleave,
            threads=args.threads, device=args.device)
    if args.floor:
        results["floor"] = speed.arithmetic_floor(
            REPO / "configs" / "smca_r50.yaml", OFFICIAL_CPU["train_step_s"], OFFICIAL_CPU["inference_s_per_image"],
            OFFICIAL_CPU["after_backbone_s_per_image"], threads=args.threads)
    print(json.dumps(results, indent=2))
    if args.floor:
        print("\n".join(speed.format_floor(results["floor"])))
    if args.calibrate:
        print("\n".join(speed.format_calibration(results["calibration"])))
    if args.interleave:
        print("\n".join(speed.format_interleaved(results["interleaved"])))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
