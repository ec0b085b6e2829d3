#!/usr/bin/env python
"""Train / evaluate smca_detr models (DETR, SMCA-DETR, Conditional DETR, Deformable DETR).

    python train_net.py --config-file configs/X.yaml --num-gpus 8
    python train_net.py --config-file configs/X.yaml --eval-only MODEL.WEIGHTS out/model_final.pth
    python train_net.py --config-file configs/X.yaml --resume            # continue OUTPUT_DIR's last checkpoint
    python train_net.py --config-file configs/X.yaml --num-gpus 1 MODEL.DEVICE cpu   # CPU (fp32 or
                                                     # SOLVER.AMP.ENABLED True SOLVER.AMP.PRECISION bfloat16)
"""
from detectron2.engine import default_argument_parser
from detectron2.evaluation import verify_results
from detectron2.utils import comm

import smca_detr  # noqa: F401  (registers the meta-architecture, transformers and datasets)
from smca_detr.checkpoint import SmcaDetrCheckpointer
from smca_detr.engine import Trainer, launch, setup
from smca_detr.engine.preflight import check_or_exit
from smca_detr.engine.report import eval_only_report

__all__ = ["main", "cli", "setup"]


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        SmcaDetrCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        eval_only_report(cfg, model)  # speed / memory / params / GFLOPs summary + benchmark_report.json
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli(argv=None):
    args = default_argument_parser().parse_args(argv)
    print("Command Line Args:", args)
    check_or_exit(args)  # no CUDA GPU / no dataset files: one line each and exit 2, not a traceback
    return launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    cli()
