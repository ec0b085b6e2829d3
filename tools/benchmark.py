#!/usr/bin/env python
"""Training and inference speed / memory of a smca_detr config, with and without AMP.

    python tools/benchmark.py --config-file configs/smca_r50.yaml [--iters 20] [--warmup 3] \\
        [--num-batches 4] [--eval-images 20] [--precisions fp32,bf16] [--json out.json] --opts KEY VALUE ...

Everything is built with the project's own builders: ``setup`` (config + ``--opts``),
``Trainer.build_model`` / ``build_optimizer`` / ``build_train_loader`` / ``build_test_loader`` and the
training step of the real trainer (``TrainLoop``: autocast, GradScaler for fp16, full-model
clipping). ``--num-batches`` training batches are loaded once and then cycled, so data loading is not
measured.

* train: seconds per iteration (mean after ``--warmup`` iterations) and peak memory (CUDA: max
  allocated; CPU: peak RSS growth, see ``smca_detr.engine.report.PeakMemory``) for each precision:
  fp32, bf16 (CPU and GPU) and fp16 (GPU only, with a GradScaler);
* eval: images per second (batch 1, ``model.eval()``, under the same autocast) on ``--eval-images``
  test images (``DATASETS.TEST[0]``; the training images when there is no test set).

Runs on CPU when CUDA is not available. Prints one table (and writes it as JSON with ``--json``).
"""
import argparse
import itertools
import json
import logging
import os
import statistics
import sys
import time

logger = logging.getLogger("smca_detr.benchmark")

PRECISIONS = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-file", required=True, help="a config file or a model-zoo config name")
    ap.add_argument("--iters", type=int, default=20, help="timed training iterations per precision")
    ap.add_argument("--warmup", type=int, default=3, help="untimed iterations / images before timing")
    ap.add_argument("--num-batches", type=int, default=4, help="training batches loaded once and cycled")
    ap.add_argument("--eval-images", type=int, default=20, help="timed inference images per precision")
    ap.add_argument("--precisions", default="auto",
                    help="comma-separated fp32,bf16,fp16 (auto: fp32,bf16 on CPU; fp32,fp16,bf16 on GPU)")
    ap.add_argument("--no-train", action="store_true", help="only the inference benchmark")
    ap.add_argument("--no-eval", action="store_true", help="only the training benchmark")
    ap.add_argument("--json", default="", help="also write the results to this JSON file")
    ap.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    return ap.parse_args(argv)


def build_cfg(args):
    import torch

    from smca_detr import model_zoo
    from smca_detr.engine import setup

    opts = list(args.opts or [])
    if not torch.cuda.is_available():
        opts += ["MODEL.DEVICE", "cpu"]
    ns = argparse.Namespace(config_file=model_zoo.get_config_file(args.config_file), opts=opts, eval_only=False,
                            resume=False, num_gpus=1)
    return setup(ns)


def resolve_precisions(spec: str, device_type: str):
    if spec == "auto":
        names = ["fp32", "fp16", "bf16"] if device_type == "cuda" else ["fp32", "bf16"]
    else:
        names = [s.strip() for s in spec.split(",") if s.strip()]
    for n in names:
        if n not in PRECISIONS:
            raise SystemExit(f"--precisions: unknown {n!r} (choose from {sorted(PRECISIONS)})")
        if n == "fp16" and device_type != "cuda":
            raise SystemExit("--precisions fp16 needs a CUDA device (use bf16 on CPU)")
    return names


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device, precision):
    import contextlib

    import torch

    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def cache_batches(loader, n):
    """The first ``n`` batches of ``loader`` (its workers stop afterwards)."""
    it = iter(loader)
    batches = list(itertools.islice(it, n))
    del it
    return batches


def bench_train(cfg, model, optimizer, batches, precision, iters, warmup):
    """(seconds per iteration, peak memory MB, memory method, last loss) of the real training step."""
    import torch
    from detectron2.utils.events import EventStorage
    from tqdm import tqdm

    from smca_detr.engine import TrainLoop
    from smca_detr.engine.report import PeakMemory

    device = next(model.parameters()).device
    dtype = PRECISIONS[precision]
    loop = TrainLoop(model, itertools.cycle(batches), optimizer,
                     precision=getattr(torch, dtype) if dtype else None)
    model.train()
    times = []
    with EventStorage(0) as storage:
        for i in tqdm(range(warmup), desc=f"train {precision} warm-up", leave=False, dynamic_ncols=True):
            storage.iter = loop.iter = i
            loop.run_step()
        _sync(device)
        with PeakMemory(device) as mem:
            for i in tqdm(range(iters), desc=f"train {precision}", leave=False, dynamic_ncols=True):
                storage.iter = loop.iter = warmup + i
                _sync(device)
                t0 = time.perf_counter()
                loop.run_step()
                _sync(device)
                times.append(time.perf_counter() - t0)
        loss = storage.history("total_loss").latest() if "total_loss" in storage.histories() else float("nan")
    return statistics.fmean(times), mem.peak_bytes / 2 ** 20, mem.method, loss


