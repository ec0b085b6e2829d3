"""Every shipped YAML loads with detectron2's config system + add_smca_detr_config and builds its
model at full size (no weights loaded); bad values fail at build time naming the key; the model zoo
API lists, finds and builds the shipped configs.

Variant-specific config checks are in the family's test file (test_smca.py, test_smca_multiscale.py,
test_conditional.py, test_deformable.py)."""
import os
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from smca_detr import add_smca_detr_config, model_zoo
from smca_detr.engine import Trainer
from tool_helpers import TINY
from train_step_helpers import make_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(p for p in CONFIG_DIR.rglob("*.yaml") if not p.name.startswith("Base-"))


def load_cfg(path, opts=()):
    cfg = get_cfg()
    add_smca_detr_config(cfg)
    cfg.merge_from_file(str(path))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def test_configs_exist():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(CONFIG_DIR)) for p in CONFIGS])
def test_config_loads_and_builds(path):
    cfg = load_cfg(path)
    assert cfg.MODEL.META_ARCHITECTURE == "SmcaDetrDetector"
    assert cfg.SOLVER.MAX_ITER > 0 and all(s < cfg.SOLVER.MAX_ITER for s in cfg.SOLVER.STEPS)
    torch.manual_seed(0)
    model = build_model(cfg)
    c = cfg.MODEL.SMCA_DETR
    n_logits = model.heads.class_head(0).out_features
    assert n_logits == (c.NUM_CLASSES if c.CLASS_LOSS == "focal" else c.NUM_CLASSES + 1)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_unknown_key_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  SMCA_DETR:\n    HIDEN_DIM: 4\n")
    with pytest.raises(KeyError, match="HIDEN_DIM"):
        load_cfg(bad)


@pytest.mark.parametrize("opts,match", [
    (["MODEL.SMCA_DETR.TRANSFORMER", "NoSuchTransformer"], "MODEL.SMCA_DETR.TRANSFORMER"),
    (["MODEL.SMCA_DETR.NHEADS", 7], "NHEADS"),
    (["MODEL.SMCA_DETR.CLASS_LOSS", "hinge"], "CLASS_LOSS"),
    (["MODEL.SMCA_DETR.IN_FEATURES", ["res9"]], "IN_FEATURES"),
])
def test_bad_config_values_fail_at_build_time_naming_the_key(opts, match):
    cfg = load_cfg(CONFIG_DIR / "demo" / "detr_r18_synthetic.yaml", opts)
    with pytest.raises((ValueError, KeyError), match=match):
        build_model(cfg)


# ------------------------------------------------------------------ checks at build time


@pytest.mark.parametrize("family,features", [("SMCAMultiScaleTransformer", "['res5','res4']"),
                                             ("DeformableTransformer", "['res5','res4','res3']")])
def test_in_features_coarse_first_fail_at_build_time(family, features):
    cfg = make_cfg(["MODEL.SMCA_DETR.IN_FEATURES", features], family=family)
    with pytest.raises(ValueError, match=r"MODEL\.SMCA_DETR\.IN_FEATURES.*finest first"):
        Trainer.build_model(cfg)


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
