"""tools/gpu_check.py without a GPU: it refuses to run, its tables, and its CPU dry run (the same
sections at tiny sizes)."""
import json
import os

import torch

from tool_helpers import load_tool


def _tool():
    return load_tool("gpu_check")


def test_without_cuda_it_says_so_and_fails(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _tool().main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "--dry-run" in err, err
    assert os.listdir(tmp_path) == []


def test_tables_and_pytest_summary():
    gc = _tool()
    rows = [{"config": "a", "ms": 1.23456, "finite": True}, {"config": "b|c", "error": "x\ny", "ms": float("nan")}]
    assert gc.markdown_table(rows) == ("| config | ms | finite | error |\n|---|---|---|---|\n"
                                       "| a | 1.235 | yes | - |\n| b\\|c | nan | - | x y |\n")
    assert gc.markdown_table([]) == "(nothing measured)\n"
    assert [gc.row_failed(r) for r in rows + [{"finite": False}, {"failed": 2}, {"skipped": "time limit"}]] == [
        False, True, True, True, False]
    out = "....\nFAILED tests/x.py::t - 2 passed\n1 failed, 3 passed, 2 skipped, 7 deselected in 1.20s\n"
    assert gc.parse_pytest_summary(out) == {"passed": 3, "failed": 1, "errors": 0, "skipped": 2, "deselected": 7}
    assert gc.parse_pytest_summary("2 errors in 0.1s") == {"passed": 0, "failed": 0, "errors": 2, "skipped": 0,
                                                           "deselected": 0}


def test_dry_run_on_cpu(tmp_path):
    gc = _tool()
    out = tmp_path / "report"
    rc = gc.main(["--dry-run", "--out", str(out), "--sections", "msda", "models", "dcn", "train_net",
                  "--configs", "deformable_detr_r50"])
    res = json.loads((out / "gpu_check.json").read_text())
    assert rc == 0 and res["ok"] is True, json.dumps(res, indent=1)[-3000:]
    assert res["dry_run"] is True and res["environment"]["device"].startswith("cpu")
    sec = res["sections"]
    assert list(sec) == ["msda", "models", "dcn", "train_net"]
    (msda,) = sec["msda"]["rows"]  # CPU: the PyTorch path only, batch 2, the tiny levels
    assert (msda["impl"], msda["batch"], msda["queries"]) == ("pytorch", 2, 8 * 12 + 4 * 6 + 2 * 3 + 1 * 2)
    assert msda["fwd_ms"] > 0 and msda["fwd_bwd_ms"] > 0 and msda["max_abs_diff_vs_pytorch"] == 0
    models = sec["models"]["rows"]
    assert [(r["step"], r["precision"]) for r in models] == [
        ("train batch 2", "fp32"), ("train batch 2", "bf16"), ("inference batch 1", "fp32"),
        ("inference batch 1", "bf16")]
    assert all(r["config"] == "deformable_detr_r50" and r["ms"] > 0 and "error" not in r for r in models)
    assert all(r["finite"] is True and r["loss"] > 0 for r in models[:2])
    assert sec["dcn"]["rows"] == [{"config": "deformable_detr_r101_dcn",
                                   "skipped": "detectron2's deformable convolution runs on CUDA only"}]
    (tn,) = sec["train_net"]["rows"]
    assert tn["iterations"] == 2 and "error" not in tn, (tn, res.get("train_net_tail"))
    assert 0 <= tn["AP"] <= 100 and tn["train_s"] > 0 and tn["eval_s"] > 0
    assert tn["syncs_per_iter_first"] is None and res["train_net_syncs"] == [None, None]  # counted on CUDA only
    md = (out / "gpu_check.md").read_text()
    for part in ("(dry run)", "## msda", "## models", "| deformable_detr_r50 | train batch 2 | fp32 |", "## train_net"):
        assert part in md, (part, md)
