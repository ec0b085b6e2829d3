"""Bad training data through the trainer's loader (smca_detr.data.validation and the DETR mapper in
a real loader): empty, crowd-only, degenerate, grayscale / RGBA images train with one warning;
category ids outside the categories or the model's classes, unreadable images and unregistered
dataset names are errors naming the file, the id or the close names.

The mapper itself, one image at a time (crowd / degenerate boxes, empty images, unreadable files,
L / RGBA / P images), is tested in test_data.py.
"""
import contextlib
import copy
import json
import os

import numpy as np
import pytest
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import BoxMode
from detectron2.utils.events import EventStorage

import smca_detr  # noqa: F401
from smca_detr.data.mapper import ImageReadError
from smca_detr.data.validation import DatasetNotRegisteredError, InvalidDatasetError
from smca_detr.engine import Trainer, TrainLoop, build_optimizer
from train_step_helpers import _png, build, captured, make_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@contextlib.contextmanager
def registered(name, dicts, thing_classes=("a", "b", "c")):
    DatasetCatalog.register(name, lambda: copy.deepcopy(dicts))
    MetadataCatalog.get(name).set(thing_classes=list(thing_classes))
    try:
        yield name
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _anno(xyxy, cls=0, crowd=0):
    return {"bbox": list(xyxy), "bbox_mode": BoxMode.XYXY_ABS, "category_id": cls, "iscrowd": crowd}


def _record(path, annos, hw=(64, 64), image_id=0):
    return {"file_name": path, "image_id": image_id, "height": hw[0], "width": hw[1], "annotations": annos}


def test_empty_crowd_only_degenerate_gray_rgba_images_train_with_one_warning(tmp_path):
    """Through the trainer's loader: an image without annotations, a crowd-only RGBA image, a
    grayscale image whose boxes are all degenerate or outside, and an image with a box partly
    outside: 3-channel images, boxes dropped / clipped, ONE warning, a finite train step."""
    records = [
        _record(_png(tmp_path / "empty.png"), []),
        _record(_png(tmp_path / "crowd.png", mode="RGBA"), [_anno((5, 5, 30, 30), 1, crowd=1)], image_id=1),
        _record(_png(tmp_path / "gray.png", hw=(48, 64), mode="L"),
                [_anno((10, 10, 10, 30)),            # zero width
                 _anno((30, 5, 20, 25), 2),         # negative width
                 _anno((70, 10, 90, 20), 1),        # right of the image
                 _anno((5, 60, 20, 70))],           # below the image
                hw=(48, 64), image_id=2),
        _record(_png(tmp_path / "ok.png"), [_anno((10, 12, 40, 40), 2), _anno((50, 40, 80, 70), 0)], image_id=3),
    ]
    cfg = make_cfg(["DATASETS.TRAIN", "('rel_bad_boxes',)", "SOLVER.IMS_PER_BATCH", "4",
                    "DATALOADER.ASPECT_RATIO_GROUPING", "False"])  # one batch holds all 4 images
    with registered("rel_bad_boxes", records):
        with captured("smca_detr", "detectron2.data", "fvcore") as warnings:
            loader = Trainer.build_train_loader(cfg)
        batch = next(iter(loader))
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    msg = warnings[0].getMessage()
    assert "rel_bad_boxes" in msg and "4 of 7 boxes" in msg

    by_name = {os.path.basename(d["file_name"]): d for d in batch}
    assert set(by_name) == {"empty.png", "crowd.png", "gray.png", "ok.png"}
    for d in batch:
        assert d["image"].dtype == torch.uint8 and d["image"].shape[0] == 3
    assert [len(by_name[n]["instances"]) for n in ("empty.png", "crowd.png", "gray.png")] == [0, 0, 0]
    ok = by_name["ok.png"]["instances"]
    assert ok.gt_boxes.tensor.tolist() == [[10, 12, 40, 40], [50, 40, 64, 64]]  # second one clipped

    model = build(cfg)
    loop = TrainLoop(model, iter([batch]), build_optimizer(cfg, model))
    with EventStorage(0) as storage:
        loop.iter = 0
        loop.run_step()
        assert np.isfinite(storage.latest()["total_loss"][0])
    # a batch without a single box (empty + crowd-only + degenerate-only) is a valid batch too
    only_empty = [by_name[n] for n in ("empty.png", "crowd.png", "gray.png")]
    losses = model(only_empty)
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total) and all(v.dtype == torch.float32 for v in losses.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _coco_json(path, image_file, category_ids, anno_category):
    coco = {
        "images": [{"id": 1, "file_name": os.path.basename(image_file), "height": 64, "width": 64}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": anno_category, "bbox": [5, 5, 20, 20],
                         "area": 400, "iscrowd": 0}],
        "categories": [{"id": i, "name": f"c{i}"} for i in category_ids],
    }
    path.write_text(json.dumps(coco))
    return str(path)