def bench_eval(model, inputs, precision, warmup):
    """(ms per image, images per second, peak memory MB) of batch-1 inference."""
    import torch
    from tqdm import tqdm

    from smca_detr.engine.report import PeakMemory

    device = next(model.parameters()).device
    model.eval()
    times = []
    with torch.no_grad(), _autocast(device, precision):
        for x in tqdm(inputs[:warmup], desc=f"eval {precision} warm-up", leave=False, dynamic_ncols=True):
            model([x])
        _sync(device)
        with PeakMemory(device) as mem:
            for x in tqdm(inputs[warmup:], desc=f"eval {precision}", leave=False, dynamic_ncols=True):
                _sync(device)
                t0 = time.perf_counter()
                model([x])
                _sync(device)
                times.append(time.perf_counter() - t0)
    ms = 1e3 * statistics.fmean(times)
    return ms, 1e3 / ms, mem.peak_bytes / 2 ** 20


def eval_inputs(cfg, train_batches, n):
    """``n`` inference inputs: test images, or the cached training images without annotations."""
    from smca_detr.engine import Trainer

    if len(cfg.DATASETS.TEST):
        loader = Trainer.build_test_loader(cfg, cfg.DATASETS.TEST[0])
        return [b[0] for b in cache_batches(loader, n)]
    images = [{k: v for k, v in x.items() if k != "instances"} for b in train_batches for x in b]
    return list(itertools.islice(itertools.cycle(images), n)) if images else []


def run(args):
    import copy

    import torch
    from tabulate import tabulate

    from smca_detr.engine import Trainer
    from smca_detr.engine.report import count_parameters

    cfg = build_cfg(args)
    device = torch.device(cfg.MODEL.DEVICE)
    precisions = resolve_precisions(args.precisions, device.type)
    model = Trainer.build_model(cfg)
    init_state = copy.deepcopy(model.state_dict())
    results = {"config": args.config_file, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
               else "cpu", "threads": torch.get_num_threads(), "params": count_parameters(model),
               "batch_size": cfg.SOLVER.IMS_PER_BATCH, "rows": []}
    batches = []
    if not args.no_train or not len(cfg.DATASETS.TEST):
        batches = cache_batches(Trainer.build_train_loader(cfg), max(1, args.num_batches))
    inputs = [] if args.no_eval else eval_inputs(cfg, batches, args.warmup + max(1, args.eval_images))

    for precision in precisions:
        row = {"precision": precision}
        if not args.no_train:
            model.load_state_dict(init_state)  # every precision starts from the same weights
            optimizer = Trainer.build_optimizer(cfg, model)
            s_iter, mem, method, loss = bench_train(cfg, model, optimizer, batches, precision,
                                                    max(1, args.iters), args.warmup)
            row.update(train_s_per_iter=s_iter, train_peak_memory_mb=mem, memory_method=method,
                       train_last_loss=float(loss))
            del optimizer
        if not args.no_eval and inputs:
            ms, fps, mem = bench_eval(model, inputs, precision, min(args.warmup, len(inputs) - 1))
            row.update(eval_ms_per_image=ms, eval_images_per_s=fps, eval_peak_memory_mb=mem)
        results["rows"].append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    mem_unit = "MB" if device.type == "cuda" else "MB RSS+"
    table = [[r["precision"],
              f"{r['train_s_per_iter']:.3f}" if "train_s_per_iter" in r else "-",
              f"{r['train_peak_memory_mb']:.0f}" if "train_peak_memory_mb" in r else "-",
              f"{r['eval_ms_per_image']:.1f}" if "eval_ms_per_image" in r else "-",
              f"{r['eval_images_per_s']:.2f}" if "eval_images_per_s" in r else "-",
              f"{r['eval_peak_memory_mb']:.0f}" if "eval_peak_memory_mb" in r else "-"]
             for r in results["rows"]]
    headers = ["precision", "train s/iter", f"train peak ({mem_unit})", "eval ms/img", "eval img/s",
               f"eval peak ({mem_unit})"]
    text = tabulate(table, headers=headers, tablefmt="pipe")
    print(f"\n{args.config_file} on {results['device']} ({results['threads']} threads), "
          f"{results['params'] / 1e6:.2f} M parameters, training batch {results['batch_size']} "
          f"({len(batches)} cached batches):\n{text}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


def main(argv=None):
    args = parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
