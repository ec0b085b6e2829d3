"""The tools users reach for: model zoo API, official checkpoints through MODEL.WEIGHTS, the
eval-only benchmark report, the demo, the attention pictures and the training/inference benchmark.

Everything runs on CPU with tiny random-weight models (seconds each)."""
import argparse
import json
import logging
import os
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

import smca_detr  # noqa: F401
from parity_common import fixture_files, load_fixture
from smca_detr import model_zoo
from smca_detr.checkpoint import safe_torch_load
from smca_detr.checkpoint.common import rename_official_backbone_key
from smca_detr.checkpoint.official import OfficialCheckpointError, detect_official_format
from smca_detr.config import add_smca_detr_config
from smca_detr.checkpoint import SmcaDetrCheckpointer
from smca_detr.engine.report import REPORT_FIELDS, write_benchmark_report
from smca_detr.modeling.registry import TRANSFORMER_REGISTRY
from smca_detr.utils.visualize import attention_maps, grid_size, render_attention
from tool_helpers import DATA, REPO, TINY, VAL, load_tool as _load_tool, tiny_dataset  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

FAMILIES = {"smca": ("smca_r50", "SMCATransformer"),
            "conditional": ("conditional_detr_r50", "ConditionalTransformer"),
            "deformable": ("deformable_detr_r50", "DeformableTransformer")}


