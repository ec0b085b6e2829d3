"""Tests of smca_detr.engine (optimizer, clipping, AMP train loop, resume, atomic checkpoints) and
train_net.py, on a tiny ResNet-18 + 1/1-layer DETR at 64x64 and an in-memory dataset (CPU)."""
import copy
import importlib.util
import itertools
import os
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import HookBase
from detectron2.structures import Boxes, BoxMode, Instances
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import CommonMetricPrinter, EventStorage, JSONWriter

import smca_detr  # noqa: F401
from smca_detr.checkpoint import SmcaDetrCheckpointer
from smca_detr.config import add_smca_detr_config
from smca_detr.engine import (
    Trainer,
    TrainLoop,
    build_optimizer,
    get_param_groups,
    has_fast_coco_eval,
)
from smca_detr.engine import trainer as trainer_mod
from smca_detr.modeling.criterion import SetCriterion
from smca_detr.modeling.matcher import HungarianMatcher
from train_step_helpers import NUM_CLASSES, TINY_R18_OPTS, _autocast_on, _batch, build

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN, VAL = "smca_engine_test_train", "smca_engine_test_val"
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

# the shared tiny R18 DETR, 1 decoder layer, trained 4 iterations (warm-up 2, LR step at 3, checkpoints every 2)
TINY_OPTS = TINY_R18_OPTS + ["MODEL.SMCA_DETR.DEC_LAYERS", "1", "MODEL.SMCA_DETR.NUM_QUERIES", "5",
                             "DATASETS.TRAIN", f"('{TRAIN}',)", "SOLVER.MAX_ITER", "4", "SOLVER.WARMUP_ITERS", "2",
                             "SOLVER.STEPS", "(3,)", "SOLVER.CHECKPOINT_PERIOD", "2"]


def make_cfg(output_dir="", extra=()):
    cfg = get_cfg()
    add_smca_detr_config(cfg)
    cfg.merge_from_list(TINY_OPTS + ["OUTPUT_DIR", str(output_dir)] + list(extra))
    return cfg


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """4 train + 2 val 64x64 PNG images with 1-2 coloured rectangles each (XYXY_ABS boxes)."""
    root = tmp_path_factory.mktemp("engine_data")
    rng = np.random.default_rng(0)

    def make(split, n, offset):
        dicts = []
        for i in range(n):
            img = rng.integers(0, 60, size=(64, 64, 3), dtype=np.uint8)
            annos = []
            for _ in range(int(rng.integers(1, 3))):
                x0, y0 = (int(v) for v in rng.integers(0, 40, size=2))
                w, h = (int(v) for v in rng.integers(10, 24, size=2))
                c = int(rng.integers(0, NUM_CLASSES))
                img[y0:y0 + h, x0:x0 + w] = (200, 60, 60) if c == 0 else ((60, 200, 60) if c == 1 else (60, 60, 200))
                annos.append({"bbox": [x0, y0, x0 + w, y0 + h], "bbox_mode": BoxMode.XYXY_ABS,
                              "category_id": c, "iscrowd": 0})
            path = str(root / f"{split}_{i}.png")
            Image.fromarray(img).save(path)
            dicts.append({"file_name": path, "image_id": offset + i, "height": 64, "width": 64,
                          "annotations": annos})
        return dicts

    splits = {TRAIN: make("train", 4, 0), VAL: make("val", 2, 100)}
    for name, dicts in splits.items():
        DatasetCatalog.register(name, lambda d=dicts: copy.deepcopy(d))
        MetadataCatalog.get(name).set(thing_classes=["red", "green", "blue"])
    yield splits
    for name in splits:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.fixture(scope="module")
def tiny_model():
    seed_all_rng(0)
    return Trainer.build_model(make_cfg())


