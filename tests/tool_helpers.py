"""Shared pieces of the tool tests (``test_visualize.py``, ``test_eval_report.py``,
``test_benchmark_tools.py``, ``test_official_weights.py``, ``test_configs.py``): tiny config
overrides for any shipped config, a 2 + 2 image dataset, a random test picture, and loading a
``tools/`` script as a module (with ``tools/`` on ``sys.path``, as when the script runs)."""
import copy
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

REPO = Path(__file__).resolve().parents[1]
TRAIN, VAL = "smca_tools_test_train", "smca_tools_test_val"

# tiny widths on top of any shipped config (depth, levels, variant and recipe stay the file's)
TINY = [
    "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "16", "MODEL.RESNETS.WIDTH_PER_GROUP", "4",
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "8",
    "MODEL.SMCA_DETR.HIDDEN_DIM", "32", "MODEL.SMCA_DETR.NHEADS", "4", "MODEL.SMCA_DETR.DIM_FEEDFORWARD", "64",
    "MODEL.SMCA_DETR.ENC_LAYERS", "1", "MODEL.SMCA_DETR.DEC_LAYERS", "2", "MODEL.SMCA_DETR.NUM_QUERIES", "10",
    "MODEL.SMCA_DETR.DEFORMABLE.MSDA_IMPL", "pytorch",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96",
]
DATA = [
    "DATASETS.TRAIN", f"('{TRAIN}',)", "DATASETS.TEST", f"('{VAL}',)", "MODEL.SMCA_DETR.NUM_CLASSES", "2",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.DETR.CROP_ENABLED", "False",
    "INPUT.RANDOM_FLIP", "none", "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2",
]


def _image(h=72, w=100, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 80, size=(h, w, 3), dtype=np.uint8)
    img[h // 4: h // 2, w // 5: w // 2] = (220, 60, 60)
    return img


def load_tool(name):
    """``tools/<name>.py`` (or ``train_net.py``) loaded as a module, ``tools/`` importable by it."""
    tools = str(REPO / "tools")
    if tools not in sys.path:
        sys.path.insert(0, tools)
    path = REPO / ("train_net.py" if name == "train_net" else f"tools/{name}.py")
    spec = importlib.util.spec_from_file_location(f"smca_tools_test_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """2 train + 2 val 64x64 PNG images with one rectangle each, 2 classes."""
    root = tmp_path_factory.mktemp("tools_data")

    def make(split, offset):
        dicts = []
        for i in range(2):
            img = np.full((64, 64, 3), 30, dtype=np.uint8)
            x0, y0, c = 8 + 10 * i, 12, i % 2
            img[y0:y0 + 24, x0:x0 + 28] = (200, 60, 60) if c == 0 else (60, 200, 60)
            path = str(root / f"{split}_{i}.png")
            Image.fromarray(img).save(path)
            dicts.append({"file_name": path, "image_id": offset + i, "height": 64, "width": 64,
                          "annotations": [{"bbox": [x0, y0, x0 + 28, y0 + 24], "bbox_mode": BoxMode.XYXY_ABS,
                                           "category_id": c, "iscrowd": 0}]})
        return dicts

    splits = {TRAIN: make("train", 0), VAL: make("val", 100)}
    for name, dicts in splits.items():
        DatasetCatalog.register(name, lambda d=dicts: copy.deepcopy(d))
        MetadataCatalog.get(name).set(thing_classes=["red", "green"])
    yield splits
    for name in splits:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