def _image(h=72, w=100, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 80, size=(h, w, 3), dtype=np.uint8)
    img[h // 4: h // 2, w // 5: w // 2] = (220, 60, 60)
    return img


# ------------------------------------------------------------------------------------ model zoo


def test_model_zoo_lists_and_builds_configs():
    names = model_zoo.list_configs()
    for expected in ("smca_r50", "smca_r50_conv_ms", "conditional_detr_r50", "deformable_detr_r50",
                     "demo/detr_r18_synthetic"):
        assert expected in names
    assert not any(Path(n).name.startswith("Base-") for n in names)
    path = model_zoo.get_config_file("smca_r50")
    assert os.path.isfile(path) and path.endswith("smca_r50.yaml")
    assert model_zoo.get_config_file("smca_r50.yaml") == path
    # packaged copy (setup.py package_data) resolves to the same files in a source checkout
    assert (Path(model_zoo.__file__).parent / "configs" / "Base-DETR.yaml").is_file()
    with pytest.raises(FileNotFoundError, match="available"):
        model_zoo.get_config_file("no_such_config")
    cfg = model_zoo.get_config("deformable_detr_r50")
    assert cfg.MODEL.SMCA_DETR.TRANSFORMER == "DeformableTransformer" and cfg.MODEL.SMCA_DETR.NUM_QUERIES == 300
    model = model_zoo.build_model_from_config("deformable_detr_r50", opts=TINY)
    assert not model.training and type(model.transformer).__name__ == "DeformableTransformer"
    assert model.cfg.MODEL.SMCA_DETR.HIDDEN_DIM == 32
    with torch.no_grad():
        out = model([{"image": torch.randint(0, 255, (3, 64, 80), dtype=torch.uint8), "height": 64, "width": 80}])
    assert out[0]["instances"].pred_boxes.tensor.shape == (100, 4)  # top-100 of 10 queries x 80 classes


# ------------------------------------------------------------------------- official checkpoints


def _official_backbone_key(ours: str) -> str:
    """Inverse of ``rename_official_backbone_key`` (detectron2 ResNet -> torchvision names)."""
    k = ours[len("backbone.body."):]
    k = re.sub(r"^stem\.conv1\.norm\.", "bn1.", k)
    k = re.sub(r"^stem\.conv1\.", "conv1.", k)
    k = re.sub(r"^res(\d)\.", lambda m: f"layer{int(m.group(1)) - 1}.", k)
    k = k.replace(".shortcut.norm.", ".downsample.1.").replace(".shortcut.", ".downsample.0.")
    k = re.sub(r"\.conv(\d)\.norm\.", r".bn\1.", k)
    official = "backbone.0.body." + k
    assert rename_official_backbone_key(official) == ours, (ours, official)
    return official


def _resnet_for_levels(cfg, strides, channels):
    """A tiny detectron2 R50 whose levels have the fixture's channels (res_k: RES2 * stride / 4)."""
    stage = {8: "res3", 16: "res4", 32: "res5"}
    r = cfg.MODEL.RESNETS
    cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    r.DEPTH, r.STEM_OUT_CHANNELS, r.WIDTH_PER_GROUP, r.NORM, r.RES5_DILATION = 50, 8, 2, "FrozenBN", 1
    r.RES2_OUT_CHANNELS = channels[0] * 4 // strides[0]
    assert all(r.RES2_OUT_CHANNELS * s // 4 == ch for s, ch in zip(strides, channels))
    r.OUT_FEATURES = [stage[s] for s in strides]
    cfg.MODEL.SMCA_DETR.IN_FEATURES = list(r.OUT_FEATURES)


def _cfg_from_fixture(kind, c, num_classes=None):
    cfg = add_smca_detr_config(get_cfg())
    m = cfg.MODEL.SMCA_DETR
    m.CLASS_LOSS = "focal"
    if kind.startswith("smca"):
        m.TRANSFORMER = "SMCAConvMultiScaleTransformer" if kind == "smca_conv_ms" else "SMCATransformer"
        m.HIDDEN_DIM, m.NHEADS = c["d_model"], c["nheads"]
        m.NUM_CLASSES = c["num_logits"]
        m.SMCA.DYNAMIC_SCALE, m.SMCA.SMOOTH = c["dynamic_scale"], c["smooth"]
        m.PRE_NORM = c["normalize_before"]
        levels = list(c["backbone_level_channels"])
        strides = list(c["feature_strides"][: len(levels)])
    else:
        m.TRANSFORMER = "ConditionalTransformer" if kind == "conditional" else "DeformableTransformer"
        m.HIDDEN_DIM, m.NHEADS = c["d_model"], c["nhead"]
        m.NUM_CLASSES = c["num_classes"]
        if kind == "conditional":
            levels, strides = [c["backbone_channels"]], [c["backbone_stride"]]
        else:
            levels, strides = list(c["backbone_channels"]), list(c["backbone_strides"])
            d = m.DEFORMABLE
            d.NUM_FEATURE_LEVELS, d.ENC_N_POINTS, d.DEC_N_POINTS = (c["num_feature_levels"], c["enc_n_points"],
                                                                    c["dec_n_points"])
            d.WITH_BOX_REFINE, d.TWO_STAGE = c["with_box_refine"], c["two_stage"]
            d.MSDA_IMPL = "pytorch"
    m.DIM_FEEDFORWARD = c["dim_feedforward"]
    m.ENC_LAYERS, m.DEC_LAYERS = c["num_encoder_layers"], c["num_decoder_layers"]
    m.NUM_QUERIES = c["num_queries"]
    if num_classes is not None:
        m.NUM_CLASSES = num_classes
    _resnet_for_levels(cfg, strides, levels)
    cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS = "cpu", ""
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), ()
    return cfg


OFFICIAL_CASES = {  # kind -> (fixture glob, manual converter, class rows of our model or None = fixture's)
    "smca": ("smca_single_type3.pt", 80),
    "smca_conv_ms": ("smca_multiscale_type3.pt", 80),
    "conditional": ("conditional_detr_small.pt", None),
    "deformable": ("deformable_detr_small_box_refine.pt", None),
}


def _manual_convert(kind, sd, coco):
    if kind.startswith("smca"):
        from smca_detr.checkpoint.smca import convert_official_smca

        return convert_official_smca(sd, keep_all_classes=not coco)
    if kind == "conditional":
        from smca_detr.checkpoint.conditional import convert_official_conditional_detr

        return convert_official_conditional_detr(sd, keep_all_classes=not coco)
    from smca_detr.checkpoint.deformable import convert_official_deformable_detr

    return convert_official_deformable_detr(sd, keep_all_classes=not coco)


def _fake_official(kind, tmp_path, num_classes=None):
    """(cfg, path of a fake official checkpoint, its state dict): official transformer/head keys of a
    parity fixture + an official-named random backbone, saved as {"model", "args"}."""
    pattern, rows = OFFICIAL_CASES[kind]
    files = fixture_files(pattern)
    if not files:
        pytest.skip(f"no parity fixture {pattern}")
    fx = load_fixture(files[0])
    cfg = _cfg_from_fixture(kind, fx["config"], num_classes if num_classes is not None else rows)
    if cfg.MODEL.SMCA_DETR.TRANSFORMER not in TRANSFORMER_REGISTRY:
        pytest.skip(f"{cfg.MODEL.SMCA_DETR.TRANSFORMER} is not registered yet")
    torch.manual_seed(0)
    template = build_model(cfg)
    sd = dict(fx["state_dict"])
    g = torch.Generator().manual_seed(1)
    for k, v in template.state_dict().items():
        if k.startswith("backbone."):
            if "running_var" in k:
                value = torch.rand(v.shape, generator=g) + 0.5
            else:
                value = torch.randn(v.shape, generator=g) * 0.1
            sd[_official_backbone_key(k)] = value
    path = tmp_path / f"official_{kind}.pth"
    torch.save({"model": sd, "args": argparse.Namespace(epochs=50, lr=1e-4), "epoch": 49}, path)
    return cfg, path, sd


@pytest.fixture
def _propagate(monkeypatch):
    """detectron2's setup_logger turns propagation off; caplog needs it."""
    for name in ("fvcore", "detectron2", "smca_detr"):
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)


