"""Smoke test of tools/convergence.py on the tiny synthetic splits: two models (DETR with two seeds),
4 iterations, an evaluation every 2, tiny transformer and inputs, the shipped pretrained backbone.
A first piece with a tiny --max-hours trains exactly one chunk; the second is interrupted before the
last chunk of the second model, the third resumes it from its checkpoint; then curves.json (with the
three pieces), curves.png and table.md are checked, and a fourth run with the same settings must skip
every finished run."""
import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "DATASETS.TRAIN", "('smca_synthetic_tiny_train',)", "DATASETS.TEST", "('smca_synthetic_tiny_val',)",
    "SOLVER.IMS_PER_BATCH", "2",
    "MODEL.SMCA_DETR.HIDDEN_DIM", "32", "MODEL.SMCA_DETR.NHEADS", "4", "MODEL.SMCA_DETR.DIM_FEEDFORWARD", "64",
    "MODEL.SMCA_DETR.NUM_QUERIES", "10",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "96",
]
MODELS = ["detr", "smca_ms", "detr@7"]


def _load_tool():
    spec = importlib.util.spec_from_file_location("convergence_tool", REPO / "tools" / "convergence.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tool = _load_tool()
    tmp = tmp_path_factory.mktemp("convergence")
    argv = ["--models", ",".join(MODELS), "--max-iter", "4", "--eval-every", "2", "--eval-images", "4",
            "--thresholds", "0,50", "--output", str(tmp / "out"), "--work-dir", str(tmp / "work"), *TINY]

    # piece 1: the time limit stops it after its first chunk (detr -> 2)
    assert tool.main(["--max-hours", "1e-9"] + argv) == 0
    first = json.loads((tmp / "out" / "curves.json").read_text())
    assert [p["iteration"] for p in first["models"]["detr"]["points"]] == [2]
    assert not first["models"]["smca_ms"]["points"]
    assert [(pc["stopped"], pc["chunks"]) for pc in first["pieces"]] == [("time limit", ["detr: 0 -> 2"])]

    # piece 2: interleaved order smca_ms->2, detr@7->2, detr->4, then "killed" before smca_ms trains to 4
    real_chunk = tool.train_chunk

    def interrupted_chunk(args, name, eval_dataset, until, *rest, **kw):
        if (name, until) == (MODELS[1], 4):
            raise _Interrupt()
        return real_chunk(args, name, eval_dataset, until, *rest, **kw)

    tool.train_chunk = interrupted_chunk
    try:
        with pytest.raises(_Interrupt):
            tool.main(argv)
    finally:
        tool.train_chunk = real_chunk
    partial = json.loads((tmp / "out" / "curves.json").read_text())["models"]
    assert partial[MODELS[0]]["complete"] and [p["iteration"] for p in partial[MODELS[0]]["points"]] == [2, 4]
    assert not partial[MODELS[1]]["complete"] and [p["iteration"] for p in partial[MODELS[1]]["points"]] == [2]
    assert [p["iteration"] for p in partial["detr@7"]["points"]] == [2]

    # piece 3: finishes smca_ms and detr@7 from their iteration-2 checkpoints, leaves detr alone
    calls = []

    def recording_chunk(args, name, eval_dataset, until, on_point, last_point=None, *rest, **kw):
        calls.append((name, until, None if last_point is None else last_point["iteration"]))
        return real_chunk(args, name, eval_dataset, until, on_point, last_point, *rest, **kw)

    tool.train_chunk = recording_chunk
    try:
        assert tool.main(argv) == 0
    finally:
        tool.train_chunk = real_chunk
    assert calls == [(MODELS[1], 4, 2), ("detr@7", 4, 2)]
    data = json.loads((tmp / "out" / "curves.json").read_text())
    assert [pc["stopped"] for pc in data["pieces"]] == ["time limit", "interrupted", "done"]
    assert data["pieces"][2]["chunks"] == ["smca_ms: 2 -> 4", "detr@7: 2 -> 4"]
    final = data["models"]
    assert final[MODELS[0]] == partial[MODELS[0]]
    assert final[MODELS[1]]["points"][0] == partial[MODELS[1]]["points"][0]
    return tool, tmp / "out", argv


def test_curves_json(study):
    _, out, _ = study
    data = json.loads((out / "curves.json").read_text())
    assert data["version"] == 1
    s = data["settings"]
    assert (s["max_iter"], s["eval_every"], s["eval_images"]) == (4, 2, 4)
    assert s["train_dataset"] == "smca_synthetic_tiny_train" and s["val_dataset"] == "smca_synthetic_tiny_val"
    assert data["hardware"]["cpu_count"] >= 1
    assert set(data["models"]) == set(MODELS)
    assert data["models"]["detr"]["settings"]["seed"] == 42 and data["models"]["detr@7"]["settings"]["seed"] == 7
    # another seed: other initial weights of the transformer, so other losses
    assert data["models"]["detr"]["points"][0]["total_loss"] != data["models"]["detr@7"]["points"][0]["total_loss"]
    for name in MODELS:
        e = data["models"][name]
        model = name.partition("@")[0]
        assert e["complete"] is True and e["params"] > 0 and e["config"] == f"configs/convergence/{model}.yaml"
        its = [p["iteration"] for p in e["points"]]
        assert its == [2, 4]  # every 2 iterations, the last one at max_iter
        assert all(a < b for a, b in zip(its, its[1:]))
        walls = [p["wall_s"] for p in e["points"]]
        assert all(w >= 0 for w in walls) and walls == sorted(walls)
        for p in e["points"]:
            for k in ("AP", "AP50", "AP75"):
                assert isinstance(p[k], float) and 0.0 <= p[k] <= 100.0, (name, p)
            assert p["total_loss"] is not None and p["total_loss"] > 0
            assert p["elapsed_s"] >= p["wall_s"]


def test_png_and_table(study):
    _, out, _ = study
    png = out / "curves.png"
    assert png.is_file() and png.stat().st_size > 10_000
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] >= 800 and im.size[1] >= 300
    table = (out / "table.md").read_text()
    rows = [l for l in table.splitlines() if l.startswith("| ")]
    for label in ("DETR", "SMCA (multi scale)", "DETR (seed 7)"):
        model_rows = [r for r in rows if r.startswith(f"| {label} |")]
        assert len(model_rows) == 2  # AP/AP50 table and the threshold table
    assert "| model | it 2 | it 4 |" in table
    assert "AP50 ≥ 0" in table and "AP50 ≥ 50" in table
    # every model reaches AP50 >= 0 at its first evaluation
    assert table.count("it 2 (") == 3
    assert "Is the papers' ordering reproduced?" in table
    assert "initialised from `smca_detr://r18_slim_cls_synthetic.pth`" in table
    assert "## Spread between seeds (final AP)" in table and "- DETR: seed 7 AP" in table
    assert "## Pieces" in table and "time limit: detr: 0 -> 2" in table


