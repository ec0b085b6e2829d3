#!/usr/bin/env python
"""Export a smca_detr model to ONNX (and optionally check it against PyTorch).

    python tools/export_onnx.py --config-file configs/smca_r50.yaml --output smca_r50.onnx \\
        MODEL.WEIGHTS SMCA-R50.pth

Every shipped config exports (DETR, SMCA single-scale / multi-scale / conv multi-scale,
Conditional DETR, Deformable DETR plain / refine / two-stage; DCN backbones excepted, with an error
saying why). The graph (opset 17, standard operators only) takes ``images`` ``[B,3,H,W]`` float32:
raw 0..255 pixels in the config's ``INPUT.FORMAT`` channel order, already resized by the test resize;
batch, height and width are dynamic. Outputs ``boxes`` ``[B,K,4]`` (xyxy in input pixels),
``scores`` ``[B,K]``, ``labels`` ``[B,K]``. Run it with ``smca_detr.export.OnnxPredictor`` or
``tools/demo.py --onnx``.

``--check``: run PyTorch and ONNX Runtime on two random images of other sizes than the traced one
and print the largest differences. ``--evaluate``: evaluate both on the config's test dataset with
COCOEvaluator and print both APs (the embedded ``smca_synthetic_*`` datasets are generated first).
``--benchmark N``: inference time of ONNX Runtime and of the PyTorch model (``model([input])``, its
fastest CPU path) on one ``--size`` image, alternating for N rounds (ABBA order, one process, same
thread count), and the per-round ratio ORT / PyTorch (median, min, max). Weights do not matter for
speed: pass ``MODEL.WEIGHTS ""`` for a config whose weights are only the ImageNet backbone.
"""
import argparse
import os
import sys
import tempfile
import time


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-file", required=True, help="a config file or a model-zoo config name")
    ap.add_argument("--output", required=True, help="the .onnx file to write")
    ap.add_argument("--check", action="store_true", help="compare ONNX Runtime with PyTorch at two image sizes")
    ap.add_argument("--evaluate", action="store_true",
                    help="COCO AP of PyTorch and ONNX Runtime on cfg.DATASETS.TEST")
    ap.add_argument("--benchmark", type=int, default=0, metavar="ROUNDS",
                    help="time ONNX Runtime against the PyTorch model (CPU, batch 1) for ROUNDS alternating rounds")
    ap.add_argument("--size", type=int, nargs=2, default=(640, 800), metavar=("H", "W"),
                    help="network input size of --benchmark (default 640 800)")
    ap.add_argument("--threads", type=int, default=0,
                    help="with --benchmark: intra-op threads of both (default: PyTorch's current number)")
    ap.add_argument("--profile", default="", help="with --benchmark: write ONNX Runtime's profile (JSON) here")
    ap.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    return ap.parse_args(argv)


def check(model, predictor, sizes=((203, 317), (331, 190)), seed=0):
    """Largest |ORT - PyTorch| differences of boxes (relative to the image size) and scores."""
    import numpy as np
    import torch

    from smca_detr.export import OnnxDetector

    g = torch.Generator().manual_seed(seed)
    worst = {"boxes/size": 0.0, "scores": 0.0, "labels differ": 0}
    for h, w in sizes:
        x = torch.rand((1, 3, h, w), generator=g) * 255
        with torch.no_grad():
            ref = [t.numpy() for t in OnnxDetector(model)(x)]
        got = predictor.session.run(None, {"images": x.numpy()})
        scale = np.array([w, h, w, h], dtype=np.float64)
        worst["boxes/size"] = max(worst["boxes/size"], float(np.abs((got[0] - ref[0]) / scale).max()))
        worst["scores"] = max(worst["scores"], float(np.abs(got[1] - ref[1]).max()))
        worst["labels differ"] += int((got[2] != ref[2]).sum())
    return worst


def evaluate(cfg, model, predictor):
    from detectron2.evaluation import inference_on_dataset

    from smca_detr.data.synthetic import SPLITS, ensure_synthetic
    from smca_detr.engine import Trainer
    from smca_detr.export import OnnxRuntimeModel

    aps = {}
    for dataset in cfg.DATASETS.TEST:
        if dataset in SPLITS:
            ensure_synthetic(dataset)
        for name, m in (("pytorch", model), ("onnxruntime", OnnxRuntimeModel(predictor))):
            loader = Trainer.build_test_loader(cfg, dataset)
            t = time.time()
            with tempfile.TemporaryDirectory() as tmp:
                res = inference_on_dataset(m, loader, Trainer.build_evaluator(cfg, dataset, tmp))
            aps[(dataset, name)] = (res["bbox"]["AP"], res["bbox"]["AP50"], time.time() - t)
    return aps


def benchmark(model, path, size, rounds, profile="", threads=0):
    """``{"pytorch": [s], "onnxruntime": [s]}`` per round and the ratio summary."""
    import torch

    from smca_detr.export import OnnxPredictor
    from bench_common import ratio_summary, synthetic_inputs, time_alternately  # tools/ (the script's folder)

    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    predictor = OnnxPredictor(path, threads=threads, profile=profile)
    inputs = synthetic_inputs(1, size[0], size[1])
    x = inputs[0]["image"][None].numpy()

    def pytorch():
        with torch.no_grad():
            model(inputs)

    cases = {"inference": {"pytorch": pytorch, "onnxruntime": lambda: predictor.run(x)}}
    for fn in cases["inference"].values():  # warm-up
        fn()
    times = time_alternately(cases, rounds)["inference"]
    if profile:
        print(f"ONNX Runtime profile: {predictor.session.end_profiling()}")
    return times, ratio_summary(times["onnxruntime"], times["pytorch"]), threads


def main(argv=None):
    args = parse_args(argv)
    from detectron2.modeling import build_model

    import smca_detr  # noqa: F401  (registers everything)
    from smca_detr.export import ExportError, OnnxPredictor, export_onnx
    from smca_detr.model_zoo import inference_config, load_weights

    cfg = inference_config(args.config_file, ["MODEL.DEVICE", "cpu"] + list(args.opts))
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        load_weights(model, cfg.MODEL.WEIGHTS, cfg)
    model.eval()
    t = time.time()
    try:
        export_onnx(model, args.output, cfg)
    except ExportError as e:
        print(f"error: cannot export {args.config_file}: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} ({os.path.getsize(args.output) / 2 ** 20:.1f} MiB) in {time.time() - t:.1f} s")
    if args.benchmark:
        times, ratio, threads = benchmark(model, args.output, args.size, args.benchmark, args.profile,
                                           args.threads)
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        print(f"{args.config_file} at {args.size[0]}x{args.size[1]}, CPU, {threads} threads, {args.benchmark} rounds: "
              f"PyTorch {med['pytorch']:.3f} s, ONNX Runtime {med['onnxruntime']:.3f} s (medians); "
              f"ORT / PyTorch = {ratio['median']:.2f} (min {ratio['min']:.2f}, max {ratio['max']:.2f})")
    if args.check or args.evaluate:
        predictor = OnnxPredictor(args.output, cfg)
        if args.check:
            print("ONNX Runtime vs PyTorch, largest differences:", check(model, predictor))
        if args.evaluate:
            for (dataset, name), (ap, ap50, sec) in evaluate(cfg, model, predictor).items():
                print(f"{dataset} {name:12s} AP {ap:.3f}  AP50 {ap50:.3f}  ({sec:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
