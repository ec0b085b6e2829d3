"""ONNX export (smca_detr.export, tools/export_onnx.py): every variant's graph run in ONNX Runtime
gives the PyTorch model's detections at two image sizes other than the traced one (dynamic shapes)."""
import ast
import os

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from detectron2.modeling import build_model  # noqa: E402

from smca_detr.export import (ExportError, OnnxDetector, OnnxPredictor, export_onnx,  # noqa: E402
                              instances_from_outputs)
from train_step_helpers import load_cfg  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["MODEL.RESNETS.RES2_OUT_CHANNELS", 16, "MODEL.RESNETS.WIDTH_PER_GROUP", 4,
        "MODEL.RESNETS.STEM_OUT_CHANNELS", 8, "MODEL.SMCA_DETR.HIDDEN_DIM", 32, "MODEL.SMCA_DETR.NHEADS", 4,
        "MODEL.SMCA_DETR.DIM_FEEDFORWARD", 32, "MODEL.SMCA_DETR.ENC_LAYERS", 1, "MODEL.SMCA_DETR.DEC_LAYERS", 2,
        "MODEL.SMCA_DETR.NUM_QUERIES", 10, "MODEL.SMCA_DETR.NUM_CLASSES", 3, "MODEL.SMCA_DETR.TEST_TOPK", 12]
VARIANTS = {
    "detr": ("detr_r50", []),
    "smca_type1": ("smca_r50", ["MODEL.SMCA_DETR.SMCA.DYNAMIC_SCALE", "type1"]),
    "smca_type2": ("smca_r50", ["MODEL.SMCA_DETR.SMCA.DYNAMIC_SCALE", "type2"]),
    "smca_type4_dc5": ("smca_r50_dc5", ["MODEL.SMCA_DETR.SMCA.DYNAMIC_SCALE", "type4"]),
    "smca_ms": ("smca_r50_ms", ["MODEL.SMCA_DETR.ENC_LAYERS", 2, "MODEL.SMCA_DETR.SMCA.ENCODER_LAYOUT",
                                "['intra','multi']"]),
    "smca_conv_ms": ("smca_r50_conv_ms", []),
    "conditional": ("conditional_detr_r50", []),
    "deformable": ("deformable_detr_r50", []),
    "deformable_refine": ("deformable_detr_r50_refine", []),
    "deformable_two_stage": ("deformable_detr_r50_two_stage", []),
}
SIZES = ((70, 100), (113, 66))  # other aspect ratios than the traced (65, 97); neither a multiple of 32


def tiny_model(config, extra=(), seed=0):
    cfg = load_cfg(REPO + f"/configs/{config}.yaml", TINY + list(extra))
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    # spread the class scores: a random tiny model scores every query nearly alike, and near-ties
    # make the top-k order (not the maths) differ between two correct implementations
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.heads.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.5))
    return cfg, model


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_onnx_runtime_matches_pytorch_at_unseen_sizes(variant, tmp_path):
    config, extra = VARIANTS[variant]
    cfg, model = tiny_model(config, extra)
    path = export_onnx(model, tmp_path / "m.onnx", cfg)
    predictor = OnnxPredictor(path, cfg)
    g = torch.Generator().manual_seed(1)
    for h, w in SIZES:
        x = torch.rand((1, 3, h, w), generator=g) * 255
        with torch.no_grad():
            ref = model([{"image": x[0], "height": h, "width": w}])[0]["instances"]
        got = instances_from_outputs(predictor.run(x.numpy()), 0, (h, w), h, w)
        assert len(got) == len(ref) > 0
        scale = torch.tensor([w, h, w, h], dtype=torch.float64)
        box_err = ((got.pred_boxes.tensor.double() - ref.pred_boxes.tensor.double()) / scale).abs().max()
        assert box_err <= 1e-4, (variant, (h, w), float(box_err))
        assert (got.scores.double() - ref.scores.double()).abs().max() <= 1e-4, (variant, (h, w))
        assert torch.equal(got.pred_classes, ref.pred_classes), (variant, (h, w))


def test_batch_is_dynamic_and_matches_each_image(tmp_path):
    cfg, model = tiny_model("smca_r50")
    predictor = OnnxPredictor(export_onnx(model, tmp_path / "m.onnx", cfg), cfg)
    x = torch.rand((3, 3, 70, 100), generator=torch.Generator().manual_seed(2)) * 255
    out = predictor.run(x.numpy())
    with torch.no_grad():
        ref = OnnxDetector(model)(x)
    assert out["boxes"].shape == (3, 12, 4)
    for a, b in zip(ref, (out["boxes"], out["scores"], out["labels"])):
        np.testing.assert_allclose(b, a.numpy(), atol=1e-3 if a.dtype == torch.float32 and a.dim() == 3 else 1e-5)


def test_graph_has_standard_operators_and_metadata(tmp_path):
    import onnx

    from smca_detr.export import OPSET

    cfg, model = tiny_model("deformable_detr_r50")
    proto = onnx.load(export_onnx(model, tmp_path / "m.onnx", cfg))
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    predictor = OnnxPredictor(tmp_path / "m.onnx")
    assert (predictor.input_format, predictor.min_size, predictor.max_size) == (
        cfg.INPUT.FORMAT, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)


def test_dcn_backbone_is_refused_with_the_reason(tmp_path):
    cfg = load_cfg(REPO + "/configs/deformable_detr_r101_dcn.yaml", TINY)
    model = build_model(cfg).eval()
    with pytest.raises(ExportError, match="deformable convolution"):
        export_onnx(model, tmp_path / "m.onnx", cfg)
    assert not (tmp_path / "m.onnx").exists()


def test_traceable_msda_equals_the_grid_sample_reference():
    from smca_detr.layers.msda import ms_deform_attn_pytorch
    from smca_detr.layers.msda.onnx_gather import ms_deform_attn_traceable

    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[5, 7], [3, 4], [1, 2]])
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    value = torch.randn(2, int(sizes.sum()), 3, 4, generator=g, dtype=torch.float64)
    loc = torch.rand(2, 6, 3, 3, 4, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3  # some outside the maps
    attn = torch.rand(2, 6, 3, 3, 4, generator=g, dtype=torch.float64)
    got = ms_deform_attn_traceable(value, shapes, starts, loc, attn)
    torch.testing.assert_close(got, ms_deform_attn_pytorch(value, shapes, starts, loc, attn), atol=1e-12, rtol=0)


def test_cli_exports_checks_and_refuses_dcn(tmp_path, capsys, tools_on_path):
    import export_onnx as tool

    opts = [str(v) for v in TINY] + ["MODEL.WEIGHTS", ""]
    assert tool.main(["--config-file", "smca_r50", "--output", str(tmp_path / "m.onnx"), "--check", *opts]) == 0
    out = capsys.readouterr().out
    worst = ast.literal_eval(out.split("largest differences:")[1].strip())  # the printed dict
    assert worst["boxes/size"] <= 1e-4 and worst["scores"] <= 1e-4 and worst["labels differ"] == 0
    assert tool.main(["--config-file", "deformable_detr_r101_dcn", "--output", str(tmp_path / "d.onnx"), *opts]) == 2
    assert "deformable convolution" in capsys.readouterr().err and not (tmp_path / "d.onnx").exists()
