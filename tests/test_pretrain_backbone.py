"""tools/pretrain_backbone.py and the backbone it shipped for the convergence study: the tool's output
loads through MODEL.WEIGHTS like an ImageNet backbone (every backbone tensor taken, FrozenBN included,
nothing outside the backbone), and the shipped file is small, classification-only and fits every
convergence config."""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "smca_detr" / "checkpoints" / "r18_slim_cls_synthetic.pth"
CONVERGENCE = ["detr", "smca", "smca_ms", "conditional", "deformable"]


def _tool():
    spec = importlib.util.spec_from_file_location("pretrain_backbone", REPO / "tools" / "pretrain_backbone.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _convergence_model(name, weights):
    from detectron2.modeling import build_model

    from smca_detr.checkpoint import SmcaDetrCheckpointer
    from smca_detr.model_zoo import get_config

    cfg = get_config(str(REPO / "configs" / "convergence" / f"{name}.yaml"), ["MODEL.WEIGHTS", str(weights)])
    torch.manual_seed(0)
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    SmcaDetrCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model, before


def _check_loaded(model, before, ckpt):
    state = model.state_dict()
    body = {k for k in state if k.startswith("backbone.body.")}
    assert set(ckpt) == body  # the checkpoint is exactly the backbone: nothing missing, nothing extra
    for k in body:
        assert torch.equal(state[k], ckpt[k].to(state[k].dtype)), k
    changed = {k for k in state if not torch.equal(state[k], before[k])}
    assert changed <= body and len(changed) > 0.9 * len(body)  # nothing outside the backbone was touched


@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "backbone.pth"
    meta = _tool().main(["--output", str(out), "--epochs", "1", "--batch-size", "16", "--max-images", "12",
                         "DATASETS.TRAIN", "('smca_synthetic_tiny_train',)"])
    return out, meta


def test_tool_output_loads_as_backbone_weights(tiny_pretrained):
    out, meta = tiny_pretrained
    saved = torch.load(out, map_location="cpu", weights_only=True)
    ckpt = saved["model"]
    assert all(k.startswith("backbone.body.") for k in ckpt)
    assert not any(k.endswith("num_batches_tracked") for k in ckpt)
    assert all(v.dtype == torch.float16 for v in ckpt.values() if v.is_floating_point())
    assert saved["meta"]["classes"][-1] == "background" and saved["meta"]["train_crops"] > 0
    assert 0.0 <= saved["meta"]["held_out_accuracy"] <= 1.0 and saved["meta"] == meta
    assert "--max-images 12" in meta["command"]
    # BN statistics of the classifier -> the detector's FrozenBN buffers
    assert any(k.endswith("norm.running_var") for k in ckpt)
    model, before = _convergence_model("detr", out)
    _check_loaded(model, before, ckpt)


def test_crops_are_labelled_and_held_out_by_image_id(tiny_pretrained):
    import numpy as np
    from detectron2.data import DatasetCatalog

    tool = _tool()
    from smca_detr.data import synthetic

    synthetic.ensure_synthetic("smca_synthetic_tiny_train", progress=False)
    dicts = sorted(DatasetCatalog.get("smca_synthetic_tiny_train"), key=lambda d: d["image_id"])[:12]
    xtr, ytr, xte, yte, bg = tool.make_crops(dicts, "RGB", 1, 32, np.random.default_rng(0))
    n_held = sum(len(d["annotations"]) for d in dicts if d["image_id"] % tool.HELD_OUT_MOD == 0)
    n_train = sum(len(d["annotations"]) for d in dicts if d["image_id"] % tool.HELD_OUT_MOD != 0)
    assert int((yte != bg).sum()) == n_held and int((ytr != bg).sum()) == n_train
    assert xtr.shape[1:] == (3, 32, 32) and xtr.dtype == torch.uint8
    assert bg == 1 + max(a["category_id"] for d in dicts for a in d["annotations"])


@pytest.mark.skipif(not SHIPPED.is_file(), reason="no shipped pretrained backbone")
@pytest.mark.parametrize("name", CONVERGENCE)
def test_shipped_backbone_fits_every_convergence_model(name):
    saved = torch.load(SHIPPED, map_location="cpu", weights_only=True)
    assert os.path.getsize(SHIPPED) <= 5_000_000
    meta = saved["meta"]
    assert meta["dataset"] == "smca_synthetic_train" and meta["held_out_accuracy"] > 0.9
    assert "pretrain_backbone.py" in meta["command"]
    model, before = _convergence_model(name, "smca_detr://r18_slim_cls_synthetic.pth")
    _check_loaded(model, before, saved["model"])
