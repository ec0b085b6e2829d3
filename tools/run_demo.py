#!/usr/bin/env python
"""`make demo`: the whole detectron2 loop on CPU with the embedded synthetic dataset.

1. generates the synthetic shapes dataset (first run only, progress bar),
2. loads the SMCA-DETR checkpoint shipped in the package (``MODEL.WEIGHTS smca_detr://...``) and
   evaluates it with COCOEvaluator (AP table) + pictures of its detections,
3. fine-tunes it for a short schedule with detectron2's trainer (ETA logging),
4. evaluates again (AP table) + pictures,
5. prints a summary: AP before / after, training loss, wall time.

With a config whose ``MODEL.WEIGHTS`` is empty (e.g. ``configs/demo/detr_r18_synthetic.yaml``) step 2
is skipped: the model is trained from scratch, then evaluated.

Usage: python tools/run_demo.py [--config-file configs/demo/smca_r18_slim_finetune.yaml] [KEY VALUE ...]
"""
import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "demo", "smca_r18_slim_finetune.yaml")


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
    was_training = model.training
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
    model.train(was_training)  # the demo trains after drawing the loaded weights' detections
    return paths


def loss_trend(output_dir):
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.exists(path):
        return None
    rows = [json.loads(l) for l in open(path) if l.strip()]
    losses = [r["total_loss"] for r in rows if "total_loss" in r]
    return (losses[0], losses[-1]) if losses else None


def _ap(results):
    bbox = (results or {}).get("bbox", {})
    return {k: bbox.get(k, float("nan")) for k in ("AP", "AP50", "AP75")}


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    from detectron2.utils.logger import setup_logger

    from smca_detr.data import ensure_synthetic
    from smca_detr.data.synthetic import SPLITS
    from smca_detr.engine import Trainer, setup

    cfg = setup(argparse.Namespace(config_file=args.config_file, opts=args.opts, eval_only=False,
                                   resume=False, num_gpus=1))
    setup_logger(name="smca_detr")
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        if name in SPLITS:  # the embedded dataset is generated on first use; other datasets as registered
            ensure_synthetic(name)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)  # loads MODEL.WEIGHTS (the shipped checkpoint) if set
    before, pictures_before, t_eval0 = None, [], 0.0
    if cfg.MODEL.WEIGHTS:
        t = time.time()
        before = Trainer.test(cfg, trainer.model)
        t_eval0 = time.time() - t
        pictures_before = write_pictures(cfg, trainer.model, os.path.join(cfg.OUTPUT_DIR, "pictures_before"),
                                         args.num_pictures)
    t = time.time()
    trainer.train()  # detectron2's EvalHook evaluates cfg.DATASETS.TEST once training ends
    t_train = time.time() - t
    after = getattr(trainer, "_last_eval_results", None) or Trainer.test(cfg, trainer.model)
    pictures = write_pictures(cfg, trainer.model, os.path.join(cfg.OUTPUT_DIR, "pictures"), args.num_pictures)
    trend = loss_trend(cfg.OUTPUT_DIR)
    print("\n================ smca_detr demo summary ================")
    print(f"config          : {os.path.relpath(args.config_file, REPO)}")
    if before is not None:
        b = _ap(before)
        print(f"weights         : {cfg.MODEL.WEIGHTS}")
        print(f"val AP/AP50/AP75 of the loaded weights : {b['AP']:.2f} / {b['AP50']:.2f} / {b['AP75']:.2f}"
              f"  ({t_eval0:.0f} s, pictures in {os.path.join(cfg.OUTPUT_DIR, 'pictures_before')})")
    print(f"training        : {cfg.SOLVER.MAX_ITER} iterations, batch {cfg.SOLVER.IMS_PER_BATCH}, "
          f"{cfg.MODEL.DEVICE}, {t_train:.0f} s")
    if trend:
        print(f"total loss      : {trend[0]:.3f} (first logged) -> {trend[1]:.3f} (last logged)")
    a = _ap(after)
    print(f"val AP/AP50/AP75 after training       : {a['AP']:.2f} / {a['AP50']:.2f} / {a['AP75']:.2f}")
    print(f"pictures        : {len(pictures)} in {os.path.join(cfg.OUTPUT_DIR, 'pictures')}")
    print(f"wall time       : {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
