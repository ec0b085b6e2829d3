#!/usr/bin/env python
"""`make demo`: the whole detectron2 loop on CPU with the embedded synthetic dataset.

1. generates the synthetic shapes dataset (first run only, progress bar),
2. trains a detector with detectron2's trainer (short schedule, ETA logging),
3. evaluates it with COCOEvaluator (AP table),
4. writes pictures of detections on validation images next to the evaluation results,
5. prints a summary: AP, first/last training loss, wall time.

Usage: python tools/run_demo.py [--config-file configs/demo/detr_r18_synthetic.yaml] [KEY VALUE ...]
"""
import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "demo", "detr_r18_synthetic.yaml")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-file", default=DEFAULT_CONFIG)
    ap.add_argument("--num-pictures", type=int, default=6)
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return ap.parse_args(argv)


def write_pictures(cfg, model, out_dir, n, score_thresh=0.3):
    """Detections on the first ``n`` validation images, drawn with detectron2's Visualizer."""
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.detection_utils import read_image
    from detectron2.utils.visualizer import Visualizer

    from smca_detr.data import DetrDatasetMapper

    os.makedirs(out_dir, exist_ok=True)
    name = cfg.DATASETS.TEST[0]
    meta = MetadataCatalog.get(name)
    mapper = DetrDatasetMapper(cfg, is_train=False)
    model.eval()
    paths = []
    for d in DatasetCatalog.get(name)[:n]:
        with torch.no_grad():
            inst = model([mapper(d)])[0]["instances"].to("cpu")
        inst = inst[inst.scores > score_thresh]
        img = read_image(d["file_name"], format="RGB")
        vis = Visualizer(img, meta, scale=2.0).draw_instance_predictions(inst)
        path = os.path.join(out_dir, os.path.basename(d["file_name"]).rsplit(".", 1)[0] + ".jpg")
        vis.save(path)
        paths.append(path)
    return paths


def loss_trend(output_dir):
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.exists(path):
        return None
    rows = [json.loads(l) for l in open(path) if l.strip()]
    losses = [r["total_loss"] for r in rows if "total_loss" in r]
    return (losses[0], losses[-1]) if losses else None


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    from detectron2.utils.logger import setup_logger

    from smca_detr.data import ensure_synthetic
    from smca_detr.engine import Trainer, setup

    cfg = setup(argparse.Namespace(config_file=args.config_file, opts=args.opts, eval_only=False,
                                   resume=False, num_gpus=1))
    setup_logger(name="smca_detr")
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        ensure_synthetic(name)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()  # detectron2's EvalHook evaluates cfg.DATASETS.TEST once training ends
    results = getattr(trainer, "_last_eval_results", None) or Trainer.test(cfg, trainer.model)
    pictures = write_pictures(cfg, trainer.model, os.path.join(cfg.OUTPUT_DIR, "pictures"), args.num_pictures)
    bbox = (results or {}).get("bbox", {})
    trend = loss_trend(cfg.OUTPUT_DIR)
    print("\n================ smca_detr demo summary ================")
    print(f"config          : {os.path.relpath(args.config_file, REPO)}")
    print(f"training        : {cfg.SOLVER.MAX_ITER} iterations, batch {cfg.SOLVER.IMS_PER_BATCH}, CPU")
    if trend:
        print(f"total loss      : {trend[0]:.3f} (first logged) -> {trend[1]:.3f} (last logged)")
    if bbox:
        print(f"val AP / AP50   : {bbox.get('AP', float('nan')):.2f} / {bbox.get('AP50', float('nan')):.2f}")
    print(f"pictures        : {len(pictures)} in {os.path.join(cfg.OUTPUT_DIR, 'pictures')}")
    print(f"wall time       : {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
