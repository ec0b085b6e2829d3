"""The speed tools (``tools/benchmark*.py``) and their shared helpers (``tools/bench_common.py``):
timing statistics, ABBA alternation, the A/B and side-by-side tools against stand-ins, smoke runs of
the one-config and MSDA benchmarks. CPU, tiny random-weight models."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tool_helpers import DATA, REPO, TINY, load_tool, tiny_dataset  # noqa: F401 (fixture)

bench = load_tool("bench_common")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_benchmark_tool_smoke(tiny_dataset, tmp_path):
    tool = load_tool("benchmark")
    out = tmp_path / "bench.json"
    results = tool.run(tool.parse_args(
        ["--config-file", "smca_r50", "--iters", "1", "--warmup", "0", "--num-batches", "1", "--eval-images", "1",
         "--precisions", "fp32", "--json", str(out), "--opts", *TINY, *DATA, "OUTPUT_DIR", str(tmp_path)]))
    row = json.load(open(out))["rows"][0]
    assert row == results["rows"][0] and row["precision"] == "fp32"
    assert row["train_s_per_iter"] > 0 and row["eval_images_per_s"] > 0 and np.isfinite(row["train_last_loss"])






def test_time_fn_warmup_iters_and_statistics():

    calls = []
    t = bench.time_fn(lambda: calls.append(1), iters=3, warmup=2, stat="min",
                      before_each=lambda: calls.append(0))
    assert calls == [1, 1, 0, 1, 0, 1, 0, 1]  # 2 warm-up calls, then the hook before each timed call
    assert len(t.walls) == len(t.cpus) == 3 and t.seconds == min(t.walls) and t.cpu_seconds == min(t.cpus)
    m = bench.time_fn(lambda: None, iters=4, warmup=0, stat="median")
    assert m.seconds == float(np.median(m.walls))
    with pytest.raises(ValueError, match="iters"):
        bench.time_fn(lambda: None, iters=0)


def test_speed_model_inputs_optimizer_and_step():

    cfg, model = bench.build_model("smca_r50", TINY)
    assert cfg.MODEL.SMCA_DETR.HIDDEN_DIM == 32 and cfg.MODEL.WEIGHTS == "" and model.training
    batch = bench.synthetic_inputs(2, 48, 64, with_instances=True, num_boxes=5, min_box=8, seed=3)
    assert [tuple(x["image"].shape) for x in batch] == [(3, 48, 64)] * 2
    assert batch[0]["image"].dtype == torch.float32 and 0 <= batch[0]["image"].min() <= batch[0]["image"].max() <= 255
    boxes = batch[1]["instances"].gt_boxes.tensor
    assert boxes.shape == (5, 4) and (boxes[:, 2:] <= torch.tensor([64.0, 48.0])).all()
    assert ((boxes[:, 2:] - boxes[:, :2]) >= 8 - 1e-4).all() and (boxes >= 0).all()
    again = bench.synthetic_inputs(2, 48, 64, with_instances=True, num_boxes=5, min_box=8, seed=3)
    assert torch.equal(again[1]["instances"].gt_boxes.tensor, boxes)  # seeded
    assert not torch.equal(bench.synthetic_inputs(1, 48, 64, seed=4)[0]["image"], batch[0]["image"])

    opt = bench.build_adamw(cfg, model)
    assert isinstance(opt, torch.optim.AdamW)
    lrs = {g["lr_multiplier"]: g["lr"] for g in opt.param_groups}
    base, mult = cfg.SOLVER.BASE_LR, cfg.SOLVER.BACKBONE_MULTIPLIER
    assert lrs == {1.0: base, mult: base * mult}
    name, param = next((n, p) for n, p in model.named_parameters() if n.startswith("heads."))
    before = param.detach().clone()
    loss = bench.train_step(model, batch, opt, check_finite=True)
    assert torch.isfinite(loss) and not torch.equal(before, param.detach()), name
    assert opt.last_grad_norm is not None  # the recipe's full-model clipping ran inside step()


def test_cpu_peak_bytes_and_msda_benchmark_smoke():
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc")
    # in a fresh process: in this one, earlier tests may have left freed heap memory resident that a
    # new buffer reuses without growing the RSS
    code = ("import sys, torch; sys.path.insert(0, 'tools'); import bench_common as bench; "
            "print(bench.cpu_peak_bytes(lambda: torch.empty(64 * 2 ** 20, dtype=torch.uint8).fill_(1)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True)
    peak = int(out.stdout.split()[-1])
    assert 60 * 2 ** 20 <= peak < 200 * 2 ** 20  # the 64 MiB buffer (mmap-ed, returned on free)
    rows = load_tool("benchmark_msda").main(["--device", "cpu", "--size", "tiny", "--repeats", "2", "--warmup", "0",
                                              "--cases", "decoder"])
    assert [(r["case"], r["impl"], r["dtype"]) for r in rows] == [("decoder", "pytorch", "fp32")]
    assert rows[0]["fwd"] > 0 and rows[0]["fwd_bwd"] > 0 and rows[0]["err"] == 0


def test_time_alternately_flips_the_order_every_round():
    """bench.time_alternately: ABBA order per case, one time per variant and round; ratio_summary."""

    calls = []
    cases = {"x": {"A": lambda: calls.append("xA"), "B": lambda: calls.append("xB")},
             "y": {"P": lambda: calls.append("yP"), "Q": lambda: calls.append("yQ")}}
    times = bench.time_alternately(cases, 3)
    assert calls == ["xA", "xB", "yP", "yQ", "xB", "xA", "yQ", "yP", "xA", "xB", "yP", "yQ"]
    assert {c: {k: len(v) for k, v in t.items()} for c, t in times.items()} == {"x": {"A": 3, "B": 3},
                                                                              "y": {"P": 3, "Q": 3}}
    assert bench.ratio_summary([2.0, 3.0, 8.0], [1.0, 2.0, 2.0]) == {"median": 2.0, "min": 1.5, "max": 4.0}


def test_benchmark_ab_alternates_and_refuses_changed_maths():
    """tools/benchmark_ab.py: two models of one config, timed in ABBA order; a speed-only option
    passes the agreement check, an option that changes the results is refused."""
    tool = load_tool("benchmark_ab")
    common = ["--config-file", "configs/demo/smca_r18_slim_synthetic.yaml", "--height", "64", "--width", "96",
              "--threads", "1"]
    for case in ("train", "backbone", "inference"):
        res = tool.main(common + ["--case", case, "--rounds", "3",
                                  "--b-opts", "MODEL.SMCA_DETR.FUSED_CPU_BACKBONE", "False"])
        assert res["case"] == case and [len(res["times_s"][k]) for k in "AB"] == [3, 3]
        ratios = [b / a for a, b in zip(res["times_s"]["A"], res["times_s"]["B"])]
        assert res["ratio_b_over_a"]["median"] == sorted(ratios)[1]
    with pytest.raises(SystemExit, match="change the results"):
        tool.main(common + ["--case", "backbone", "--rounds", "1", "--b-opts", "MODEL.PIXEL_STD", "[1.0, 1.0, 1.0]"])
    with pytest.raises(SystemExit):
        tool.main(common + ["--b-opts", "MODEL.SMCA_DETR.HIDDEN_DIM"])  # not KEY VALUE pairs


_FAKE_OFFICIAL_MODELS = '''
import torch
from torch import nn

from . import attention  # binds torch.nn.functional.dropout by name, as Conditional DETR's does

CALLS = []


class Model(nn.Module):
    def __init__(self, num_queries):
        super().__init__()
        self.backbone = nn.Conv2d(3, 4, 1)
        self.head = nn.Linear(4, 5)
        self.num_queries = num_queries

    def forward(self, samples):
        samples, targets = samples  # the official SMCA API: model([samples, targets])
        CALLS.append((self.training, samples.tensors.shape, [t["size"].tolist() for t in targets]))
        x = self.backbone(samples.tensors).mean((2, 3))
        return {"pred_logits": self.head(x)[:, None].expand(-1, self.num_queries, -1)}


class Criterion(nn.Module):
    weight_dict = {"loss_ce": 2.0}

    def forward(self, outputs, targets):
        n = sum(len(t["labels"]) for t in targets)
        return {"loss_ce": outputs["pred_logits"].square().mean() * n, "class_error": torch.tensor(0.0)}


def build_model(args):
    global MODEL, INITIAL
    MODEL = Model(args.num_queries)
    INITIAL = [p.detach().clone() for p in MODEL.parameters()]
    post = {"bbox": lambda outputs, sizes: [{"scores": o} for o in outputs["pred_logits"].sigmoid()]}
    return MODEL, Criterion(), post
'''

_FAKE_OFFICIAL_MISC = '''
import torch


class NestedTensor:
    def __init__(self, tensors, mask):
        self.tensors, self.mask = tensors, mask


def nested_tensor_from_tensor_list(images):
    h = max(i.shape[1] for i in images); w = max(i.shape[2] for i in images)
    t = torch.zeros(len(images), 3, h, w); m = torch.ones(len(images), h, w, dtype=torch.bool)
    for k, i in enumerate(images):
        t[k, :, :i.shape[1], :i.shape[2]] = i; m[k, :i.shape[1], :i.shape[2]] = False
    return NestedTensor(t, m)
'''


def test_benchmark_official_times_both_alternately(tmp_path, capsys):
    """tools/benchmark_official.py against a stand-in official checkout (same API as the SMCA repo:
    models.build_model(args) -> model, criterion, postprocessors; util.misc.nested_tensor_from_tensor_list):
    inputs converted as the official data pipeline hands them over, the official training step
    updates its parameters, every round times both, the ratio is the median of the per-round
    ours / official ratios; a checkout without the family's entry file is refused."""
    tool = load_tool("benchmark_official")
    root = tmp_path / "official"
    (root / "models").mkdir(parents=True)
    (root / "util").mkdir()
    (root / "models" / "__init__.py").write_text(_FAKE_OFFICIAL_MODELS)
    (root / "models" / "detr.py").write_text("")
    (root / "models" / "attention.py").write_text("from torch.nn.functional import dropout\n")
    (root / "util" / "__init__.py").write_text("")
    (root / "util" / "misc.py").write_text(_FAKE_OFFICIAL_MISC)
    try:
        res = tool.main(["--official-root", str(root), "--family", "smca", "--rounds", "3", "--threads", "1",
                         "--config-file", "configs/demo/smca_r18_slim_synthetic.yaml",
                         "--height", "64", "--width", "96", "--boxes", "3"])
        fake = sys.modules["models"]
        # warm-up + 3 rounds of each case; training calls see the batch of 2 and its sizes
        train_calls = [c for c in fake.CALLS if c[0]]
        eval_calls = [c for c in fake.CALLS if not c[0]]
        assert len(train_calls) == 4 and len(eval_calls) == 4
        assert train_calls[0][1] == (2, 3, 64, 96) and train_calls[0][2] == [[64, 96], [64, 96]]
        assert eval_calls[0][1] == (1, 3, 64, 96)
        assert all(not torch.equal(p, q) for p, q in zip(fake.MODEL.parameters(), fake.INITIAL))  # AdamW stepped
        for case in ("inference", "train"):
            s = res[case]["seconds"]
            assert len(s["ours"]) == len(s["official"]) == 3
            ratios = sorted(a / b for a, b in zip(s["ours"], s["official"]))
            assert res[case]["ratio"]["median"] == ratios[1]
            assert res[case]["ratio"]["min"] == ratios[0] and res[case]["ratio"]["max"] == ratios[2]
        assert "ours / official: median" in capsys.readouterr().out

        # the conversion of our detectron2 inputs into the official format
        batch = tool.bench.synthetic_inputs(2, 32, 48, with_instances=True, num_boxes=2)
        samples, targets = tool.official_inputs(batch)
        img = batch[1]["image"].flip(0) / 255.0
        mean, std = torch.tensor(tool._MEAN).view(3, 1, 1), torch.tensor(tool._STD).view(3, 1, 1)
        torch.testing.assert_close(samples.tensors[1], (img - mean) / std, rtol=0, atol=0)
        b = batch[0]["instances"].gt_boxes.tensor
        want = torch.stack([(b[:, 0] + b[:, 2]) / 96, (b[:, 1] + b[:, 3]) / 64,
                            (b[:, 2] - b[:, 0]) / 48, (b[:, 3] - b[:, 1]) / 32], 1)
        torch.testing.assert_close(targets[0]["boxes"], want, rtol=1e-6, atol=1e-7)
        assert targets[0]["labels"].tolist() == (batch[0]["instances"].gt_classes + 1).tolist()
        assert targets[0]["size"].tolist() == [32, 48]

        # --official-fast-dropout: F.dropout and names bound to it in the official modules, restored after
        original = torch.nn.functional.dropout
        x = torch.rand(4000) + 1
        with tool.fast_dropout():
            assert sys.modules["models.attention"].dropout is torch.nn.functional.dropout is not original
            y = sys.modules["models.attention"].dropout(x, 0.25)
            assert torch.equal(torch.nn.functional.dropout(x, 0.25, training=False), x)
        assert sys.modules["models.attention"].dropout is torch.nn.functional.dropout is original
        kept = y != 0
        torch.testing.assert_close(y[kept], x[kept] / 0.75, rtol=1e-6, atol=0)
        assert 0.7 < kept.float().mean() < 0.8
        res = tool.main(["--official-root", str(root), "--family", "smca", "--rounds", "1", "--threads", "1",
                         "--config-file", "configs/demo/smca_r18_slim_synthetic.yaml", "--case", "train",
                         "--height", "64", "--width", "96", "--official-fast-dropout"])
        assert res["official_fast_dropout"] and list(res)[-1] == "train"
    finally:
        for mod in [m for m in sys.modules if m in ("models", "util") or m.startswith(("models.", "util."))]:
            del sys.modules[mod]
    with pytest.raises(SystemExit):
        tool.main(["--official-root", str(tmp_path / "nowhere"), "--family", "conditional"])