def fixed_batch(dicts, n=2):
    batch = []
    for d in dicts[:n]:
        img = torch.as_tensor(np.asarray(Image.open(d["file_name"]).convert("RGB")).transpose(2, 0, 1).copy())
        inst = Instances((64, 64))
        inst.gt_boxes = Boxes(torch.tensor([a["bbox"] for a in d["annotations"]], dtype=torch.float32))
        inst.gt_classes = torch.tensor([a["category_id"] for a in d["annotations"]], dtype=torch.int64)
        batch.append({"image": img, "height": 64, "width": 64, "instances": inst})
    return batch


# ------------------------------------------------------------------------------ parameter groups


def test_param_groups_multipliers_and_each_param_once(tiny_model):
    cfg = make_cfg(extra=["SOLVER.LR_MULTIPLIER_NAMES", "['class_embed', 'res5.1']",
                          "SOLVER.LR_MULTIPLIER_VALUES", "[0.5, 0.25]"])
    groups = get_param_groups(cfg, tiny_model)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids))  # each parameter in exactly one group
    trainable = {id(p) for p in tiny_model.parameters() if p.requires_grad}
    frozen = {id(p) for p in tiny_model.parameters() if not p.requires_grad}
    assert frozen, "FREEZE_AT=2 should freeze the stem and res2"
    assert set(all_ids) == trainable  # frozen ones left out, nothing missing
    base = cfg.SOLVER.BASE_LR
    for name, p in tiny_model.named_parameters():
        if not p.requires_grad:
            continue
        if "class_embed" in name:
            expected = base * 0.5
        elif "res5.1" in name:  # explicit rule wins over the backbone multiplier
            expected = base * 0.25
        elif name.startswith("backbone."):
            expected = base * 0.1
        else:
            expected = base
        assert lr_of[id(p)] == pytest.approx(expected), name
    assert all(g["weight_decay"] == cfg.SOLVER.WEIGHT_DECAY for g in groups)
    opt = build_optimizer(cfg, tiny_model)
    assert isinstance(opt, torch.optim.AdamW)
    assert sorted(g["lr"] for g in opt.param_groups) == sorted(g["lr"] for g in groups)


