"""The eval-only benchmark report (smca_detr.engine.report through ``train_net.py --eval-only``) and
the table of several models (tools/eval_report_table.py), on CPU with tiny random-weight models."""
import json
import os

import pytest
import torch

import smca_detr  # noqa: F401
from smca_detr import model_zoo
from smca_detr.engine.report import REPORT_FIELDS, write_benchmark_report
from tool_helpers import DATA, TINY, VAL, load_tool as _load_tool, tiny_dataset  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

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
