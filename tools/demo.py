#!/usr/bin/env python
"""Run a smca_detr model on images and write pictures of its detections.

    python tools/demo.py --config-file configs/smca_r50.yaml --input img.jpg photos/ "shots/*.png" \\
        --output out/ [--confidence-threshold 0.5] --opts MODEL.WEIGHTS SMCA-R50.pth MODEL.DEVICE cpu

    python tools/demo.py --onnx smca_r50.onnx --input img.jpg --output out/   # ONNX Runtime

``--input``: image files, directories (their images, sorted) and glob patterns. One picture per image
is written to ``--output`` (a directory; a file name is also accepted for a single image), drawn
with detectron2's ``Visualizer`` and the class names of the config's dataset. ``MODEL.WEIGHTS`` may
be our checkpoint or an official SMCA / Conditional / Deformable DETR one (path or URL; converted
on load). Runs on CPU when CUDA is not available. ``--onnx``: run a model exported by
``tools/export_onnx.py`` in ONNX Runtime instead (same test resize, post-processing and pictures;
``--config-file`` is then optional: the file carries the test resize and class names).
"""
import argparse
import glob
import logging
import os
import sys

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

logger = logging.getLogger("smca_detr.demo")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-file", help="a config file or a model-zoo config name (required without --onnx)")
    ap.add_argument("--onnx", help="an .onnx file from tools/export_onnx.py: run it in ONNX Runtime")
    ap.add_argument("--input", nargs="+", required=True, help="image files, directories or glob patterns")
    ap.add_argument("--output", required=True, help="output directory (or file for a single image)")
    ap.add_argument("--confidence-threshold", type=float, default=0.5, help="minimum score drawn")
    ap.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    ap.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    args = ap.parse_args(argv)
    if not args.config_file and not args.onnx:
        ap.error("--config-file is required (unless --onnx is given)")
    return args


def expand_inputs(items):
    """Image paths from files, directories and glob patterns (order kept, duplicates dropped)."""
    paths = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.isfile(item):
            found = [item]
        else:
            found = sorted(p for p in glob.glob(os.path.expanduser(item), recursive=True)
                           if os.path.isfile(p) and p.lower().endswith(IMAGE_EXTENSIONS))
        if not found:
            raise FileNotFoundError(f"--input {item!r}: no image found")
        paths.extend(found)
    seen, unique = set(), []
    for p in paths:
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def output_paths(inputs, output):
    """One output file per input: ``output`` itself for a single input with an image extension,
    otherwise ``output/<name>`` (``<name>_<i>`` when two inputs share a name)."""
    if len(inputs) == 1 and output.lower().endswith(IMAGE_EXTENSIONS) and not os.path.isdir(output):
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        return [output]
    os.makedirs(output, exist_ok=True)
    used, outs = {}, []
    for p in inputs:
        stem, ext = os.path.splitext(os.path.basename(p))
        n = used.get(stem, 0)
        used[stem] = n + 1
        name = stem if n == 0 else f"{stem}_{n}"
        outs.append(os.path.join(output, name + (ext.lower() if ext.lower() in (".jpg", ".jpeg", ".png") else ".png")))
    return outs


def run(args):
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    import smca_detr  # noqa: F401  (registers everything)
    from smca_detr.model_zoo import Predictor, inference_config
    from smca_detr.utils.images import read_image  # errors name the file
    from smca_detr.utils.visualize import draw_instances

    inputs = expand_inputs(args.input)
    outputs = output_paths(inputs, args.output)
    cfg = inference_config(args.config_file, args.opts) if args.config_file else None
    if args.onnx:
        from smca_detr.export import OnnxPredictor

        predictor = OnnxPredictor(args.onnx, cfg)
    else:
        predictor = Predictor(cfg)
    bs = max(1, args.batch_size)
    counts = []
    with tqdm(total=len(inputs), desc="demo", unit="img", disable=len(inputs) < 2) as bar:
        for start in range(0, len(inputs), bs):
            chunk = list(range(start, min(start + bs, len(inputs))))
            images = [read_image(inputs[i], format="RGB") for i in chunk]
            results = predictor.predict_batch(images, input_format="RGB")
            for i, image, inst in zip(chunk, images, results):
                picture = draw_instances(image, inst, predictor.metadata, args.confidence_threshold)
                Image.fromarray(np.ascontiguousarray(picture)).save(outputs[i])
                kept = int((inst.scores >= args.confidence_threshold).sum()) if inst.has("scores") else len(inst)
                counts.append(kept)
                if len(inputs) == 1:
                    logger.info(f"{inputs[i]}: {kept} detections >= {args.confidence_threshold} -> {outputs[i]}")
                else:
                    bar.set_postfix_str(f"{os.path.basename(inputs[i])}: {kept} det.")
            bar.update(len(chunk))
    return outputs, counts


def main(argv=None):
    from detectron2.utils.logger import setup_logger

    args = parse_args(argv)
    setup_logger(name="smca_detr")
    setup_logger(name="fvcore")
    outputs, counts = run(args)
    print(f"wrote {len(outputs)} picture(s), {sum(counts)} detections >= {args.confidence_threshold}, "
          f"to {os.path.dirname(os.path.abspath(outputs[0])) if outputs else args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
