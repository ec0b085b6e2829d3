"""Pictures users look at, on CPU with tiny random-weight models: the demo (tools/demo.py) and
``make demo`` (tools/run_demo.py), detections drawn with detectron2's Visualizer, the attention
pictures of every family (smca_detr.utils.visualize, tools/visualize_attention.py), and the image
reading they share (smca_detr.utils.images: errors name the file)."""
import os
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import MetadataCatalog

import smca_detr  # noqa: F401
from smca_detr import model_zoo
from smca_detr.modeling.registry import TRANSFORMER_REGISTRY
from smca_detr.utils.visualize import attention_maps, grid_size, render_attention
from tool_helpers import REPO, TINY, _image, load_tool as _load_tool

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

FAMILIES = {"smca": ("smca_r50", "SMCATransformer"),
            "conditional": ("conditional_detr_r50", "ConditionalTransformer"),
            "deformable": ("deformable_detr_r50", "DeformableTransformer")}


# ----------------------------------------------------------------------------------------- demo


def test_demo_writes_pictures(tmp_path):
    inp = tmp_path / "in"
    (inp / "sub").mkdir(parents=True)
    Image.fromarray(_image(72, 100, 0)).save(inp / "a.png")
    Image.fromarray(_image(60, 90, 1)).save(inp / "sub" / "b.jpg")
    demo = _load_tool("demo")
    out = tmp_path / "out"
    demo.main(["--config-file", "smca_r50", "--input", str(inp), str(inp / "sub" / "*.jpg"),
               "--output", str(out), "--confidence-threshold", "0.0", "--opts", *TINY])
    assert sorted(os.listdir(out)) == ["a.png", "b.jpg"]
    assert Image.open(out / "a.png").size == (100, 72) and Image.open(out / "b.jpg").size == (90, 60)
    with pytest.raises(FileNotFoundError, match="no image"):
        demo.expand_inputs([str(tmp_path / "missing*.png")])


