"""Tests of the synthetic dataset (smca_detr.data.synthetic) and the DETR mapper (smca_detr.data.mapper)."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.common import DatasetFromList, MapDataset
from detectron2.structures import Boxes, BoxMode, Instances

from smca_detr.config import add_smca_detr_config
from smca_detr.data import mapper as mapper_mod
from smca_detr.data import synthetic
from smca_detr.data.mapper import DetrDatasetMapper, ImageReadError

TINY = ("smca_synthetic_tiny_train", "smca_synthetic_tiny_val")
ALL_NAMES = ("smca_synthetic_train", "smca_synthetic_val", "smca_synthetic_holdout") + TINY


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A fresh dataset root via $SMCA_DETR_DATASETS; registrations restored afterwards."""
    prev_override, prev_root = synthetic._root_override, synthetic.get_root()
    d = tmp_path / "datasets"
    monkeypatch.setenv("SMCA_DETR_DATASETS", str(d))
    synthetic.set_root(None)
    yield d
    synthetic._root_override = prev_override
    synthetic.register_synthetic_datasets(prev_root)


def _files(d):
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


# ------------------------------------------------------------------------------------ synthetic


def test_registration_is_cheap_and_complete(root):
    for name in ALL_NAMES:
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == list(synthetic.CATEGORIES) and len(meta.thing_classes) == 6
        assert meta.evaluator_type == "coco"
        assert meta.json_file == str(root / (synthetic.SPLITS[name].dirname + ".json"))
        assert meta.image_root == str(root / synthetic.SPLITS[name].dirname)
    assert not root.exists()  # registration generated nothing
    assert synthetic.SPLITS["smca_synthetic_train"].num_images == 2000
    assert synthetic.SPLITS["smca_synthetic_val"].num_images == 200
    assert synthetic.SPLITS["smca_synthetic_holdout"].num_images == 200


def test_every_split_has_its_own_seed_and_directory():
    """The holdout split (test-time settings are chosen on it) must not repeat val or train images."""
    specs = list(synthetic.SPLITS.values())
    assert len({s.seed for s in specs}) == len(specs)
    assert len({s.dirname for s in specs}) == len(specs)
    holdout, val = synthetic.SPLITS["smca_synthetic_holdout"], synthetic.SPLITS["smca_synthetic_val"]
    for i in range(3):
        assert not np.array_equal(synthetic.render_image(holdout.seed, i)[0], synthetic.render_image(val.seed, i)[0])


def test_set_root_moves_registration(tmp_path, root):
    synthetic.set_root(str(tmp_path / "elsewhere"))
    assert MetadataCatalog.get("smca_synthetic_tiny_val").json_file == str(tmp_path / "elsewhere" / "tiny_val.json")
    synthetic.set_root("")  # back to $SMCA_DETR_DATASETS
    assert MetadataCatalog.get("smca_synthetic_tiny_val").json_file == str(root / "tiny_val.json")


def test_generation_is_deterministic(tmp_path):
    a = synthetic.generate_split("smca_synthetic_tiny_train", str(tmp_path / "a"), progress=False)
    b = synthetic.generate_split("smca_synthetic_tiny_train", str(tmp_path / "b"), progress=False)
    assert open(a, "rb").read() == open(b, "rb").read()
    names = _files(tmp_path / "a" / "tiny_train")
    assert len(names) == 16 and names == _files(tmp_path / "b" / "tiny_train")
    for n in names:
        assert (tmp_path / "a" / "tiny_train" / n).read_bytes() == (tmp_path / "b" / "tiny_train" / n).read_bytes()
    # images differ from one another and between splits (the seed is used)
    img0 = (tmp_path / "a" / "tiny_train" / names[0]).read_bytes()
    assert img0 != (tmp_path / "a" / "tiny_train" / names[1]).read_bytes()
    synthetic.generate_split("smca_synthetic_tiny_val", str(tmp_path / "a"), progress=False)
    assert img0 != (tmp_path / "a" / "tiny_val" / names[0]).read_bytes()


