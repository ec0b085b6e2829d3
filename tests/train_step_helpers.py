"""Shared set-up of the CPU tests that build tiny models and train them a step.

* ``TINY_R18_OPTS``: the tiny ResNet-18 (res5 only) + 32-wide DETR at 64x64 of test_engine.py and
  the tests below (each adds its own decoder depth, queries, training set and schedule).
* ``load_cfg`` / ``tiny_batch``: a shipped config file on CPU without weights, and a two-image
  training batch, for the per-family tests (test_conditional.py, test_deformable.py).
* ``TINY`` / ``FAMILIES`` / ``make_cfg`` / ``build`` / ``_batch``: that tiny model in every model
  family, seeded, and its inputs; ``synthetic_root``: the tiny synthetic training split under a
  private root; ``captured``: log records; ``_png``: a random image file;
  ``_assert_same_detections``: two detection lists agree. Used by the tests of dataset validation,
  checkpoint loading, mixed precision, padding, determinism, resume and the 2-process equivalence.
"""
import contextlib
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.config import get_cfg
from detectron2.structures import Boxes, Instances
from detectron2.utils.env import seed_all_rng

from smca_detr.config import add_smca_detr_config
from smca_detr.engine import Trainer

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


# the shared tiny R18 DETR, 2 decoder layers, 3 iterations at a constant LR, no periodic checkpoint
TINY = TINY_R18_OPTS + ["MODEL.SMCA_DETR.DEC_LAYERS", "2", "MODEL.SMCA_DETR.NUM_QUERIES", "6", "DATASETS.TRAIN", "()",
                        "SOLVER.MAX_ITER", "3", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "0",
                        "SOLVER.CHECKPOINT_PERIOD", "100000"]
FOCAL = ["MODEL.SMCA_DETR.CLASS_LOSS", "focal"]
MS2 = ["MODEL.RESNETS.OUT_FEATURES", "['res4','res5']", "MODEL.SMCA_DETR.IN_FEATURES", "['res4','res5']"]
MS3 = ["MODEL.RESNETS.OUT_FEATURES", "['res3','res4','res5']", "MODEL.SMCA_DETR.IN_FEATURES", "['res3','res4','res5']"]
DEFORMABLE = FOCAL + MS3 + ["MODEL.SMCA_DETR.HIDDEN_DIM", "64",  # GroupNorm(32, d) needs >1 value per group
                            "MODEL.SMCA_DETR.DEFORMABLE.NUM_FEATURE_LEVELS", "4",
                            "MODEL.SMCA_DETR.DEFORMABLE.ENC_N_POINTS", "2",
                            "MODEL.SMCA_DETR.DEFORMABLE.DEC_N_POINTS", "2",
                            "MODEL.SMCA_DETR.DEFORMABLE.MSDA_IMPL", "pytorch"]
# Every model family with the variant keys it needs (see configs/*.yaml), at tiny sizes.
FAMILIES = {
    "DETRTransformer": [],
    "SMCATransformer": FOCAL,
    "SMCAMultiScaleTransformer": FOCAL + MS2 + ["MODEL.SMCA_DETR.SMCA.ENCODER_LAYOUT", "['multi']"],
    "SMCAConvMultiScaleTransformer": FOCAL + MS3,
    "ConditionalTransformer": FOCAL,
    "DeformableTransformer": DEFORMABLE,
    "DeformableTransformer/two_stage": DEFORMABLE + [
        "MODEL.SMCA_DETR.DEFORMABLE.WITH_BOX_REFINE", "True", "MODEL.SMCA_DETR.DEFORMABLE.TWO_STAGE", "True"],
}


def make_cfg(extra=(), family="DETRTransformer", output_dir=""):
    cfg = get_cfg()
    add_smca_detr_config(cfg)
    cfg.merge_from_list(TINY + ["MODEL.SMCA_DETR.TRANSFORMER", family.split("/")[0]] + FAMILIES[family]
                        + ["OUTPUT_DIR", str(output_dir)] + list(extra))
    return cfg


def build(cfg, seed=0):
    seed_all_rng(seed)
    return Trainer.build_model(cfg)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@contextlib.contextmanager
def captured(*names, level=logging.WARNING):
    """Log records of the named loggers (handlers attached to them directly: detectron2's
    setup_logger turns propagation off for "detectron2" / "fvcore")."""
    handler = _Records()
    loggers = [logging.getLogger(n) for n in names]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    try:
        yield handler.records
    finally:
        for lg, lv in zip(loggers, old):
            lg.removeHandler(handler)
            lg.setLevel(lv)
    handler.records[:] = [r for r in handler.records if r.levelno >= level]


def _png(path, hw=(64, 64), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, size=(*hw, 3), dtype=np.uint8)
    img[10:40, 12:44] = (220, 40, 40)
    Image.fromarray(img).convert(mode).save(path)
    return str(path)


def _batch(sizes, boxes_per_image, seed=0):
    """Model inputs: random uint8 images of ``sizes`` with ``boxes_per_image`` gt boxes each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for (h, w), n in zip(sizes, boxes_per_image):
        inst = Instances((h, w))
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5])
        wh = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.4, h * 0.4]) + 4
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
        inst.gt_classes = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        out.append({"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8),
                    "height": h, "width": w, "instances": inst})
    return out


def _autocast_on():
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # older torch
        return torch.is_autocast_cpu_enabled()


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    """The embedded tiny synthetic splits under a private root (registrations restored after)."""
    from smca_detr.data import synthetic

    prev_override, prev_root = synthetic._root_override, synthetic.get_root()
    root = str(tmp_path_factory.mktemp("synthetic"))
    synthetic.set_root(root)
    synthetic.generate_split("smca_synthetic_tiny_train", root, progress=False)
    yield root
    synthetic._root_override = prev_override
    synthetic.register_synthetic_datasets(prev_root)


def _assert_same_detections(a, b, atol=1e-4):
    """Same multiset of (class, box, score) rows per image (the order of near-equal scores may
    differ): every row of ``a`` has a partner of the same class within ``atol`` in ``b``."""
    assert sorted(a) == sorted(b)
    for img in a:
        ra, rb = np.asarray(a[img], dtype=np.float64), np.asarray(b[img], dtype=np.float64)
        assert ra.shape == rb.shape, img
        used = set()
        for row in ra:
            cands = [j for j in range(len(rb)) if j not in used and rb[j, 0] == row[0]
                     and np.abs(rb[j, 1:] - row[1:]).max() <= atol]
            assert cands, (img, row)
            used.add(cands[0])
