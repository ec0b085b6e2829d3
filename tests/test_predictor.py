"""Every image a user can pass gets detections or one clear error, in ``model_zoo.Predictor`` and
the ONNX Runtime ``OnnxPredictor`` alike (tried with the shipped demo model)."""
import os
import warnings

import numpy as np
import pytest
import torch

from smca_detr.export import prepare_image, resized_shape
from smca_detr.model_zoo import Predictor, get_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = "demo/smca_r18_slim_synthetic"


@pytest.fixture(scope="module")
def predictors(tmp_path_factory):
    """(PyTorch predictor, ONNX Runtime predictor or None without onnxruntime) of the shipped model."""
    from smca_detr.checkpoint import shipped

    weights = os.path.join(shipped.SHIPPED_DIR, "smca_r18_slim_synthetic.pth")
    opts = ["MODEL.WEIGHTS", weights] if os.path.isfile(weights) else []  # random weights otherwise
    torch.manual_seed(0)
    cfg = get_config(CONFIG, opts)
    torch_pred = Predictor(cfg)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return [torch_pred]
    from smca_detr.export import OnnxPredictor, export_onnx

    path = export_onnx(torch_pred.model, tmp_path_factory.mktemp("onnx") / "m.onnx", cfg)
    return [torch_pred, OnnxPredictor(path)]


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _same(a, b):
    assert len(a) == len(b)
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=1e-3, rtol=0)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=0)
    assert torch.equal(a.pred_classes, b.pred_classes)


@pytest.mark.parametrize("hw", [(2, 3000), (3000, 2), (1, 1)])
def test_extreme_aspect_ratios_give_detections_inside_the_image(predictors, hw):
    for p in predictors:
        inst = p(_image(*hw))
        assert inst.image_size == hw and len(inst) > 0, type(p).__name__
        boxes = inst.pred_boxes.tensor
        assert (boxes[:, 0::2] <= hw[1]).all() and (boxes[:, 1::2] <= hw[0]).all()


def test_resize_clamps_each_side_to_one_pixel():
    # ResizeShortestEdge(256, 400) turns 2x3000 into 0x400 (rounds 0.27 to 0)
    assert resized_shape(2, 3000, 256, 400) == (1, 400)
    assert resized_shape(3000, 2, 256, 400) == (400, 1)
    assert resized_shape(480, 640, 256, 400) == (256, 341)
    assert resized_shape(5, 7, 0, 0) == (5, 7)


@pytest.mark.parametrize("shape", [(0, 0, 3), (0, 5), (7, 0, 3)])
def test_empty_image_is_a_clear_error(predictors, shape):
    for p in predictors:
        with pytest.raises(ValueError, match=f"empty image: size {shape[0]}x{shape[1]}"):
            p(np.zeros(shape, dtype=np.uint8))


def test_bad_shapes_and_dtypes_are_clear_errors(predictors):
    for p in predictors:
        with pytest.raises(ValueError, match=r"got shape \(4, 4, 2\)"):
            p(np.zeros((4, 4, 2), dtype=np.uint8))
        with pytest.raises(ValueError, match="dtype bool"):
            p(np.zeros((4, 4, 3), dtype=bool))
        with pytest.raises(ValueError, match="NaN"):
            p(np.full((4, 4, 3), np.nan, dtype=np.float32))
        with pytest.raises(ValueError, match="input_format"):
            p(_image(8, 8), input_format="YUV")


def test_float_image_in_0_1_is_scaled_with_a_warning(predictors):
    image = _image(48, 64)
    for p in predictors:
        ref = p(image.astype(np.float32))  # 0..255 floats: no warning
        with pytest.warns(UserWarning, match=r"\[0, 1\]"):
            got = p(image.astype(np.float32) / 255)
        _same(got, ref)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            p(image.astype(np.float32))


def test_grayscale_and_rgba_are_converted(predictors):
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (40, 56), dtype=np.uint8)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    rgba = np.concatenate([_image(40, 56, seed=4), np.full((40, 56, 1), 7, np.uint8)], 2)
    for p in predictors:
        ref = p(rgb)
        _same(p(gray), ref)
        _same(p(gray[:, :, None]), ref)
        _same(p(rgba), p(rgba[:, :, :3]))
        _same(p(rgba[:, :, [2, 1, 0, 3]], input_format="BGR"), p(rgba[:, :, :3]))


def test_prepare_image_conversions():
    assert prepare_image(np.zeros((2, 3), np.uint8)).shape == (2, 3, 3)
    x = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(prepare_image(x), x[:, :, :3])
    np.testing.assert_array_equal(prepare_image(x, "BGR"), x[:, :, 2::-1])
    np.testing.assert_array_equal(prepare_image(torch.from_numpy(x[:, :, :3])), x[:, :, :3])


def test_onnx_predictor_reads_files_and_matches_pytorch(predictors, tmp_path):
    from PIL import Image

    if len(predictors) < 2:
        pytest.skip("onnxruntime is not installed")
    image = _image(90, 130, seed=5)
    Image.fromarray(image).save(tmp_path / "a.png")
    torch_pred, onnx_pred = predictors
    _same(onnx_pred(str(tmp_path / "a.png")), torch_pred(image))
    assert onnx_pred.metadata.thing_classes == torch_pred.metadata.thing_classes


def test_demo_with_onnx_draws_the_pytorch_demo_pictures(predictors, tmp_path):
    import importlib.util

    from PIL import Image

    if len(predictors) < 2:
        pytest.skip("onnxruntime is not installed")
    torch_pred, onnx_pred = predictors
    if not torch_pred.cfg.MODEL.WEIGHTS:
        pytest.skip("the shipped checkpoint is not in this checkout")
    spec = importlib.util.spec_from_file_location(
        "smca_demo_tool", os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools", "demo.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    Image.fromarray(_image(96, 128, seed=6)).save(tmp_path / "a.png")
    common = ["--input", str(tmp_path / "a.png"), "--confidence-threshold", "0.1"]
    np.random.seed(0)  # detectron2's Visualizer draws each instance in a random colour
    demo.main(["--onnx", onnx_pred.path, "--output", str(tmp_path / "onnx"), *common])
    np.random.seed(0)
    demo.main(["--config-file", CONFIG, "--output", str(tmp_path / "pt"), *common,
               "--opts", "MODEL.WEIGHTS", torch_pred.cfg.MODEL.WEIGHTS])
    a = np.asarray(Image.open(tmp_path / "onnx" / "a.png"))
    b = np.asarray(Image.open(tmp_path / "pt" / "a.png"))
    assert a.shape == b.shape == (96, 128, 3)
    assert (a != b).any(-1).mean() < 0.005  # same boxes and labels (sub-pixel box differences aside)
    assert (a != np.asarray(Image.open(tmp_path / "a.png"))).any()  # something was drawn