@pytest.mark.parametrize("name", TINY)
def test_coco_json_is_valid(tmp_path, name):
    from pycocotools.coco import COCO

    json_file = synthetic.generate_split(name, str(tmp_path), progress=False)
    coco = COCO(json_file)
    spec = synthetic.SPLITS[name]
    assert len(coco.getImgIds()) == spec.num_images
    assert sorted(coco.getCatIds()) == [1, 2, 3, 4, 5, 6]
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(synthetic.CATEGORIES)
    n_empty = 0
    for img in coco.loadImgs(coco.getImgIds()):
        path = tmp_path / spec.dirname / img["file_name"]
        with Image.open(path) as im:
            assert im.size == (img["width"], img["height"]) and im.mode == "RGB"
        assert 192 <= img["width"] <= 256 and 192 <= img["height"] <= 256
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        n_empty += len(anns) == 0
        assert len(anns) <= 6
        for a in anns:
            x, y, w, h = a["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= img["width"] and y + h <= img["height"]
            assert a["area"] == w * h and a["iscrowd"] == 0 and 1 <= a["category_id"] <= 6
    assert n_empty == (spec.num_images // spec.empty_every if spec.empty_every else 0)


def _iou_any(boxes):
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            (ax, ay, aw, ah), (bx, by, bw, bh) = boxes[i], boxes[j]
            if min(ax + aw, bx + bw) > max(ax, bx) and min(ay + ah, by + bh) > max(ay, by):
                return True
    return False


def test_rendered_content_variety():
    cats, areas, sizes, n_overlap = set(), [], set(), 0
    for i in range(40):
        img, objects = synthetic.render_image(1234, i)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert 1 <= len(objects) <= 6
        sizes.add(img.shape[:2])
        cats.update(o["category"] for o in objects)
        areas += [o["area"] for o in objects]
        n_overlap += _iou_any([o["bbox"] for o in objects])
        for o in objects:  # box pixels are not a flat colour (there is an object / texture inside)
            x, y, w, h = o["bbox"]
            assert img[y : y + h, x : x + w].std() > 0
    assert cats == set(range(6))
    areas = np.array(areas)
    assert (areas < 32**2).any() and ((areas >= 32**2) & (areas < 96**2)).any() and (areas >= 96**2).sum() >= 3
    assert n_overlap >= 3  # objects overlap / occlude each other
    assert len(sizes) > 10  # image sizes / aspect ratios vary
    img, objects = synthetic.render_image(1234, 0, empty=True)
    assert objects == [] and img.dtype == np.uint8 and img.ndim == 3


def test_dataset_function_generates_and_loads(root):
    dicts = DatasetCatalog.get("smca_synthetic_tiny_val")
    assert len(dicts) == 8
    assert (root / "tiny_val.json").is_file()
    for d in dicts:
        assert os.path.isfile(d["file_name"]) and d["file_name"].startswith(str(root / "tiny_val"))
        for a in d["annotations"]:
            assert 0 <= a["category_id"] < 6  # contiguous ids after load_coco_json
            assert a["bbox_mode"] == BoxMode.XYWH_ABS
    # ensure_synthetic uses the registered root and returns MetadataCatalog's json_file
    assert synthetic.ensure_synthetic("smca_synthetic_tiny_train", progress=False) == MetadataCatalog.get(
        "smca_synthetic_tiny_train"
    ).json_file
    with pytest.raises(KeyError, match="smca_synthetic_nope"):
        synthetic.ensure_synthetic("smca_synthetic_nope")


def test_version_change_and_partial_split_regenerate(tmp_path, monkeypatch):
    name, r = "smca_synthetic_tiny_val", str(tmp_path)
    json_file = synthetic.generate_split(name, r, progress=False)
    mtime = os.stat(json_file).st_mtime_ns
    assert synthetic.generate_split(name, r, progress=False) == json_file
    assert os.stat(json_file).st_mtime_ns == mtime  # up to date: not rewritten

    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", synthetic.GENERATOR_VERSION + 100)
    synthetic.generate_split(name, r, progress=False)
    assert json.load(open(json_file))["info"]["version"] == synthetic.GENERATOR_VERSION

    os.remove(tmp_path / "tiny_val" / "000003.jpg")  # damaged split -> regenerated
    synthetic.generate_split(name, r, progress=False)
    assert (tmp_path / "tiny_val" / "000003.jpg").is_file()


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    real = synthetic.render_image

    def failing(seed, index, empty=False):
        if index == 5:
            raise KeyboardInterrupt
        return real(seed, index, empty)

    monkeypatch.setattr(synthetic, "render_image", failing)
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate_split("smca_synthetic_tiny_val", str(tmp_path), progress=False)
    assert [n for n in _files(tmp_path) if not n.endswith(".lock")] == []  # no half split, no temp dir
    monkeypatch.setattr(synthetic, "render_image", real)
    synthetic.generate_split("smca_synthetic_tiny_val", str(tmp_path), progress=False)
    assert len(_files(tmp_path / "tiny_val")) == 8


# --------------------------------------------------------------------------------------- mapper

W, H = 64, 48
RECT = (20, 10, 40, 30)  # XYXY of the white rectangle drawn on a black image


@pytest.fixture
def image_file(tmp_path):
    a = np.zeros((H, W, 3), np.uint8)
    x0, y0, x1, y1 = RECT
    a[y0:y1, x0:x1] = 255
    path = tmp_path / "rect.png"
    Image.fromarray(a).save(path)
    return str(path)


def _cfg(**input_overrides):
    cfg = add_smca_detr_config(get_cfg())
    cfg.INPUT.MIN_SIZE_TRAIN = (H,)
    cfg.INPUT.MAX_SIZE_TRAIN = 1000
    cfg.INPUT.MIN_SIZE_TEST = 96
    cfg.INPUT.MAX_SIZE_TEST = 1000
    cfg.INPUT.DETR.CROP_ENABLED = False
    for k, v in input_overrides.items():
        node, key = (cfg.INPUT.DETR, k[5:]) if k.startswith("DETR_") else (cfg.INPUT, k)
        setattr(node, key, v)
    return cfg


def _record(file_name, annos=None, with_size=True):
    d = {"file_name": file_name, "image_id": 7}
    if with_size:
        d.update(height=H, width=W)
    d["annotations"] = annos if annos is not None else [_anno(RECT, 3)]
    return d


def _anno(xyxy, cls, crowd=0):
    x0, y0, x1, y1 = xyxy
    return {"bbox": [x0, y0, x1 - x0, y1 - y0], "bbox_mode": BoxMode.XYWH_ABS, "category_id": cls, "iscrowd": crowd}


def _bright_box(image_chw):
    ys, xs = np.nonzero(image_chw.numpy().mean(0) > 127)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def test_mapper_train_output_types(image_file):
    np.random.seed(0)
    cfg = _cfg(MIN_SIZE_TRAIN=(96, 128))
    m = DetrDatasetMapper(cfg, is_train=True)
    rec = _record(image_file)
    out = m(rec)
    assert "annotations" in rec  # input not modified
    assert "annotations" not in out
    img = out["image"]
    assert isinstance(img, torch.Tensor) and img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3
    assert min(img.shape[1:]) in (96, 128) and (out["height"], out["width"]) == (H, W)
    inst = out["instances"]
    assert isinstance(inst, Instances) and inst.image_size == tuple(img.shape[1:])
    assert isinstance(inst.gt_boxes, Boxes) and inst.gt_boxes.tensor.dtype == torch.float32
    assert inst.gt_classes.dtype == torch.int64 and inst.gt_classes.tolist() == [3]
    # the box follows the resized rectangle
    np.testing.assert_allclose(inst.gt_boxes.tensor[0].numpy(), _bright_box(img), atol=2)


def test_mapper_test_mode(image_file):
    m = DetrDatasetMapper(_cfg(), is_train=False)
    out = m(_record(image_file, with_size=False))
    assert tuple(out["image"].shape) == (3, 96, 128)  # shorter side 48 -> 96
    assert "instances" not in out and "annotations" not in out
    assert (out["height"], out["width"]) == (H, W)  # filled in from the image


def test_flip_mirrors_boxes(image_file):
    m = DetrDatasetMapper(is_train=True, augmentations=[T.RandomFlip(prob=1.0)])
    x0, y0, x1, y1 = (5, 10, 25, 30)
    a = np.zeros((H, W, 3), np.uint8)
    a[y0:y1, x0:x1] = 255
    Image.fromarray(a).save(image_file)
    out = m(_record(image_file, [_anno((x0, y0, x1, y1), 1)]))
    flipped = [W - x1, y0, W - x0, y1]
    assert out["instances"].gt_boxes.tensor[0].tolist() == flipped
    np.testing.assert_array_equal(_bright_box(out["image"]), flipped)

    # the configured recipe flips about half of the time, and boxes always match the pixels
    m = DetrDatasetMapper(_cfg(), is_train=True)
    np.random.seed(1)
    seen = set()
    for _ in range(30):
        out = m(_record(image_file, [_anno((x0, y0, x1, y1), 1)]))
        box = out["instances"].gt_boxes.tensor[0].tolist()
        assert box in ([x0, y0, x1, y1], flipped)
        np.testing.assert_array_equal(_bright_box(out["image"]), box)
        seen.add(tuple(box))
    assert len(seen) == 2


def test_flip_disabled_by_config(image_file):
    m = DetrDatasetMapper(_cfg(RANDOM_FLIP="none"), is_train=True)
    np.random.seed(0)
    for _ in range(10):
        assert m(_record(image_file))["instances"].gt_boxes.tensor[0].tolist() == list(RECT)


def test_crop_branch_keeps_boxes_inside(image_file):
    cfg = _cfg(MIN_SIZE_TRAIN=(80,), DETR_CROP_ENABLED=True, DETR_CROP_RESIZE=[96], DETR_CROP_MIN=40, DETR_CROP_MAX=40)
    kwargs = DetrDatasetMapper.from_config(cfg, is_train=True)
    assert kwargs["crop_augmentations"] is not None and kwargs["crop_prob"] == 0.5
    m = DetrDatasetMapper(**{**kwargs, "crop_prob": 1.0})
    np.random.seed(0)
    n_cut, n_gone = 0, 0
    for _ in range(40):
        out = m(_record(image_file))
        img, boxes = out["image"], out["instances"].gt_boxes.tensor
        assert tuple(img.shape) == (3, 80, 80)  # 40x40 crop resized to 80: the crop branch ran
        h, w = img.shape[1:]
        bright = _bright_box(img)
        if len(boxes) == 0:
            assert bright is None  # the object was cropped away, and so was its box
            n_gone += 1
            continue
        assert len(boxes) == 1
        b = boxes[0]
        assert 0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h
        np.testing.assert_allclose(b.numpy(), bright, atol=2)
        n_cut += float((b[2] - b[0]) * (b[3] - b[1])) < 0.99 * (80 * 80)  # the 40x40 px rectangle, cut
    assert n_cut > 0 and n_gone > 0

    # crop disabled: never a square output
    m = DetrDatasetMapper(_cfg(MIN_SIZE_TRAIN=(80,)), is_train=True)
    assert DetrDatasetMapper.from_config(_cfg(), True)["crop_augmentations"] is None
    assert tuple(m(_record(image_file))["image"].shape) == (3, 80, 107)


def test_crop_branch_probability(image_file):
    cfg = _cfg(MIN_SIZE_TRAIN=(80,), DETR_CROP_ENABLED=True, DETR_CROP_RESIZE=[96], DETR_CROP_MIN=40, DETR_CROP_MAX=40)
    m = DetrDatasetMapper(cfg, is_train=True)
    np.random.seed(0)
    shapes = [tuple(m(_record(image_file))["image"].shape) for _ in range(40)]
    n_crop = shapes.count((3, 80, 80))
    assert n_crop + shapes.count((3, 80, 107)) == 40
    assert 8 <= n_crop <= 32


def test_crowd_and_degenerate_boxes_dropped(image_file):
    m = DetrDatasetMapper(_cfg(RANDOM_FLIP="none"), is_train=True)
    annos = [
        _anno((0, 0, 30, 30), 5, crowd=1),  # crowd
        _anno(RECT, 2),  # kept
        _anno((10, 10, 10, 20), 4),  # zero width
        _anno((30, 5, 20, 25), 4),  # negative width
        _anno((70, 10, 90, 20), 1),  # outside the image: zero width after clipping
        _anno((50, 40, 80, 60), 0),  # partly outside: clipped to the image
    ]
    inst = m(_record(image_file, annos))["instances"]
    assert inst.gt_classes.tolist() == [2, 0]
    assert inst.gt_boxes.tensor.tolist() == [list(RECT), [50, 40, W, H]]


def test_empty_images_kept_or_skipped(image_file):
    annos = [_anno((0, 0, 30, 30), 5, crowd=1), _anno((10, 10, 10, 20), 4)]
    keep = DetrDatasetMapper(_cfg(), is_train=True)
    out = keep(_record(image_file, annos))
    assert len(out["instances"]) == 0 and tuple(out["instances"].gt_boxes.tensor.shape) == (0, 4)
    assert len(keep(_record(image_file, []))["instances"]) == 0

    skip = DetrDatasetMapper(_cfg(DETR_KEEP_EMPTY=False), is_train=True)
    assert skip(_record(image_file, annos)) is None
    assert skip(_record(image_file, [])) is None
    assert len(skip(_record(image_file))["instances"]) == 1
    # at test time nothing is skipped
    skip_test = DetrDatasetMapper(_cfg(DETR_KEEP_EMPTY=False), is_train=False)
    assert skip_test(_record(image_file, []))["image"].shape[0] == 3


def test_map_dataset_retries_on_none(image_file):
    assert mapper_mod.patch_detectron2_map_dataset()
    skip = DetrDatasetMapper(_cfg(DETR_KEEP_EMPTY=False), is_train=True)
    records = [_record(image_file, []), _record(image_file, [_anno(RECT, 4)])]
    ds = MapDataset(DatasetFromList(records, copy=False), skip)
    for _ in range(3):
        assert ds[0]["instances"].gt_classes.tolist() == [4]
    with pytest.raises(RuntimeError, match="KEEP_EMPTY"):
        MapDataset(DatasetFromList([_record(image_file, [])], copy=False), skip)[0]


@pytest.mark.parametrize("kind", ["garbage", "truncated", "missing"])
def test_unreadable_image_names_the_file(tmp_path, image_file, kind):
    bad = tmp_path / f"broken_{kind}.jpg"
    if kind == "garbage":
        bad.write_bytes(b"this is not an image")
    elif kind == "truncated":
        Image.fromarray(np.full((H, W, 3), 128, np.uint8)).save(bad, quality=90)
        bad.write_bytes(bad.read_bytes()[:200])
    m = DetrDatasetMapper(_cfg(), is_train=True)
    with pytest.raises(ImageReadError, match=f"broken_{kind}.jpg"):
        m(_record(str(bad)))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
@pytest.mark.parametrize("fmt", ["RGB", "BGR"])
def test_non_rgb_images_become_three_channels(tmp_path, mode, fmt):
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[10:30, 20:40] = (200, 100, 50)
    path = tmp_path / f"img_{mode}.png"
    Image.fromarray(rgb).convert(mode).save(path)
    m = DetrDatasetMapper(_cfg(FORMAT=fmt, RANDOM_FLIP="none"), is_train=True)
    out = m(_record(str(path)))
    img = out["image"]
    assert tuple(img.shape) == (3, H, W) and img.dtype == torch.uint8
    if mode == "L":
        assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2]) and img.max() > 0
    elif mode == "RGBA":
        expected = (200, 100, 50) if fmt == "RGB" else (50, 100, 200)
        assert img[:, 20, 30].tolist() == list(expected)


def test_mapper_on_synthetic_dataset(root):
    dicts = DatasetCatalog.get("smca_synthetic_tiny_train")
    cfg = _cfg(MIN_SIZE_TRAIN=(160, 192), DETR_CROP_ENABLED=True, DETR_CROP_RESIZE=[200], DETR_CROP_MIN=120, DETR_CROP_MAX=180)
    m = DetrDatasetMapper(cfg, is_train=True)
    np.random.seed(0)
    n_boxes = 0
    for d in dicts:
        out = m(d)
        h, w = out["image"].shape[1:]
        b = out["instances"].gt_boxes.tensor
        assert ((b[:, 0] >= 0) & (b[:, 2] <= w) & (b[:, 1] >= 0) & (b[:, 3] <= h)).all()
        assert ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all()
        assert ((out["instances"].gt_classes >= 0) & (out["instances"].gt_classes < 6)).all()
        n_boxes += len(b)
    assert n_boxes > 0
