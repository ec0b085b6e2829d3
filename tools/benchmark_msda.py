#!/usr/bin/env python
"""Benchmark the multi-scale deformable attention (MSDA) core: forward and forward+backward time
and peak memory for each available implementation and dtype, on realistic Deformable DETR sizes.

Sizes (``--size full``, default): batch 2, an 800x1333 image with strides 8/16/32/64 -> levels
100x167, 50x84, 25x42, 13x21 (S = 22223 values), 8 heads x 32 channels, 4 points; the encoder case
has one query per value position (22223 ~ 20k queries), the decoder case 300 queries.
``--small`` (= ``--size small``) halves the image (400x667) and uses 100 decoder queries;
``--size tiny`` is a smoke test (e.g. of the Triton path in the interpreter on CPU).

Implementations: "pytorch" always (the CPU path of smca_detr/layers/msda/gather.py: one
embedding_bag forward over a zero-ringed value table, sampled_addmm + sorted embedding_bag backward;
on other devices with gradients the grid_sample oracle); "oracle" (``--impls oracle``) forces the
grid_sample oracle ``ms_deform_attn_pytorch`` (the official formulation) forward and backward; "triton" on CUDA when triton imports (or on CPU with
``TRITON_INTERPRET=1`` and ``--impls triton``, tiny sizes only - the interpreter is very slow).
Dtypes: float32, plus float16 / bfloat16 on GPU. Ratios are speed-ups relative to the PyTorch
float32 path of the same case (>1 = faster). Peak memory: CUDA ``max_memory_allocated`` above the
inputs; on CPU (Linux) the peak resident-memory growth during one call (``VmHWM`` reset through
``/proc/self/clear_refs``).

    python tools/benchmark_msda.py                       # GPU if available, else CPU (pytorch)
    python tools/benchmark_msda.py --device cpu --small --cases decoder --repeats 3
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smca_detr.layers.msda import ms_deform_attn, ms_deform_attn_pytorch, triton_available  # noqa: E402
import bench_common as bench  # noqa: E402

SIZES = {
    # (level shapes, decoder queries)
    "full": ([(100, 167), (50, 84), (25, 42), (13, 21)], 300),
    "small": ([(50, 84), (25, 42), (13, 21), (7, 11)], 100),
    "tiny": ([(8, 12), (4, 6), (2, 3), (1, 2)], 16),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_inputs(shapes, batch, queries, heads, channels, points, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    spatial = torch.tensor(shapes, dtype=torch.int64)
    areas = spatial[:, 0] * spatial[:, 1]
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S, L = int(areas.sum()), len(shapes)
    value = torch.randn(batch, S, heads, channels, generator=g)
    loc = torch.rand(batch, queries, heads, L, points, 2, generator=g)
    attn = torch.randn(batch, queries, heads, L * points, generator=g).softmax(-1)
    attn = attn.view(batch, queries, heads, L, points)
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return to(value), spatial.to(device), starts.to(device), to(loc), to(attn)


def measure(fn, device, repeats, warmup, bar):
    """Median milliseconds of ``repeats`` calls after ``warmup`` (device synchronised)."""
    t = bench.time_fn(fn, iters=repeats, warmup=warmup, stat="median", device=device,
                      after_each=lambda: bar.update(1))
    return t.seconds * 1e3


def peak_memory(fn, device):
    if device.type == "cuda":
        bench.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        bench.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        return bench.cpu_peak_bytes(fn)
    except OSError:  # not Linux
        return float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=None, help="timed iterations (default 20 GPU / 3 CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 3 GPU / 1 CPU)")
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--small", action="store_true", help="same as --size small")
    ap.add_argument("--cases", nargs="+", choices=["encoder", "decoder"], default=["encoder", "decoder"])
    ap.add_argument("--impls", nargs="+", choices=["pytorch", "oracle", "triton"], default=None)
    ap.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--channels", type=int, default=32, help="channels per head")
    ap.add_argument("--points", type=int, default=4)
    args = ap.parse_args(argv)

    from tqdm import tqdm

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    repeats = args.repeats or (20 if gpu else 3)
    warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    shapes, dec_q = SIZES["small" if args.small else args.size]
    enc_q = sum(h * w for h, w in shapes)
    impls = args.impls or (["pytorch", "triton"] if gpu and triton_available() else ["pytorch"])
    if "triton" in impls and not gpu and os.environ.get("TRITON_INTERPRET", "0") != "1":
        ap.error("--impls triton on CPU needs TRITON_INTERPRET=1 (Triton interpreter)")
    dtypes = args.dtypes or (["fp32", "fp16", "bf16"] if gpu else ["fp32"])
    cases = {"encoder": enc_q, "decoder": dec_q}
    runs = [(c, i, d) for c in args.cases for i in impls for d in dtypes]

    print(f"device: {torch.cuda.get_device_name(device) if gpu else 'cpu'} | torch {torch.__version__} "
          f"| threads {torch.get_num_threads()}")
    print(f"levels {shapes} (S={enc_q}), batch {args.batch}, heads {args.heads} x {args.channels} ch, "
          f"{args.points} points, repeats {repeats} (median)")

    rows = []
    reference = {}
    with tqdm(total=len(runs) * repeats * 2, desc="msda benchmark", unit="it") as bar:
        for case, impl, dname in runs:
            q = cases[case]
            bar.set_postfix_str(f"{case} {impl} {dname}")
            dtype = DTYPES[dname]
            value, spatial, starts, loc, attn = make_inputs(
                shapes, args.batch, q, args.heads, args.channels, args.points, dtype, device)

            def call(*a):
                if impl == "oracle":
                    return ms_deform_attn_pytorch(*a)
                return ms_deform_attn(*a, impl=impl)

            def fwd():
                with torch.no_grad():
                    return call(value, spatial, starts, loc, attn)

            leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
            grad = torch.randn(args.batch, q, args.heads * args.channels, device=device, dtype=dtype)

            def fwd_bwd():
                for t in leaves:
                    t.grad = None
                out = call(leaves[0], spatial, starts, leaves[1], leaves[2])
                out.backward(grad)

            out = fwd().float()
            if (impl, dname) == ("pytorch", "fp32"):
                reference[case] = out
            err = (out - reference[case]).abs().max().item() if case in reference else float("nan")
            t_f = measure(fwd, device, repeats, warmup, bar)
            t_fb = measure(fwd_bwd, device, repeats, warmup, bar)
            mem = peak_memory(fwd_bwd, device)
            rows.append(dict(case=case, q=q, impl=impl, dtype=dname, fwd=t_f, fwd_bwd=t_fb,
                             mem=mem / 2**20, err=err))
            del value, loc, attn, leaves, grad
            if gpu:
                torch.cuda.empty_cache()

    base = {(r["case"]): r for r in rows if (r["impl"], r["dtype"]) == ("pytorch", "fp32")}
    header = (f"{'case':<8} {'queries':>7} {'impl':<8} {'dtype':<5} {'fwd ms':>9} {'fwd+bwd ms':>11} "
              f"{'peak MiB':>9} {'fwd x':>6} {'f+b x':>6} {'max|d| vs pt32':>14}")
    print()
    print(header)
    print("-" * len(header))
    for r in rows:
        b = base.get(r["case"])
        rf = f"{b['fwd'] / r['fwd']:.2f}" if b else "-"
        rfb = f"{b['fwd_bwd'] / r['fwd_bwd']:.2f}" if b else "-"
        print(f"{r['case']:<8} {r['q']:>7} {r['impl']:<8} {r['dtype']:<5} {r['fwd']:>9.2f} "
              f"{r['fwd_bwd']:>11.2f} {r['mem']:>9.1f} {rf:>6} {rfb:>6} {r['err']:>14.2e}")
    print("\nx = speed-up vs the PyTorch fp32 path of the same case (higher is faster); peak MiB is for "
          "forward+backward.")
    return rows


if __name__ == "__main__":
    main()