def _run(model, image):
    with torch.no_grad():
        inst = model([{"image": torch.as_tensor(image.transpose(2, 0, 1).copy()), "height": 72, "width": 100}])
    return inst[0]["instances"]


@pytest.mark.parametrize("kind", list(OFFICIAL_CASES))
def test_official_checkpoint_through_model_weights(kind, tmp_path, caplog, _propagate):
    cfg, path, sd = _fake_official(kind, tmp_path)
    assert detect_official_format(safe_torch_load(path)) is not None
    cfg.MODEL.WEIGHTS = str(path)
    torch.manual_seed(0)
    ours = build_model(cfg).eval()
    caplog.set_level(logging.INFO)
    SmcaDetrCheckpointer(ours, save_dir=str(tmp_path)).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    info = [r.getMessage() for r in caplog.records if "Detected an official" in r.getMessage()]
    assert len(info) == 1 and f"converted {len(sd)} keys" in info[0], info
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    torch.manual_seed(1)
    by_hand = build_model(cfg).eval()
    coco = OFFICIAL_CASES[kind][1] == 80
    by_hand.load_state_dict(_manual_convert(kind, sd, coco), strict=True)
    a, b = ours.state_dict(), by_hand.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    image = _image()
    ra, rb = _run(ours, image), _run(by_hand, image)
    assert torch.equal(ra.pred_boxes.tensor, rb.pred_boxes.tensor) and torch.equal(ra.scores, rb.scores)
    assert torch.equal(ra.pred_classes, rb.pred_classes)


def test_official_class_count_mismatch_skips_head_with_one_warning(tmp_path, caplog, _propagate):
    cfg, path, sd = _fake_official("smca", tmp_path, num_classes=12)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    caplog.set_level(logging.INFO)
    SmcaDetrCheckpointer(model).load(str(path))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "class head NOT loaded" in warnings[0] and "92" in warnings[0], warnings
    from smca_detr.checkpoint.smca import convert_official_smca

    expected = convert_official_smca(sd, keep_all_classes=True)
    for k, v in model.state_dict().items():
        if k.startswith("heads.class_embed."):
            assert torch.equal(v, init[k]), k  # initialisation kept
        else:
            assert torch.equal(v, expected[k]), k


def test_official_checkpoint_of_another_config_is_refused(tmp_path):
    cfg, path, _ = _fake_official("conditional", tmp_path)
    # a download without a .pth suffix (URL basename) is recognised as well
    plain = tmp_path / "download"
    plain.write_bytes(path.read_bytes())
    assert "__official_format__" in SmcaDetrCheckpointer(build_model(cfg)).load(str(plain))
    cfg.MODEL.SMCA_DETR.DEC_LAYERS += 1
    model = build_model(cfg)
    with pytest.raises(OfficialCheckpointError, match="does not fit the model"):
        SmcaDetrCheckpointer(model).load(str(path))
    # our own checkpoints are not mistaken for official ones
    assert detect_official_format({"model": model.state_dict()}) is None


def _parse_key_listing(path):
    """``{section: {official key: shape}}`` of a ``keys/*.txt`` listing of a full-size official model
    (later sections may be given as differences to an earlier one: ``# vs <base>: removed [...]``)."""
    import ast

    sections, current = {}, None
    for line in open(path):
        line = line.rstrip("\n")
        m = (re.match(r"^# (\w+): \d+ state_dict entries", line)
             or re.match(r"^# official state_dict of (\S+):", line))
        if m:
            current = sections.setdefault(m.group(1), {})
            continue
        if line.startswith("# vs "):
            current.update(sections[line.split()[2].rstrip(":")])
            removed = re.search(r"removed (\[.*?\])", line)
            for k in ast.literal_eval(removed.group(1)) if removed else []:
                current.pop(k)
            continue
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split("\t")[:2]
        current[key] = ast.literal_eval(shape)
    return sections


