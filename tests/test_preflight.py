"""train_net.py's first contact on a machine without a GPU or without COCO: one line per missing
thing, naming the option that fixes it, and no traceback (smca_detr/engine/preflight.py)."""
import os
import subprocess
import sys

import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog

from smca_detr.config import add_smca_detr_config
from smca_detr.engine import preflight

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(*opts):
    cfg = get_cfg()
    add_smca_detr_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, preflight.DEMO_CONFIG))
    cfg.merge_from_list(list(opts))
    return cfg


def test_train_net_without_gpu_and_coco_says_so_in_one_line_each(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", DETECTRON2_DATASETS=str(tmp_path),
               PYTHONPATH=os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    # the README's first command, as a user without a GPU and without COCO types it
    proc = subprocess.run([sys.executable, "train_net.py", "--config-file", "configs/smca_r50.yaml", "--num-gpus", "1",
                           "OUTPUT_DIR", str(tmp_path / "out")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train_net.py:")]
    assert len(lines) == 2, proc.stderr[-3000:]
    device, data = lines
    assert "MODEL.DEVICE is 'cuda'" in device and "'MODEL.DEVICE cpu'" in device, device
    for part in ("'coco_2017_train'", "'coco_2017_val'", "coco/annotations/instances_train2017.json",
                 f"DETECTRON2_DATASETS={str(tmp_path)!r}", preflight.DEMO_CONFIG):
        assert part in data, (part, data)
    assert not os.path.exists(tmp_path / "out")  # stopped before default_setup wrote anything


def test_preflight_rules(monkeypatch, tmp_path):
    assert preflight.problems(_cfg()) == []  # the embedded dataset on the CPU: nothing to report
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert preflight.problems(_cfg("MODEL.DEVICE", "cuda:1")) == []
    (msg,) = preflight.problems(_cfg("MODEL.DEVICE", "cuda:2"))
    assert "'cuda:2'" in msg and "2 CUDA device(s)" in msg, msg
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (msg,) = preflight.problems(_cfg("MODEL.DEVICE", "cuda"))
    assert "MODEL.DEVICE cpu" in msg, msg

    # a dataset registered by the user with a missing file; eval-only runs do not need DATASETS.TRAIN
    name = "preflight_test_missing"
    missing = str(tmp_path / "nowhere" / "train.json")
    DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).set(json_file=missing, image_root=str(tmp_path))
    try:
        cfg = _cfg("DATASETS.TRAIN", f"('{name}',)")
        (msg,) = preflight.problems(cfg)
        assert msg.startswith(f"DATASETS.TRAIN '{name}' needs {missing}, which does not exist"), msg
        assert preflight.problems(cfg, eval_only=True) == []
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
