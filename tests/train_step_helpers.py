"""Shared set-up of the CPU tests that build tiny models and train them a step.

* ``TINY_R18_OPTS``: the tiny ResNet-18 (res5 only) + 32-wide DETR at 64x64 of test_engine.py and
  test_reliability.py (each adds its own decoder depth, queries, training set and schedule).
* ``load_cfg`` / ``tiny_batch``: a shipped config file on CPU without weights, and a two-image
  training batch, for the per-family tests (test_conditional.py, test_deformable.py).
"""
import torch

from detectron2.config import get_cfg
from detectron2.structures import Boxes, Instances

from smca_detr.config import add_smca_detr_config

NUM_CLASSES = 3

TINY_R18_OPTS = [
    "MODEL.DEVICE", "cpu",
    "MODEL.WEIGHTS", "",
    "MODEL.RESNETS.DEPTH", "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.RESNETS.OUT_FEATURES", "['res5']",
    "MODEL.SMCA_DETR.HIDDEN_DIM", "32",
    "MODEL.SMCA_DETR.NHEADS", "4",
    "MODEL.SMCA_DETR.ENC_LAYERS", "1",
    "MODEL.SMCA_DETR.DIM_FEEDFORWARD", "64",
    "MODEL.SMCA_DETR.NUM_CLASSES", str(NUM_CLASSES),
    "MODEL.SMCA_DETR.DROPOUT", "0.0",
    "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "64",
    "INPUT.RANDOM_FLIP", "none",
    "INPUT.DETR.CROP_ENABLED", "False",
    "DATASETS.TEST", "()",
    "DATALOADER.NUM_WORKERS", "0",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.BASE_LR", "1e-3",
    "TEST.EVAL_PERIOD", "0",
    "SEED", "0",
]


def load_cfg(path, opts=()):
    """The config file ``path`` with ``opts``, on CPU, without a weights file."""
    cfg = add_smca_detr_config(get_cfg())
    cfg.merge_from_file(str(path))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def tiny_batch(sizes=((96, 128), (80, 112)), seed=0, n=3):
    """Random images of ``sizes`` with ``n`` random boxes (at least 4 px) of the 80 COCO classes each."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for h, w in sizes:
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3]) + 4
        instances = Instances((h, w), gt_boxes=Boxes(torch.cat([xy, xy + wh], 1)),
                              gt_classes=torch.randint(0, 80, (n,), generator=g))
        batch.append({"image": torch.rand(3, h, w, generator=g) * 255, "height": h, "width": w,
                      "instances": instances})
    return batch