FULL_SIZE = [  # (key listing, section, shipped config)
    ("conditional_detr_full_model_keys.txt", "R50", "conditional_detr_r50"),
    ("deformable_detr_full_model_keys.txt", "plain", "deformable_detr_r50"),
    ("deformable_detr_full_model_keys.txt", "box_refine", "deformable_detr_r50_refine"),
    ("deformable_detr_full_model_keys.txt", "two_stage", "deformable_detr_r50_two_stage"),
    ("smca_official_keys_multi_scale_r50_type3.txt", "multi_scale_r50_type3", "smca_r50_conv_ms"),
    ("smca_official_keys_single_scale_r50_type3.txt", "single_scale_r50_type3", "smca_r50"),
]


@pytest.mark.parametrize("listing,section,config", FULL_SIZE, ids=[c for _, _, c in FULL_SIZE])
def test_shipped_config_loads_full_size_official_checkpoint(listing, section, config):
    """Every key / shape of the full-size official model converts onto the shipped config's model
    (strict), the 91/92 COCO class rows are remapped to 80. The model is built on the meta device
    (shapes only, no memory, no init time)."""
    from detectron2.modeling import META_ARCH_REGISTRY

    from smca_detr.checkpoint.official import convert_official_checkpoint
    from parity_common import parity_dir

    path = parity_dir() / "keys" / listing
    if not path.is_file():
        pytest.skip(f"no key listing {path}")
    shapes = _parse_key_listing(path)[section]
    official = {k: torch.zeros(s) for k, s in shapes.items()}  # tied official keys must hold equal values
    cfg = model_zoo.get_config(config, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    with torch.device("meta"):
        model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
    converted, info = convert_official_checkpoint({"model": official, "args": argparse.Namespace()},
                                                  model.state_dict())
    assert info["class_head"] == "remapped" and info["num_keys"] == len(official)
    target = model.state_dict()
    assert converted.keys() == target.keys()
    assert all(converted[k].shape == target[k].shape for k in target)
    assert converted["heads.class_embed.bias" if "heads.class_embed.bias" in target
                     else "heads.class_embed.0.bias"].shape == (80,)


# ------------------------------------------------------------------------------------- reports


def test_eval_only_writes_benchmark_report(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("SMCA_DETR_REPORT_IMAGES", "1")
    monkeypatch.setenv("SMCA_DETR_REPORT_WARMUP", "1")
    train_net = _load_tool("train_net")
    from detectron2.engine import default_argument_parser

    args = default_argument_parser().parse_args(
        ["--config-file", model_zoo.get_config_file("deformable_detr_r50"), "--eval-only",
         *TINY, *DATA, "OUTPUT_DIR", str(tmp_path),
         # 96 px: the stride-64 extra level is 2x2 (GroupNorm(32, 32) needs more than one value per group)
         "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128"])
    res = train_net.main(args)
    assert "bbox" in res
    with open(tmp_path / "inference" / "benchmark_report.json") as f:
        report = json.load(f)
    assert set(REPORT_FIELDS) <= set(report)
    assert report["transformer"] == "DeformableTransformer" and report["dataset"] == VAL
    assert report["ms_per_image"] > 0 and report["images_per_s"] > 0
    assert report["params"] > 0 and report["gflops"] > 0
    assert report["gflops_by_operator"]["ms_deform_attn"] > 0  # the deformable attention is counted
    assert report["peak_memory_mb"] >= 0 and report["memory_method"].startswith("cpu")
    assert report["num_images_timed"] == 1 and report["flops_input_hw"] == [96, 96]


def test_eval_report_table_for_several_models(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("SMCA_DETR_REPORT_IMAGES", "1")
    monkeypatch.setenv("SMCA_DETR_REPORT_WARMUP", "1")
    tool = _load_tool("eval_report_table")
    runs, cfgs = [], {"SMCA": "smca_r50", "Conditional": "conditional_detr_r50"}
    for label, name in cfgs.items():
        model = model_zoo.build_model_from_config(name, opts=TINY + DATA)
        ckpt_dir = tmp_path / label
        ckpt_dir.mkdir()
        torch.save({"model": model.state_dict()}, ckpt_dir / "model_0000009.pth")
        (ckpt_dir / "last_checkpoint").write_text("model_0000009.pth")  # a directory resolves to it
        runs.append(f"{label}={model_zoo.get_config_file(name)}={ckpt_dir}")
    out = tmp_path / "table.md"
    assert tool.main(runs + ["--output", str(out), "--work-dir", str(tmp_path / "work"), "--", *TINY, *DATA]) == 0
    rows = json.loads((tmp_path / "table.json").read_text())
    assert [r["label"] for r in rows] == list(cfgs)
    for r in rows:
        assert r["weights"].endswith("model_0000009.pth") and r["dataset"] == VAL
        assert 0 <= r["AP"] <= 100 and r["ms_per_image"] > 0 and r["params_m"] > 0 and r["gflops"] > 0
    text = out.read_text()
    assert text.count("\n| SMCA |") == 1 and "| Conditional |" in text
    with pytest.raises(SystemExit):
        tool.main(["no-equals-sign", "--output", str(out)])


def test_report_counts_dense_attention(tmp_path):
    model = model_zoo.build_model_from_config("smca_r50", opts=TINY)
    batches = [[{"image": torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8), "height": 64, "width": 96}]] * 2
    report = write_benchmark_report(model.cfg, model, str(tmp_path), data_loader=batches, num_images=1,
                                    num_warmup=1, progress=False)
    assert os.path.isfile(tmp_path / "benchmark_report.json")
    assert report["gflops_by_operator"]["scaled_dot_product_attention"] > 0
    assert "ms_deform_attn" not in report["gflops_by_operator"]


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


# ------------------------------------------------------------------------------- converter CLI


def _fake_conditional_checkpoint(path, rows=91):
    """An official-looking Conditional DETR file: class head (row i filled with i) + one backbone key."""
    sd = {"class_embed.weight": torch.arange(float(rows)).repeat_interleave(4).view(rows, 4),
          "class_embed.bias": torch.arange(float(rows)),
          "backbone.0.body.conv1.weight": torch.ones(8, 3, 7, 7)}
    torch.save({"model": sd, "args": argparse.Namespace(lr=1e-4), "epoch": 3}, path)
    return sd


def test_converter_cli_helper(tmp_path, capsys):
    from smca_detr.checkpoint.cli import build_parser, run_converter
    from smca_detr.checkpoint.common import coco_official_columns
    from smca_detr.checkpoint.conditional import convert_official_conditional_detr

    src, dst = tmp_path / "official.pth", tmp_path / "new" / "ours.pth"
    _fake_conditional_checkpoint(src)
    assert run_converter("conditional", convert_official_conditional_detr, [str(src), str(dst)]) == 0
    out = safe_torch_load(dst)
    assert out["__author__"] == "smca_detr convert_conditional_detr" and out["matching_heuristics"] is False
    assert list(out["model"]) == ["heads.class_embed.weight", "heads.class_embed.bias",
                                  "backbone.body.stem.conv1.weight"]
    assert out["model"]["heads.class_embed.bias"].tolist() == [float(c) for c in coco_official_columns()]
    assert capsys.readouterr().out.strip() == f"wrote {dst}: 3 tensors, 80 class logits"

    # the tool is a thin wrapper with the same command line; a small head needs --keep-all-classes
    tool = _load_tool("convert_conditional_detr")
    small, dst2 = tmp_path / "small.pth", tmp_path / "small_out.pth"
    _fake_conditional_checkpoint(small, rows=12)
    with pytest.raises(ValueError, match="91-row head"):
        tool.main([str(small), str(dst2)])
    assert not dst2.exists()
    assert tool.main([str(small), str(dst2), "--keep-all-classes"]) == 0
    assert safe_torch_load(dst2)["model"]["heads.class_embed.weight"].shape == (12, 4)
    with pytest.raises(KeyError, match="unknown converter family"):
        run_converter("detr", convert_official_conditional_detr, [str(src), str(dst)])

    # per-family options: --config/--opts verify (conditional, deformable), --kind (smca)
    def options(family):
        return {o for a in build_parser(family)._actions for o in a.option_strings}

    assert {"--keep-all-classes", "--config", "--opts"} <= options("deformable") and "--kind" not in options("deformable")
    assert "--kind" in options("smca") and "--config" not in options("smca")


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