def test_rerun_skips_complete_models(study):
    tool, out, argv = study
    before = json.loads((out / "curves.json").read_text())["models"]
    assert tool.main(argv) == 0
    after = json.loads((out / "curves.json").read_text())["models"]
    assert after == before  # nothing re-trained: same points, same timings


def test_replot_from_json(study):
    tool, out, _ = study
    (out / "curves.png").unlink()
    (out / "table.md").unlink()
    assert tool.main(["--replot", "--output", str(out)]) == 0
    assert (out / "curves.png").stat().st_size > 10_000
    assert "| DETR |" in (out / "table.md").read_text()


def test_merge_runs_trained_in_parallel(study, tmp_path):
    tool, out, _ = study
    data = json.loads((out / "curves.json").read_text())
    for group, runs in (("a", ["detr", "detr@7"]), ("b", ["smca_ms"])):
        part = dict(data, models={r: data["models"][r] for r in runs}, pieces=data["pieces"][:1])
        (tmp_path / group).mkdir()
        (tmp_path / group / "curves.json").write_text(json.dumps(part))
    merged_dir = tmp_path / "merged"
    assert tool.main(["--replot", "--merge", str(tmp_path / "a" / "curves.json"), str(tmp_path / "b" / "curves.json"),
                      "--output", str(merged_dir)]) == 0
    merged = json.loads((merged_dir / "curves.json").read_text())
    assert merged["models"] == data["models"]
    assert [pc["group"] for pc in merged["pieces"]] == ["a", "b"]
    assert "1. [a]" in (merged_dir / "table.md").read_text()
    with pytest.raises(ValueError, match="more than one file"):
        tool.merge_curves([str(tmp_path / "a" / "curves.json")] * 2)
