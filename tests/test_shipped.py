"""Checkpoints shipped in the package (``smca_detr://``) and the exporter that makes them."""
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from smca_detr.checkpoint import shipped
from smca_detr.checkpoint.shipped import PREFIX, export_for_shipping
from smca_detr.config import add_smca_detr_config
from smca_detr.checkpoint import SmcaDetrCheckpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "configs", "demo", "smca_r18_slim_synthetic.yaml")
FINETUNE = os.path.join(REPO, "configs", "demo", "smca_r18_slim_finetune.yaml")
TINY = ["MODEL.SMCA_DETR.HIDDEN_DIM", 32, "MODEL.SMCA_DETR.DIM_FEEDFORWARD", 32, "MODEL.SMCA_DETR.ENC_LAYERS", 1,
        "MODEL.SMCA_DETR.DEC_LAYERS", 1, "MODEL.RESNETS.STEM_OUT_CHANNELS", 8, "MODEL.RESNETS.RES2_OUT_CHANNELS", 8]


def _cfg(path, opts=()):
    cfg = add_smca_detr_config(get_cfg())
    cfg.merge_from_file(path)
    cfg.merge_from_list(list(opts))
    return cfg


def test_export_keeps_weights_only_as_float16():
    ckpt = {"model": {"w": torch.tensor([1.0, -2.5, 1e-3], dtype=torch.float32),
                      "n": torch.tensor(7, dtype=torch.int64)},
            "optimizer": {"state": {}}, "iteration": 99}
    out = export_for_shipping(ckpt, {"AP": "51.0"})
    assert set(out) == {"model", "meta"} and out["meta"] == {"AP": "51.0"}
    assert out["model"]["w"].dtype == torch.float16 and out["model"]["n"].dtype == torch.int64
    assert torch.equal(out["model"]["w"], ckpt["model"]["w"].half())
    with pytest.raises(ValueError, match="big"):
        export_for_shipping({"big": torch.tensor([1e6])})


def test_prefix_resolves_in_the_package_folder_only(tmp_path, monkeypatch):
    from detectron2.utils.file_io import PathManager

    monkeypatch.setattr(shipped, "SHIPPED_DIR", str(tmp_path))
    (tmp_path / "a.pth").write_bytes(b"x")
    assert PathManager.get_local_path(PREFIX + "a.pth") == str(tmp_path / "a.pth")
    assert PathManager.isfile(PREFIX + "a.pth") and not PathManager.isfile(PREFIX + "b.pth")
    with pytest.raises(FileNotFoundError, match=r"b\.pth.*a\.pth"):
        PathManager.get_local_path(PREFIX + "b.pth")
    with pytest.raises(ValueError, match="file name"):
        PathManager.get_local_path(PREFIX + "../setup.py")


def test_model_weights_loads_a_shipped_float16_checkpoint(tmp_path, monkeypatch):
    cfg = _cfg(RECIPE, TINY)
    torch.manual_seed(0)
    src = build_model(cfg)
    torch.save(export_for_shipping({"model": src.state_dict()}), tmp_path / "tiny.pth")
    monkeypatch.setattr(shipped, "SHIPPED_DIR", str(tmp_path))
    torch.manual_seed(1)
    dst = build_model(cfg)
    SmcaDetrCheckpointer(dst).load(PREFIX + "tiny.pth")
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        expected = a.half().to(a.dtype) if a.is_floating_point() else a
        assert b.dtype == a.dtype and torch.equal(b, expected), k


SHIPPED = os.path.join(shipped.SHIPPED_DIR, "smca_r18_slim_synthetic.pth")


@pytest.mark.skipif(not os.path.isfile(SHIPPED), reason="the shipped SMCA checkpoint is not in this checkout")
def test_shipped_smca_checkpoint_gives_its_recorded_ap_on_synthetic_val(tmp_path):
    """The AP that README and the checkpoint's metadata state, re-measured on smca_synthetic_val."""
    from smca_detr.checkpoint import safe_torch_load
    from smca_detr.data import ensure_synthetic
    from smca_detr.engine import Trainer

    assert os.path.getsize(SHIPPED) <= 20 * 2 ** 20
    meta = safe_torch_load(SHIPPED, map_location="cpu")["meta"]
    cfg = _cfg(FINETUNE, ["OUTPUT_DIR", str(tmp_path)])
    assert cfg.MODEL.WEIGHTS == PREFIX + "smca_r18_slim_synthetic.pth"
    ensure_synthetic("smca_synthetic_val")
    model = build_model(cfg)
    SmcaDetrCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    bbox = Trainer.test(cfg, model)["bbox"]
    # recorded with the float32 weights before the float16 export: allow the rounding's effect
    assert abs(bbox["AP"] - float(meta["AP"])) <= 0.5, (bbox, meta)
    assert abs(bbox["AP50"] - float(meta["AP50"])) <= 1.0, (bbox, meta)