def test_make_demo_evaluates_shipped_weights_finetunes_and_evaluates_again(tmp_path, monkeypatch, capsys):
    from smca_detr.checkpoint import shipped

    finetune = REPO / "configs" / "demo" / "smca_r18_slim_finetune.yaml"
    small = ["MODEL.SMCA_DETR.HIDDEN_DIM", "32", "MODEL.SMCA_DETR.DIM_FEEDFORWARD", "32",
             "MODEL.SMCA_DETR.ENC_LAYERS", "1", "MODEL.SMCA_DETR.DEC_LAYERS", "1",
             "MODEL.RESNETS.STEM_OUT_CHANNELS", "8", "MODEL.RESNETS.RES2_OUT_CHANNELS", "8",
             "DATASETS.TRAIN", "('smca_synthetic_tiny_train',)", "DATASETS.TEST", "('smca_synthetic_tiny_val',)",
             "DATASETS.SYNTHETIC.ROOT", str(tmp_path / "data"), "INPUT.MIN_SIZE_TRAIN", "(96,)",
             "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128",
             "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(tmp_path / "demo")]
    model = model_zoo.build_model_from_config(str(finetune), opts=small + ["MODEL.WEIGHTS", ""])
    from smca_detr.checkpoint.shipped import export_for_shipping

    torch.save(export_for_shipping({"model": model.state_dict()}), tmp_path / "smca_r18_slim_synthetic.pth")
    monkeypatch.setattr(shipped, "SHIPPED_DIR", str(tmp_path))
    run_demo = _load_tool("run_demo")
    assert run_demo.main(["--config-file", str(finetune), "--num-pictures", "2", *small]) == 0
    out = capsys.readouterr().out
    assert "of the loaded weights" in out and "after training" in out and "smca_detr://" in out
    for sub in ("pictures_before", "pictures"):
        assert len(os.listdir(tmp_path / "demo" / sub)) == 2


def test_draw_instances_with_detectron2_visualizer(monkeypatch):
    """detectron2's Visualizer imports cv2 (not needed for boxes): with it, the Visualizer draws."""
    from detectron2.structures import Boxes, Instances

    from smca_detr.utils.visualize import draw_instances

    had = "detectron2.utils.visualizer" in sys.modules
    try:
        import cv2  # noqa: F401
    except ImportError:
        monkeypatch.setitem(sys.modules, "cv2", types.ModuleType("cv2"))
    try:
        inst = Instances((72, 100))
        inst.pred_boxes = Boxes(torch.tensor([[10.0, 10.0, 50.0, 40.0]]))
        inst.scores = torch.tensor([0.9])
        inst.pred_classes = torch.tensor([1])
        meta = MetadataCatalog.get("smca_tools_test_meta").set(thing_classes=["red", "green"])
        pic = draw_instances(_image(), inst, meta, 0.5)
        assert pic.shape == (72, 100, 3) and not np.array_equal(pic, _image())
    finally:
        if not had:
            sys.modules.pop("detectron2.utils.visualizer", None)
        MetadataCatalog.remove("smca_tools_test_meta")


# ----------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("family", list(FAMILIES))
def test_attention_picture(family, tmp_path):
    config, transformer = FAMILIES[family]
    if transformer not in TRANSFORMER_REGISTRY:
        pytest.skip(f"{transformer} is not registered yet")
    model = model_zoo.build_model_from_config(config, opts=TINY)
    predictor = model_zoo.Predictor(model.cfg, model)
    image = _image(90, 120)
    maps = attention_maps(model, predictor.inputs(image), "auto", -1)
    out = tmp_path / f"{family}.png"
    pic = render_attention(image, maps, str(out), panel_width=64)
    rows, cols = {"smca": (2, 5), "conditional": (3, 5), "deformable": (1, 5)}[family]  # 4 heads / 4 levels
    assert (len(maps.rows), max(len(r) for r in maps.rows)) == (rows, cols)
    assert Image.open(out).size == grid_size(rows, cols, image.shape[:2], 64) == (cols * 64, rows * 48)
    assert pic.shape == (rows * 48, cols * 64, 3)
    assert 0 <= maps.query < 10 and maps.layer == 1
    for panel in (p for r in maps.rows for p in r):
        if panel.heatmap is not None:
            assert panel.heatmap.shape == (64, 85) and np.isfinite(panel.heatmap).all()
            assert panel.heatmap.min() >= 0 and panel.heatmap.max() > 0
        if panel.points is not None:
            assert panel.point_values.min() >= 0 and panel.point_values.max() <= 1 + 1e-6
    if family == "deformable":
        assert len(maps.rows[0][1].points) == 4 * 4  # heads x points of one level


def test_visualize_attention_tool(tmp_path):
    src = tmp_path / "img.png"
    Image.fromarray(_image(90, 120)).save(src)
    tool = _load_tool("visualize_attention")
    out = tmp_path / "att.png"
    tool.main(["--config-file", "smca_r50", "--input", str(src), "--query", "3", "--output", str(out),
               "--panel-width", "40", "--opts", *TINY])
    assert Image.open(out).size == (5 * 40, 2 * 30)
    with pytest.raises(ValueError, match="out of range"):
        tool.main(["--config-file", "smca_r50", "--input", str(src), "--query", "99", "--output", str(out),
                   "--opts", *TINY])


# ----------------------------------------------------------------------------------- images


def test_read_image_errors_name_the_file(tmp_path):
    from smca_detr.utils.images import ImageNotFoundError, ImageReadError, read_image

    good = tmp_path / "good.png"
    Image.fromarray(_image(30, 40)).save(good)
    assert np.array_equal(read_image(good), _image(30, 40))
    assert np.array_equal(read_image(str(good), format="BGR"), _image(30, 40)[:, :, ::-1])

    garbage = tmp_path / "corrupt_file.png"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match="corrupt_file.png"):
        read_image(garbage)
    truncated = tmp_path / "truncated_file.png"
    truncated.write_bytes(good.read_bytes()[:120])
    with pytest.raises(ImageReadError, match="truncated_file.png"):
        read_image(truncated)
    with pytest.raises(ImageNotFoundError, match="missing_file.png") as info:
        read_image(tmp_path / "missing_file.png")
    assert isinstance(info.value, FileNotFoundError)

    # both tools read through it: the corrupt file is named (visualize_attention before building a model)
    tool = _load_tool("visualize_attention")
    with pytest.raises(ImageReadError, match="corrupt_file.png"):
        tool.main(["--config-file", "smca_r50", "--input", str(garbage), "--output", str(tmp_path / "a.png"),
                   "--opts", *TINY])
    demo = _load_tool("demo")
    with pytest.raises(ImageReadError, match="corrupt_file.png"):
        demo.main(["--config-file", "smca_r50", "--input", str(garbage), "--output", str(tmp_path / "out"),
                   "--opts", *TINY])