def test_bad_solver_settings_raise_clear_errors(tiny_model):
    cfg = make_cfg(extra=["SOLVER.LR_MULTIPLIER_NAMES", "['a', 'b']", "SOLVER.LR_MULTIPLIER_VALUES", "[0.1]"])
    with pytest.raises(ValueError, match=r"SOLVER\.LR_MULTIPLIER_NAMES.*SOLVER\.LR_MULTIPLIER_VALUES"):
        build_optimizer(cfg, tiny_model)
    with pytest.raises(ValueError, match=r"SOLVER\.OPTIMIZER"):
        build_optimizer(make_cfg(extra=["SOLVER.OPTIMIZER", "LAMB"]), tiny_model)
    with pytest.raises(ValueError, match=r"SOLVER\.CLIP_GRADIENTS\.CLIP_TYPE"):
        build_optimizer(make_cfg(extra=["SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "global"]), tiny_model)
    sgd = build_optimizer(make_cfg(extra=["SOLVER.OPTIMIZER", "sgd", "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "norm"]),
                          tiny_model)
    assert isinstance(sgd, torch.optim.SGD) and type(sgd).__name__.endswith("WithGradientClip")


# ------------------------------------------------------------------------------------- clipping


class _TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.backbone(x)))


def _grad_norm(model):
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()


def test_full_model_clipping_clips_unscaled_gradients_under_gradscaler():
    cfg = make_cfg(extra=["SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.1"])
    torch.manual_seed(0)
    net = _TwoLayer()
    net_amp = copy.deepcopy(net)
    x = torch.randn(16, 4) * 10

    opt = build_optimizer(cfg, net)
    net(x).pow(2).sum().backward()
    raw = _grad_norm(net)
    assert raw > 10  # far above the limit: clipping must act
    opt.step()
    assert opt.last_grad_norm.item() == pytest.approx(raw, rel=1e-5)
    assert _grad_norm(net) == pytest.approx(0.1, rel=1e-4)  # clipped in place before the update

    # same step through a GradScaler: scaler.step() unscales first, so the clip sees true gradients
    opt_amp = build_optimizer(cfg, net_amp)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    scaler.scale(net_amp(x).pow(2).sum()).backward()
    assert _grad_norm(net_amp) == pytest.approx(raw * 2 ** 12, rel=1e-4)  # scaled before step
    scaler.step(opt_amp)
    scaler.update()
    assert opt_amp.last_grad_norm.item() == pytest.approx(raw, rel=1e-4)
    assert _grad_norm(net_amp) == pytest.approx(0.1, rel=1e-4)
    for p, q in zip(net.parameters(), net_amp.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)

    # clipping disabled: gradients untouched
    net2 = copy.deepcopy(net_amp)
    opt2 = build_optimizer(make_cfg(extra=["SOLVER.CLIP_GRADIENTS.ENABLED", "False"]), net2)
    net2(x).pow(2).sum().backward()
    before = _grad_norm(net2)
    opt2.step()
    assert _grad_norm(net2) == pytest.approx(before) and before > 1


def test_fused_adamw_is_used_on_cpu_and_updates_like_the_loop():
    torch.manual_seed(0)
    nets = [_TwoLayer().double() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    fused = build_optimizer(make_cfg(), nets[0])
    loop = build_optimizer(make_cfg(extra=["SOLVER.FUSED_OPTIMIZER", "False"]), nets[1])
    assert fused.defaults.get("fused") is True and not loop.defaults.get("fused")
    x = torch.randn(16, 4, dtype=torch.float64) * 10
    for _ in range(3):
        for net, opt in zip(nets, (fused, loop)):
            opt.zero_grad()
            net(x).pow(2).sum().backward()
            opt.step()
    assert fused.last_grad_norm.item() == pytest.approx(loop.last_grad_norm.item(), rel=1e-12)
    for p, q in zip(*(n.parameters() for n in nets)):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert not torch.equal(nets[0].head.weight, _TwoLayer().double().head.weight)
    # SGD has no fused flag here: left alone
    sgd = build_optimizer(make_cfg(extra=["SOLVER.OPTIMIZER", "SGD"]), _TwoLayer())
    assert not sgd.defaults.get("fused")


def test_few_steps_on_a_fixed_batch_reduce_the_loss(tiny_dataset):
    seed_all_rng(0)
    cfg = make_cfg()
    model = Trainer.build_model(cfg)
    model.train()
    opt = build_optimizer(cfg, model)
    batch = fixed_batch(tiny_dataset[TRAIN])
    losses = []
    for _ in range(6):
        loss = sum(model(batch).values())
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(b < a for a, b in zip(losses, losses[1:])), losses  # steadily down
    assert losses[-1] < 0.95 * losses[0], losses


# ------------------------------------------------------------------------------------ AMP (bf16)


def test_bf16_train_step_on_cpu_with_fp32_matcher_and_losses(tiny_dataset, monkeypatch):
    seed_all_rng(0)
    cfg = make_cfg(extra=["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", "bfloat16"])
    model = Trainer.build_model(cfg)
    opt = build_optimizer(cfg, model)
    loop = TrainLoop(model, itertools.repeat(fixed_batch(tiny_dataset[TRAIN])), opt,
                     precision=trainer_mod.amp_dtype(cfg))
    assert loop.precision == torch.bfloat16 and loop.grad_scaler is None and loop.device_type == "cpu"

    seen = {"matcher": [], "losses": [], "heads": []}
    orig_cost, orig_box = HungarianMatcher.class_cost, SetCriterion._box_losses

    def class_cost(self, logits, labels):
        seen["matcher"].append((logits.dtype, _autocast_on()))
        return orig_cost(self, logits, labels)

    def box_losses(self, boxes, *args):
        seen["losses"].append((boxes.dtype, _autocast_on()))
        return orig_box(self, boxes, *args)

    monkeypatch.setattr(HungarianMatcher, "class_cost", class_cost)
    monkeypatch.setattr(SetCriterion, "_box_losses", box_losses)
    model.heads.register_forward_hook(lambda m, i, out: seen["heads"].append(out[0].dtype))
    seen["head_linear"] = []
    model.heads.class_embed.register_forward_hook(lambda m, i, out: seen["head_linear"].append(out.dtype))

    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    with EventStorage(0) as storage:
        loop.iter = 0
        loop.run_step()
        total = storage.latest()["total_loss"][0]
        grad_norm = storage.latest()["grad_norm"][0]
    assert np.isfinite(total) and total > 0 and np.isfinite(grad_norm)
    assert seen["head_linear"] == [torch.bfloat16]  # the network itself ran under bf16 autocast
    assert seen["heads"] == [torch.float32]  # (logits and boxes leave the heads in float32)
    assert seen["matcher"] and all(s == (torch.float32, False) for s in seen["matcher"])
    assert seen["losses"] and all(s == (torch.float32, False) for s in seen["losses"])
    after = [p for p in model.parameters() if p.requires_grad]
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


class _LossNet(_TwoLayer):
    def forward(self, x):
        return {"loss_sq": super().forward(x).float().pow(2).mean()}


def test_float16_loop_scales_steps_and_checkpoints_its_grad_scaler():
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    model = _LossNet()
    loop = TrainLoop(model, itertools.repeat(x), build_optimizer(make_cfg(), model), precision=torch.float16)
    assert loop.grad_scaler is not None and loop.grad_scaler.is_enabled()
    before = [p.detach().clone() for p in model.parameters()]
    with EventStorage(0) as storage:
        loop.iter = 0
        loop.run_step()
        assert np.isfinite(storage.latest()["total_loss"][0])
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    loop.grad_scaler.update(37.0)  # a non-default scale must survive the checkpoint
    state = loop.state_dict()
    assert {"iteration", "optimizer", "grad_scaler"} <= set(state)
    other_model = _LossNet()
    other = TrainLoop(other_model, [], build_optimizer(make_cfg(), other_model), precision=torch.float16)
    other.load_state_dict(state)
    assert other.grad_scaler.get_scale() == 37.0
    with pytest.raises(ValueError, match="SOLVER.AMP.PRECISION"):
        trainer_mod.amp_dtype(make_cfg(extra=["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", "fp8"]))


# ---------------------------------------------------------------------------------------- resume


class _Crash(Exception):
    pass


class _CrashAt(HookBase):
    def __init__(self, it):
        self.it = it

    def before_step(self):
        if self.trainer.iter == self.it:
            raise _Crash(f"simulated crash at iteration {self.it}")


def _trainer(output_dir, resume=False):
    seed_all_rng(0)
    trainer = Trainer(make_cfg(output_dir))
    trainer.resume_or_load(resume=resume)
    return trainer


def test_resume_gives_identical_weights_and_optimizer_state(tiny_dataset, tmp_path):
    full = _trainer(tmp_path / "full")
    full.train()

    first = _trainer(tmp_path / "split")
    first.register_hooks([_CrashAt(2)])
    with pytest.raises(_Crash):
        first.train()
    ckpt_dir = tmp_path / "split"
    with open(ckpt_dir / "last_checkpoint") as f:
        assert f.read().strip() == "model_0000001.pth"

    resumed = _trainer(ckpt_dir, resume=True)
    assert resumed.start_iter == 2
    # optimizer state restored before any step (detectron2 v0.6's DefaultTrainer would not)
    opt_state = resumed.optimizer.state_dict()["state"]
    assert opt_state and all(float(s["step"]) == 2 for s in opt_state.values())
    resumed.train()
    assert resumed.iter == full.iter == 4

    sd_full, sd_res = full.model.state_dict(), resumed.model.state_dict()
    assert sd_full.keys() == sd_res.keys()
    for k in sd_full:
        assert torch.equal(sd_full[k], sd_res[k]), k
    o_full, o_res = full.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert o_full["state"].keys() == o_res["state"].keys()
    for idx in o_full["state"]:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(o_full["state"][idx][key]),
                               torch.as_tensor(o_res["state"][idx][key])), (idx, key)
    assert [g["lr"] for g in o_full["param_groups"]] == [g["lr"] for g in o_res["param_groups"]]
    assert full.scheduler.last_epoch == resumed.scheduler.last_epoch
    assert full.storage.history("lr").values() and resumed.storage.history("lr").latest() == \
        full.storage.history("lr").latest()


# ------------------------------------------------------------------------------------ checkpoints


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    model = _TwoLayer()
    ckpt = SmcaDetrCheckpointer(model, str(tmp_path))
    ckpt.save("model_a", iteration=1)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")  # partial data, then the disk "fills up"
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    for name in ("model_a", "model_b"):
        with pytest.raises(OSError, match="No space"):
            ckpt.save(name, iteration=2)
    monkeypatch.setattr(torch, "save", real_save)

    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_a.pth"]  # no partial/temp files
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(tmp_path / "model_a.pth").st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600
    assert ckpt.get_checkpoint_file() == str(tmp_path / "model_a.pth")
    fresh = _TwoLayer()
    extra = SmcaDetrCheckpointer(fresh, str(tmp_path)).resume_or_load("", resume=True)
    assert extra["iteration"] == 1
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, good[k]), k


# -------------------------------------------------------------------------- evaluation / train_net


def _load_train_net():
    spec = importlib.util.spec_from_file_location("smca_train_net", os.path.join(REPO, "train_net.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_net_eval_only_returns_coco_metrics(tiny_dataset, tmp_path, monkeypatch):
    train_net = _load_train_net()
    seed_all_rng(1)
    ref = Trainer.build_model(make_cfg())
    weights = tmp_path / "weights"
    SmcaDetrCheckpointer(ref, str(weights)).save("trained")

    captured = {}
    real_test = Trainer.test.__func__

    def spy_test(cls, cfg, model, evaluators=None):
        captured["model"] = model
        captured["use_fast_impl"] = cls.build_evaluator(cfg, VAL)._use_fast_impl
        return real_test(cls, cfg, model, evaluators)

    monkeypatch.setattr(Trainer, "test", classmethod(spy_test))
    out = tmp_path / "out"
    argv = ["--eval-only", "--num-gpus", "1"] + TINY_OPTS + [
        "DATASETS.TEST", f"('{VAL}',)", "MODEL.WEIGHTS", str(weights / "trained.pth"), "OUTPUT_DIR", str(out)]
    res = train_net.cli(argv)  # through launch(): one process runs main() in place, on CPU

    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(res["bbox"])
    assert all(np.isfinite(v) or np.isnan(v) for v in res["bbox"].values())
    assert os.path.isfile(out / "inference" / "coco_instances_results.json")
    assert os.path.isfile(out / "config.yaml")  # default_setup ran
    # the compiled COCOeval where detectron2 was built with its ops (main from source), else the Python one
    assert captured["use_fast_impl"] is has_fast_coco_eval()
    for k, v in ref.state_dict().items():  # MODEL.WEIGHTS was loaded into the evaluated model
        assert torch.equal(captured["model"].state_dict()[k], v), k


def test_has_fast_coco_eval_follows_the_compiled_ops(monkeypatch):
    import detectron2

    monkeypatch.delattr(detectron2, "_C", raising=False)  # `from detectron2 import _C` reads sys.modules
    for module, expected in ((types.ModuleType("detectron2._C"), False),  # compiled without COCOeval
                             (None, False)):  # no _C at all (ImportError)
        monkeypatch.setitem(sys.modules, "detectron2._C", module)
        assert has_fast_coco_eval() is expected
    fast = types.ModuleType("detectron2._C")
    fast.COCOevalEvaluateImages = fast.InstanceAnnotation = object()
    monkeypatch.setitem(sys.modules, "detectron2._C", fast)
    assert has_fast_coco_eval() is True
    fast.__smca_detr_placeholder__ = True  # the placeholder tools/install_detectron2.py writes
    assert has_fast_coco_eval() is False


def _launch_probe(out_dir):
    import torch.distributed as dist
    from detectron2.utils import comm

    gathered = comm.all_gather(comm.get_rank())
    t = torch.ones(1)
    dist.all_reduce(t)
    with open(os.path.join(out_dir, f"rank{comm.get_rank()}.txt"), "w") as f:
        f.write(f"{comm.get_world_size()} {comm.get_local_rank()} {comm.get_local_size()} {gathered} {t.item()}")


def test_launch_two_cpu_processes_with_gloo(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the gloo path is for machines without CUDA")
    assert trainer_mod.launch(lambda a: a + 1, 1, args=(41,)) == 42  # one process: runs in place
    trainer_mod.launch(_launch_probe, 2, dist_url="auto", args=(str(tmp_path),))
    for rank in (0, 1):
        with open(tmp_path / f"rank{rank}.txt") as f:
            assert f.read() == f"2 {rank} 2 [0, 1] 2.0"


def test_build_writers_without_tensorboard(tmp_path, monkeypatch):
    def no_tensorboard(*args, **kwargs):
        raise ImportError("No module named 'tensorboard'")

    monkeypatch.setattr(trainer_mod, "TensorboardXWriter", no_tensorboard)
    fake = types.SimpleNamespace(cfg=make_cfg(tmp_path / "w"), max_iter=10)
    writers = Trainer.build_writers(fake)
    assert [type(w) for w in writers] == [CommonMetricPrinter, JSONWriter]
    for w in writers:
        w.close()


def test_build_evaluator_generates_embedded_synthetic_split(tmp_path, monkeypatch):
    from smca_detr.data import synthetic

    prev_override, prev_root = synthetic._root_override, synthetic.get_root()
    monkeypatch.setenv("SMCA_DETR_DATASETS", str(tmp_path / "datasets"))
    synthetic.set_root(None)
    calls = []
    real = synthetic.ensure_synthetic
    monkeypatch.setattr(synthetic, "ensure_synthetic", lambda name, *a, **k: calls.append(name) or real(name, *a, **k))
    try:
        name = "smca_synthetic_tiny_val"
        assert not os.path.exists(MetadataCatalog.get(name).json_file)
        evaluator = Trainer.build_evaluator(make_cfg(tmp_path / "out"), name)
        assert calls == [name] and os.path.isfile(MetadataCatalog.get(name).json_file)
        assert evaluator._output_dir == str(tmp_path / "out" / "inference")
    finally:
        synthetic._root_override = prev_override
        synthetic.register_synthetic_datasets(prev_root)


# ------------------------------------------------------------------------------- numerical safety


def test_non_finite_predictions_stop_training_naming_the_iteration():
    cfg = make_cfg()
    model = build(cfg)
    heads_forward = model.heads.forward

    def nan_boxes(hs, references):
        logits, boxes = heads_forward(hs, references)
        return logits, boxes * float("nan")

    model.heads.forward = nan_boxes
    loop = TrainLoop(model, iter([_batch([(64, 64)] * 2, [1, 2])]), build_optimizer(cfg, model))
    with pytest.raises(FloatingPointError, match=r"non-finite.*at iteration 5\b"):
        loop.train(5, 6)  # detectron2's loop: EventStorage(5), storage.iter kept equal to trainer.iter
