#!/usr/bin/env python
"""Picture of what one object query's cross-attention looks at, as the papers show it.

    python tools/visualize_attention.py --config-file configs/smca_r50.yaml --input img.jpg \\
        --query auto --output attention.png [--layer -1] [--panel-width 256] --opts MODEL.WEIGHTS w.pth

* SMCA-DETR: the Gaussian spatial prior and the modulated co-attention of every head;
* Conditional DETR: spatial, content and combined cross-attention maps of every head;
* Deformable DETR: sampling points coloured by attention weight, per feature level.

Everything is overlaid on the image with the query's predicted box. ``--query auto`` takes the
best-scoring query; ``--layer`` the decoder layer (negative: from the last). The PNG is a grid of
panels ``--panel-width`` pixels wide (height from the image's aspect ratio). Runs on CPU when CUDA
is not available.
"""
import argparse
import sys


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-file", required=True, help="a config file or a model-zoo config name")
    ap.add_argument("--input", required=True, help="one image")
    ap.add_argument("--query", default="auto", help="query index or 'auto' (best-scoring query)")
    ap.add_argument("--layer", type=int, default=-1, help="decoder layer (negative: from the last)")
    ap.add_argument("--output", required=True, help="output PNG")
    ap.add_argument("--panel-width", type=int, default=256, help="width of one panel in pixels")
    ap.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    args = ap.parse_args(argv)
    if args.query != "auto":
        try:
            args.query = int(args.query)
        except ValueError:
            ap.error(f"--query must be an integer or 'auto', got {args.query!r}")
    return args


def run(args):
    import smca_detr  # noqa: F401
    from smca_detr.model_zoo import Predictor, inference_config
    from smca_detr.utils.images import read_image  # errors name the file
    from smca_detr.utils.visualize import attention_maps, render_attention

    image = read_image(args.input, format="RGB")  # before building the model: a bad file fails fast
    cfg = inference_config(args.config_file, args.opts)
    predictor = Predictor(cfg)
    maps = attention_maps(predictor.model, predictor.inputs(image, "RGB"), args.query, args.layer)
    names = predictor.metadata.get("thing_classes", None) if predictor.metadata is not None else None
    picture = render_attention(image, maps, args.output, panel_width=args.panel_width, class_names=names)
    return maps, picture


def main(argv=None):
    from detectron2.utils.logger import setup_logger

    args = parse_args(argv)
    setup_logger(name="smca_detr")
    setup_logger(name="fvcore")
    maps, picture = run(args)
    print(f"{maps.transformer}: query {maps.query} (score {maps.score:.3f}, class {maps.label}), layer {maps.layer} "
          f"-> {args.output} ({picture.shape[1]}x{picture.shape[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