def test_category_ids_outside_the_categories_name_the_file_and_the_id(tmp_path):
    image = _png(tmp_path / "img.png")
    # COCO json: detectron2's load_coco_json raises a KeyError without the file name; ours names both
    json_file = _coco_json(tmp_path / "bad_ids.json", image, [1, 2, 3], anno_category=7)
    name = "rel_bad_ids_json"
    register_coco_instances(name, {}, json_file, str(tmp_path))
    try:
        with pytest.raises(InvalidDatasetError, match=r"bad_ids\.json.*category_id=7"):
            Trainer.build_train_loader(make_cfg(["DATASETS.TRAIN", f"('{name}',)"]))
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    # dataset dicts whose (contiguous) id is beyond the dataset's categories
    with registered("rel_bad_ids_dicts", [_record(image, [_anno((5, 5, 30, 30), 5)])]):
        with pytest.raises(InvalidDatasetError, match=r"img\.png.*category_id=5.*3 categories"):
            Trainer.build_train_loader(make_cfg(["DATASETS.TRAIN", "('rel_bad_ids_dicts',)"]))
    # an id of the dataset the model has no logit for (a softmax head would take it as "no object")
    with registered("rel_ids_vs_model", [_record(image, [_anno((5, 5, 30, 30), 4)])], thing_classes="abcdef"):
        with pytest.raises(InvalidDatasetError, match=r"category_id=4.*MODEL\.SMCA_DETR\.NUM_CLASSES=3"):
            Trainer.build_train_loader(make_cfg(["DATASETS.TRAIN", "('rel_ids_vs_model',)"]))


@pytest.mark.parametrize("kind,workers", [("missing", 0), ("corrupt", 1)])
def test_unreadable_image_through_the_data_loader_names_the_file(tmp_path, kind, workers):
    bad = tmp_path / f"broken_{kind}.jpg"
    if kind == "corrupt":
        bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    records = [_record(_png(tmp_path / "good.png"), [_anno((5, 5, 30, 30))]),
               _record(str(bad), [_anno((5, 5, 30, 30))], image_id=1)]
    cfg = make_cfg(["DATASETS.TRAIN", "('rel_unreadable',)", "DATALOADER.NUM_WORKERS", str(workers)])
    with registered("rel_unreadable", records):
        loader = Trainer.build_train_loader(cfg)
        # with workers, torch re-raises the worker's exception (same type, its traceback as message)
        with pytest.raises((ImageReadError, RuntimeError), match=f"broken_{kind}.jpg"):
            next(iter(loader))


def test_unregistered_dataset_fails_at_build_time_with_close_names():
    typo = "smca_synthetic_tiny_trian"
    with pytest.raises(DatasetNotRegisteredError, match=r"DATASETS\.TRAIN.*'smca_synthetic_tiny_trian'.*"
                                                        r"did you mean 'smca_synthetic_tiny_train'"):
        Trainer(make_cfg(["DATASETS.TRAIN", f"('{typo}',)"]))
    # a typo in DATASETS.TEST is reported before training, not after it
    with pytest.raises(DatasetNotRegisteredError, match=r"DATASETS\.TEST.*'smca_synthetic_tiny_vla'.*"
                                                        r"'smca_synthetic_tiny_val'"):
        Trainer.build_train_loader(make_cfg(["DATASETS.TRAIN", "('smca_synthetic_tiny_train',)",
                                             "DATASETS.TEST", "('smca_synthetic_tiny_vla',)"]))
    with pytest.raises(DatasetNotRegisteredError, match="coco_2017_val"):
        Trainer.build_test_loader(make_cfg(), "coco_2017_vall")
    with pytest.raises(KeyError, match="no registered name is close"):  # still a KeyError, like detectron2's
        Trainer.build_test_loader(make_cfg(), "zzzzzzzz")
